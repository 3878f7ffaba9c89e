"""LoRA interchange with diffusers: a tiny SanaPipeline saved by diffusers is fine-tuned with LoRA by `dcae t2i
train` (finetune.pretrained = the pipeline folder), `dcae t2i export --lora` writes diffusers' LoRA file, and
`SanaPipeline.load_lora_weights` + diffusers' sampling gives `dcae t2i sample --model PIPE --lora FILE`'s picture
(same seed, 1/255), also at another --lora-scale; a LoRA written the way diffusers' own SANA training script
writes it loads in dcae the same way; the merged export equals diffusers' fuse_lora; bad LoRAs are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_sana_diffusers_parity import _components, _same_picture, _saved

from dcae.cli import main

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "a red cube on a table"
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
SAME = ["--prompt", PROMPT, "--seed", "7", "--steps", "2", "--size", "64x64", "--no-resolution-binning"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The pipeline, a 4-image cache of its vae and text encoder, and a 3-step LoRA run on it."""
    root = tmp_path_factory.mktemp("lora")
    components = _components(root, seed=1, sample_size=16)
    folder, _ = _saved(diffusers.SanaPipeline, components, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                       root / "pipe")  # fmt: skip
    (root / "data").mkdir()
    for i, (name, c) in enumerate(COLORS.items()):
        Image.fromarray(np.full((64, 64, 3), c, np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(f"a {name} cube")
    assert main(["t2i", "cache", "--data", str(root / "data"), "--model", str(folder / "vae"), "--text-encoder",
                 str(folder), "-o", str(root / "cache"), "--resolution", "64", "--max-tokens", "16"]) == 0  # fmt: skip
    run = root / "run"
    assert main(["t2i", "train", "--quiet", f"data={root / 'cache'}", f"out_dir={run}", f"finetune.pretrained={folder}",
                 "finetune.lora.rank=4", "finetune.lora.alpha=8", "batch_size=2", "max_steps=3", "optim.lr=0.05",
                 "mixed_precision=no", "num_workers=0", "sample.every=0", "sample.steps=1", "sample.num=1",
                 "log.tensorboard=false", "ema_decay=0.5", "sample.prompts=[a red cube]"]) == 0  # fmt: skip
    assert main(["t2i", "export", "--ckpt", str(run), "--lora", "-o", str(root / "lora")]) == 0
    return root, folder, run


def _ours(tmp_path, folder, *extra) -> np.ndarray:
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    assert main(["t2i", "sample", "--model", str(folder), *SAME, "-o", str(out), *map(str, extra)]) == 0
    return np.asarray(Image.open(out / "images" / "000000.png").convert("RGB"))


def _theirs(pipe, **kw) -> np.ndarray:
    image = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(7), num_inference_steps=2, height=64, width=64,
                 use_resolution_binning=False, output_type="np", **kw).images[0]  # fmt: skip
    return (image * 255).round().astype(np.uint8)


def _pipe(folder, lora=None):
    pipe = diffusers.SanaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe


def test_dcae_lora_loads_in_diffusers_and_gives_our_picture(setup, tmp_path):
    root, folder, _ = setup
    file = root / "lora" / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in keys)
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8
    pipe = _pipe(folder, root / "lora")
    base = _ours(tmp_path, folder)
    ours = _ours(tmp_path, folder, "--lora", root / "lora")
    _same_picture(ours, _theirs(pipe), "dcae LoRA: dcae vs diffusers load_lora_weights")
    assert np.abs(ours.astype(int) - base.astype(int)).max() > 8  # the LoRA changes the picture
    half = _ours(tmp_path, folder, "--lora", file, "--lora-scale", "0.5")
    _same_picture(half, _theirs(pipe, attention_kwargs={"scale": 0.5}), "scale 0.5")
    zero = _ours(tmp_path, folder, "--lora", file, "--lora-scale", "0")
    assert np.array_equal(zero, base)


def test_merged_export_equals_diffusers_fuse_lora(setup, tmp_path):
    root, folder, run = setup
    assert main(["t2i", "export", "--ckpt", str(run), "-o", str(tmp_path / "merged")]) == 0
    ours = diffusers.SanaTransformer2DModel.from_pretrained(tmp_path / "merged" / "transformer").state_dict()
    pipe = _pipe(folder, root / "lora")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    theirs = pipe.transformer.state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-6, msg=k)
    base = _pipe(folder).transformer.state_dict()
    q = "transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(ours[q], base[q])


