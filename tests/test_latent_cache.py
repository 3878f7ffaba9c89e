"""The latent cache as one typed contract (dcae.diffusion.cache): the record of both kinds round-trips, caches and
checkpoints written before it still load, train, resume and sample, the scaling factor has no silent default, and
the training loop and the samplers never ask which kind of cache or conditioning they hold."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from dcae.diffusion import cache
from dcae.diffusion.c2i.latents import LatentDataset
from dcae.diffusion.cache import CacheIndex, Shard
from dcae.diffusion.conditioning import ClassConditioning, TextConditioning, Unconditional
from dcae.diffusion.t2i.cache import TextLatentDataset
from dcae.diffusion.train.data import open_cache
from dcae.errors import UserError

LEGACY = Path(__file__).parent / "data" / "legacy"
SRC = Path(__file__).resolve().parents[1] / "src" / "dcae"


def _index(conditioning, **kw) -> CacheIndex:
    base = dict(autoencoder="/models/ae", autoencoder_config={"name": "x"}, scaling_factor=0.41407,
                spatial_compression=32, latent_channels=32, resolution=512, conditioning=conditioning,
                shards=[Shard("shard-00000.safetensors", 3, (512, 512)),
                        Shard("shard-00001.safetensors", 2, (384, 640))],
                fingerprint="abc", complete=True, patch_size=1)  # fmt: skip
    return CacheIndex(**{**base, **kw})


@pytest.mark.parametrize(
    "record",
    [
        _index(TextConditioning(2304, 300, "google/gemma-2-2b-it"), skipped=["a.jpg: no caption"]),
        _index(
            ClassConditioning(1000),
            shards=[Shard("shard-00000.safetensors", 4)],
            latent_shape=(32, 16, 16),
            class_names=["tench"] * 1000,
            label_source="folders",
            flip=True,
        ),  # fmt: skip
        _index(Unconditional(), shards=[Shard("shard-00000.safetensors", 4)], latent_shape=(32, 16, 16)),
    ],
)
def test_record_round_trips_through_json(record):
    back = CacheIndex.from_json(json.loads(json.dumps(record.to_json())), "index.json")
    assert back == record and back.text_encoder == record.text_encoder
    summary = CacheIndex.from_summary(record.summary(), record.conditioning.spec(), "ckpt")
    assert "conditioning" not in record.summary() and "shards" not in record.summary()
    assert summary.shards == [] and summary.scaling_factor == record.scaling_factor
    assert summary.conditioning == record.conditioning and summary.text_encoder == record.text_encoder


def test_a_record_without_a_scaling_factor_is_an_error_that_names_it():
    d = _index(Unconditional(), latent_shape=(32, 16, 16)).to_json()
    del d["scaling_factor"]
    with pytest.raises(UserError, match=r"^somewhere/index.json: .*scaling_factor"):
        CacheIndex.from_json(d, "somewhere/index.json")
    for bad in (0, -1.0, float("nan"), True, "0.4"):
        with pytest.raises(UserError, match="scaling_factor"):
            CacheIndex.from_json({**d, "scaling_factor": bad}, "index.json")


def test_a_checkpoint_without_a_scaling_factor_is_refused_by_name(tmp_path):
    from dcae.diffusion.train.checkpoint import load_checkpoint

    state = torch.load(LEGACY / "diffusion" / "checkpoints" / "step_0000001.pt", weights_only=False)
    del state["latents"]["scaling_factor"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"old.pt: latents: .*no scaling_factor"):
        load_checkpoint(tmp_path / "old.pt")


def test_legacy_labelled_cache_reads_as_the_typed_record():
    index = cache.read_index(LEGACY / "diffusion" / "latents")
    assert index.kind == "class" and index.conditioning == ClassConditioning(2)
    assert index.autoencoder == "tiny-f4c8" and index.scaling_factor == 0.5 and index.latent_shape == (8, 4, 4)
    assert isinstance(open_cache(LEGACY / "diffusion" / "latents"), LatentDataset)


@pytest.fixture
def legacy_t2i(tmp_path, monkeypatch) -> Path:
    """A copy of the text-to-image cache and run of the earlier version, the working directory set to it (the
    earlier version recorded the autoencoder as the relative path typed, `ae`), with the text encoder it recorded
    (an absolute path on the machine that made it) pointed at this machine's copy of the same encoder."""
    from dcae.diffusion.t2i.encoders import all_minilm_l6_v2

    root = tmp_path / "t2i"
    shutil.copytree(LEGACY / "t2i", root)
    index = json.loads((root / "cache" / "index.json").read_text())
    assert index["format"] == "dcae-text-latents/1"
    index["text_encoder"] = str(all_minilm_l6_v2())
    (root / "cache" / "index.json").write_text(json.dumps(index))
    monkeypatch.chdir(root)
    return root


def test_legacy_text_cache_and_checkpoint_resume_and_sample(legacy_t2i, tmp_path):
    """The earlier cache opens as a text cache, its run resumes from step 1 to the very weights the uninterrupted
    run of the earlier version ended with (the checkpoint's model arguments recorded the caption width three
    times: read now as once), and the checkpoint samples."""
    from dcae.cli import main
    from dcae.diffusion.train.checkpoint import conditioning_of, list_checkpoints, load_checkpoint
    from dcae.diffusion.train.config import load_config
    from dcae.diffusion.train.loop import train

    ds = open_cache("cache")
    assert isinstance(ds, TextLatentDataset) and ds.conditioning == TextConditioning(384, 16)
    assert ds.index.autoencoder == "ae" and ds.index.scaling_factor == 0.5

    cfg = load_config(legacy_t2i / "run" / "config.yaml")  # the run's own config: data=cache, 2 steps, resume
    train(cfg, progress=False)
    final = torch.load(list_checkpoints(legacy_t2i / "run")[-1], weights_only=False)
    ref = torch.load(legacy_t2i / "final.pt", weights_only=True)
    assert final["step"] == 2
    for part in ("model", "ema"):
        for k, v in ref[part].items():
            torch.testing.assert_close(final[part][k], v, rtol=0, atol=0, msg=f"{part} {k}")
    assert final["model_args"]["conditioning"] == {"kind": "text", "caption_channels": 384, "max_tokens": 16}
    assert "caption_channels" not in final["model_args"]["overrides"]

    model, _, meta = load_checkpoint(legacy_t2i / "run" / "checkpoints" / "step_0000001.pt")
    assert conditioning_of(meta) == TextConditioning(384, 16) and meta["latents"].scaling_factor == 0.5
    rc = main(["t2i", "sample", "--ckpt", str(legacy_t2i / "run" / "checkpoints" / "step_0000001.pt"), "--prompt",
               "a red square", "--steps", "2", "-o", str(tmp_path / "samples"), "--grid", "0"])  # fmt: skip
    assert rc == 0 and (tmp_path / "samples" / "images" / "000000.png").is_file()


def test_the_cache_records_the_autoencoder_so_that_it_means_the_same_from_anywhere(legacy_t2i, tmp_path, monkeypatch):
    """A cache made with `--model ae` records the absolute folder: a run trained from another directory decodes
    its sample grid with that autoencoder, not with whatever `ae/` is found there."""
    from dcae.cli import main
    from dcae.diffusion.t2i.encoders import all_minilm_l6_v2

    rc = main(["t2i", "cache", "--data", "data", "--model", "ae", "--text-encoder", str(all_minilm_l6_v2()), "-o",
               "new", "--resolution", "32", "--max-tokens", "16"])  # fmt: skip
    assert rc == 0
    index = cache.read_index(legacy_t2i / "new")
    assert index.autoencoder == str((legacy_t2i / "ae").resolve()) and index.text_encoder == str(all_minilm_l6_v2())
    monkeypatch.chdir(tmp_path)
    assert open_cache(legacy_t2i / "new").index.autoencoder == index.autoencoder


# ----------------------------------------------------------------------------- no branch on the kind
KIND_NAMES = {"LatentDataset", "TextLatentDataset", "ClassConditioning", "TextConditioning", "Unconditional",
              "Labels", "Text"}  # fmt: skip


@pytest.mark.parametrize(
    "module",
    [
        "diffusion/train/loop.py",
        "diffusion/train/samples.py",
        "diffusion/generation.py",
        "diffusion/processes/sampling.py",
    ],  # fmt: skip
)
def test_loop_and_samplers_do_not_branch_on_the_kind(module):
    """No isinstance / hasattr test against a kind of cache or condition, no `.kind ==` comparison, no import of
    either cache's dataset: the training loop and the samplers use the protocols only."""
    tree = ast.parse((SRC / module).read_text())
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "hasattr"):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
                n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
            }
            if node.func.id == "hasattr" or names & KIND_NAMES:
                problems.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Compare) and any(
            isinstance(n, ast.Attribute) and n.attr == "kind" for n in ast.walk(node)
        ):
            problems.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.ImportFrom) and node.module in (
            "dcae.diffusion.c2i.latents",
            "dcae.diffusion.t2i.cache",
        ):
            problems.append(f"line {node.lineno}: imports {node.module}")
    assert not problems, f"{module} branches on the kind: {problems}"