@pytest.mark.parametrize("with_metadata", [True, False])
def test_lora_written_as_diffusers_training_script_loads_in_dcae(setup, tmp_path, with_metadata):
    """As examples/dreambooth/train_dreambooth_lora_sana.py: transformer.add_adapter(LoraConfig), the peft state
    dict, SanaPipeline.save_lora_weights (with the adapter metadata, or without: then alpha = rank)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    _, folder, _ = setup
    transformer = diffusers.SanaTransformer2DModel.from_pretrained(folder / "transformer")
    config = LoraConfig(r=2, lora_alpha=6 if with_metadata else 2, init_lora_weights="gaussian",
                        target_modules=["to_k", "to_q", "to_v", "to_out.0"])  # fmt: skip
    transformer.add_adapter(config)
    torch.manual_seed(3)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    meta = {"transformer_lora_adapter_metadata": config.to_dict()} if with_metadata else {}
    diffusers.SanaPipeline.save_lora_weights(tmp_path / "theirs", get_peft_model_state_dict(transformer), **meta)
    ours = _ours(tmp_path, folder, "--lora", tmp_path / "theirs")
    theirs = _theirs(_pipe(folder, tmp_path / "theirs"))
    _same_picture(ours, theirs, f"diffusers-trained LoRA, metadata {with_metadata}")


def test_bad_loras_are_one_line(setup, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root, folder, _ = setup
    good = load_file(root / "lora" / "pytorch_lora_weights.safetensors")
    cases = {
        "other architecture": ({k.replace("transformer_blocks.0.", "transformer_blocks.9."): v
                                for k, v in good.items()}, None, "another architecture"),
        "other width": ({k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "attn1.to_q.lora_A" in k else v
                         for k, v in good.items()}, None, "another architecture"),
        "rank mismatch": (good, {"transformer.r": 8, "transformer.lora_alpha": 8, "transformer.target_modules":
                                 ["to_q", "to_k", "to_v", "to_out.0"]}, "does not fit"),
        "not a LoRA": ({"text_encoder.x.lora_A.weight": torch.zeros(2, 2)}, None, "not a SANA transformer LoRA"),
    }  # fmt: skip
    for what, (state, meta, words) in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        header = {"format": "pt"} | ({"lora_adapter_metadata": json.dumps(meta)} if meta else {})
        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=header)
        capsys.readouterr()
        rc = main(["t2i", "sample", "--model", str(folder), *SAME, "-o", str(tmp_path / "o"), "--lora", str(path)])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and words in err and path.name in err, (what, err)


def test_full_finetune_from_a_transformer_folder_starts_from_its_weights(setup, tmp_path, capsys):
    """finetune.pretrained = diffusers' transformer folder, every weight trained: at lr 1e-12 one step leaves the
    weights diffusers' (Adam moves each by at most about the learning rate)."""
    root, folder, _ = setup
    run = tmp_path / "ft"
    assert main(["t2i", "train", "--quiet", f"data={root / 'cache'}", f"out_dir={run}",
                 f"finetune.pretrained={folder / 'transformer'}", "batch_size=2", "max_steps=1", "optim.lr=1e-12",
                 "mixed_precision=no", "num_workers=0", "sample.every=0", "sample.steps=1", "sample.num=1",
                 "log.tensorboard=false", "sample.prompts=[a red cube]"]) == 0  # fmt: skip
    from dcae.diffusion.train.checkpoint import list_checkpoints

    ours = torch.load(list_checkpoints(run)[-1], weights_only=True)["model"]
    theirs = diffusers.SanaTransformer2DModel.from_pretrained(folder / "transformer").state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-9, rtol=0, msg=k)
    # `--plan` reads the same network from the configs alone (transformer folder, pipeline folder): the model
    # arguments the run recorded, and the plan's parameter bytes those of diffusers' model
    from dcae.diffusion.t2i.finetune import planned_model_args

    recorded = torch.load(list_checkpoints(run)[-1], weights_only=True)["model_args"]
    for source in (folder / "transformer", folder):
        assert planned_model_args(str(source), recorded["conditioning"]) == recorded
    main(["t2i", "train", f"data={root / 'cache'}", f"finetune.pretrained={folder}", "--plan"])
    planned = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("parameters"))
    assert f"{4 * sum(v.numel() for v in theirs.values()) / 2**20:.2f} MiB" in planned