def test_text_to_image_is_a_package_beside_class_conditional():
    root = SRC / "diffusion"
    stray = [p.name for p in root.glob("*.py") if p.name.startswith(("t2i_", "text_", "sana_"))]
    assert not stray, f"text-to-image modules at the root of diffusion/: {stray}"
    assert (root / "t2i" / "__init__.py").is_file() and (root / "c2i" / "__init__.py").is_file()
    assert not (SRC / "checkpoint.py").exists()


def test_a_skipped_input_is_named_and_counted_in_the_text_cache(legacy_t2i):
    """One image without a caption and one unreadable image among good ones: the cache is made of the good ones and
    its record names the two it left out (the earlier version crashed on the first skipped item)."""
    from dcae.cli import main
    from dcae.diffusion.t2i.encoders import all_minilm_l6_v2

    shutil.copy(legacy_t2i / "data" / "0.png", legacy_t2i / "data" / "uncaptioned.png")
    (legacy_t2i / "data" / "broken.png").write_bytes(b"not a png")
    (legacy_t2i / "data" / "broken.txt").write_text("a broken square")
    rc = main(["t2i", "cache", "--data", "data", "--model", "ae", "--text-encoder", str(all_minilm_l6_v2()), "-o",
               "mixed", "--resolution", "32", "--max-tokens", "16"])  # fmt: skip
    assert rc == 0
    index = cache.read_index(legacy_t2i / "mixed")
    assert index.num_images == 4 and len(index.skipped) == 2, index.skipped
    assert any("uncaptioned.png" in s for s in index.skipped) and any("broken.png" in s for s in index.skipped)


def _cache_cmd(out: str, *extra: str) -> list[str]:
    from dcae.diffusion.t2i.encoders import all_minilm_l6_v2

    return ["t2i", "cache", "--data", "data", "--model", "ae", "--text-encoder", str(all_minilm_l6_v2()), "-o", out,
            "--resolution", "32", "--max-tokens", "16", *extra]  # fmt: skip


def test_weights_replaced_at_the_same_path_make_another_plan_and_are_noticed_when_decoding(legacy_t2i, capsys):
    """The record holds a fingerprint of the autoencoder's and the text encoder's weights and the dtypes: a rerun
    after the weights at `ae/` were replaced (or with another dtype) is another plan, refused without --overwrite
    instead of finishing a cache of two autoencoders; and the replaced weights do not silently decode latents of
    the old ones."""
    from test_diffusion_latents import tiny_autoencoder

    from dcae.cli import main
    from dcae.models import weights

    assert main(_cache_cmd("c1")) == 0
    first = cache.read_index(legacy_t2i / "c1")
    assert first.autoencoder_fingerprint and first.text_encoder_fingerprint and first.dtype == "fp32"
    assert main(_cache_cmd("c1")) == 0  # the same plan: nothing to do, still complete
    assert main(_cache_cmd("c1", "--dtype", "bf16")) == 2
    assert "different run" in capsys.readouterr().err

    tiny_autoencoder(seed=123).save_pretrained(legacy_t2i / "ae", overwrite=True)  # new weights, same path and shapes
    assert main(_cache_cmd("c1")) == 2
    assert "different run" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"ae: not the autoencoder weights the latents were made with"):
        cache.load_autoencoder(first)
    assert weights.fingerprint(cache.load_autoencoder(first, override="ae")) != first.autoencoder_fingerprint

    assert main(_cache_cmd("c1", "--overwrite")) == 0
    again = cache.read_index(legacy_t2i / "c1")
    assert again.complete and again.autoencoder_fingerprint != first.autoencoder_fingerprint
    assert weights.fingerprint(cache.load_autoencoder(again)) == again.autoencoder_fingerprint


def test_weights_fingerprint_covers_every_buffer_and_value():
    """BatchNorm's 0-d counters and bf16 weights are hashed too; one changed value changes the fingerprint."""
    from dcae.models import weights

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(torch.bfloat16)
    before = weights.fingerprint(net)
    assert before == weights.fingerprint(net) and len(before) == 16
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1
    assert weights.fingerprint(net) != before
