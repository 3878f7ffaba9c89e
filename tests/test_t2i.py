"""Text-to-image end to end on the CPU: `dcae t2i cache` (captioned images -> bucketed latents and text
embeddings), `dcae t2i train` (resumes exactly, also after SIGKILL), `dcae t2i sample` (prompts -> images,
seeded per image), and bad input refused by name."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_diffusion_latents import tiny_autoencoder
from test_text_encoders import _roberta

from dcae.cli import main
from dcae.diffusion.cache import read_index
from dcae.diffusion.t2i.encoders import all_minilm_l6_v2
from dcae.diffusion.train.checkpoint import list_checkpoints
from dcae.diffusion.train.config import load_config
from dcae.diffusion.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """8 coloured squares, square and wide, with sidecar captions, a tiny f4 autoencoder and MiniLM."""
    root = tmp_path_factory.mktemp("t2i")
    (root / "data").mkdir()
    for i, (name, c) in enumerate(list(COLORS.items()) * 2):
        h, w = (32, 32) if i % 2 == 0 else (32, 64)
        Image.fromarray(np.full((h, w, 3), c, np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(f"a {name} square")
    tiny_autoencoder().save_pretrained(root / "ae")
    rc, err = _cli("t2i", "cache", "--data", root / "data", "--model", root / "ae", "--text-encoder",
                   all_minilm_l6_v2(), "-o", root / "cache", "--resolution", 32, "--max-tokens", 16)  # fmt: skip
    assert rc == 0, err
    return root / "cache"


def _overrides(cache: Path, out: Path, **kw) -> list[str]:
    base = {"data": cache, "out_dir": out, "model.name": "SANA-tiny", "batch_size": 2, "max_steps": 4,
            "log.every": 1, "checkpoint.every": 2, "mixed_precision": "no", "num_workers": 0, "sample.every": 0,
            "sample.steps": 2, "sample.num": 2, "optim.lr": "1e-3", "log.tensorboard": "false",
            "sample.prompts": "[a red square]"}  # fmt: skip
    return [f"{k}={v}" for k, v in {**base, **kw}.items()]


def test_cache_has_buckets_text_and_resumes(cache):
    index = read_index(cache)
    c = index.conditioning
    assert index.complete and c.caption_channels == 384 and c.max_tokens == 16 and index.text_encoder
    assert index.buckets == [(24, 40), (32, 32)]  # wide and square buckets
    captions = [json.loads(line) for line in (cache / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 8 and {c["caption"] for c in captions} == {f"a {n} square" for n in COLORS}
    shard = cache / index.shards[0].file
    before = shard.stat().st_mtime_ns
    rc, err = _cli("t2i", "cache", "--data", cache.parent / "data", "--model", cache.parent / "ae",
                   "--text-encoder", all_minilm_l6_v2(), "-o", cache, "--resolution", 32,
                   "--max-tokens", 16)  # fmt: skip
    assert rc == 0, err
    assert shard.stat().st_mtime_ns == before  # the same plan: shards on disk are kept, not recomputed


def _state(out: Path) -> dict:
    ck = torch.load(list_checkpoints(out)[-1], weights_only=True)
    return {"model": ck["model"], "ema": ck["ema"], "step": ck["step"]}


def _same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and all(torch.equal(a[p][k], b[p][k]) for p in ("model", "ema") for k in a[p])


def test_train_resume_equals_uninterrupted_run(cache, tmp_path):
    full = train(load_config(None, _overrides(cache, tmp_path / "full")), progress=False)
    assert full["step"] == 4 and np.isfinite(full["loss"])
    train(load_config(None, _overrides(cache, tmp_path / "split", max_steps=2)), progress=False)
    train(load_config(None, _overrides(cache, tmp_path / "split")), progress=False)
    assert _same(_state(tmp_path / "full"), _state(tmp_path / "split"))
    other = tmp_path / "other"
    train(load_config(None, _overrides(cache, other, seed=1)), progress=False)
    assert not _same(_state(tmp_path / "full"), _state(other))  # the comparison above can fail
    assert (tmp_path / "full" / "samples" / "step_0000004.png").is_file()  # decoded grid of the fixed prompt


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(cache, tmp_path):
    def cmd(out, steps):
        return [sys.executable, "-m", "dcae.cli", "t2i", "train", "--quiet",
                *_overrides(cache, out, max_steps=steps, **{"checkpoint.every": 1, "log.every": 5})]  # fmt: skip

    subprocess.run(cmd(tmp_path / "straight", 12), env=ENV, check=True, capture_output=True)
    proc = subprocess.Popen(cmd(tmp_path / "killed", 12), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(tmp_path / "killed")) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(tmp_path / "killed"), "no checkpoint before the kill"
    subprocess.run(cmd(tmp_path / "killed", 12), env=ENV, check=True, capture_output=True)
    assert _same(_state(tmp_path / "straight"), _state(tmp_path / "killed"))


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    train(load_config(None, _overrides(cache, out, max_steps=2)), progress=False)
    return out


def test_sample_from_prompts_is_seeded_per_image(trained, tmp_path):
    common = ["t2i", "sample", "--ckpt", trained, "--prompt", "a red square", "--prompt", "a blue square",
              "--steps", 2, "--size", "32x32"]  # fmt: skip
    assert _cli(*common, "-o", tmp_path / "a", "--batch-size", 2)[0] == 0
    assert _cli(*common, "-o", tmp_path / "b", "--batch-size", 1)[0] == 0
    for name in ("000000.png", "000001.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / "images" / name)) for d in ("a", "b"))
        assert a.shape == (32, 32, 3) and np.array_equal(a, b)  # image i does not depend on the batch size
    meta = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert meta["prompts"] == ["a red square", "a blue square"] and (tmp_path / "a" / "grid.png").is_file()
    assert _cli(*common[:-2], "--size", "32x64", "-o", tmp_path / "wide")[0] == 0  # another aspect ratio
    assert np.asarray(Image.open(tmp_path / "wide" / "images" / "000000.png")).shape == (32, 64, 3)


def test_bad_input_is_refused_by_name(trained, tmp_path):
    rc, err = _cli("t2i", "sample", "--ckpt", trained, "--prompt", "  ", "-o", tmp_path / "o")
    assert rc == 2 and "empty" in err
    (tmp_path / "p.txt").write_text("# only a comment\n\n")
    rc, err = _cli("t2i", "sample", "--ckpt", trained, "--prompts", tmp_path / "p.txt", "-o", tmp_path / "o")
    assert rc == 2 and "p.txt holds no prompts" in err
    _roberta(tmp_path / "narrow")  # a 32-wide text encoder for a model trained on 384-wide MiniLM tokens
    rc, err = _cli("t2i", "sample", "--ckpt", trained, "--prompt", "a red square", "--text-encoder",
                   tmp_path / "narrow", "-o", tmp_path / "o")  # fmt: skip
    assert rc == 2 and "32-wide" in err and "384" in err
    other = tiny_autoencoder()
    other.config.scaling_factor = 0.25
    other.save_pretrained(tmp_path / "other_ae")
    rc, err = _cli("t2i", "sample", "--ckpt", trained, "--prompt", "x", "--autoencoder", tmp_path / "other_ae",
                   "-o", tmp_path / "o")  # fmt: skip
    assert rc == 2 and "scaling factor 0.25" in err and "0.5" in err
    rc, err = _cli("t2i", "sample", "--ckpt", trained, "--prompt", "x", "--size", "30x32", "-o", tmp_path / "o")
    assert rc == 2 and "multiples of 4" in err
    assert not (tmp_path / "o" / "images").exists()  # nothing written by any of them


def _png(folder: Path, i: int = 0) -> np.ndarray:
    return np.asarray(Image.open(folder / "images" / f"{i:06d}.png").convert("RGB"))


def _close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    """The same picture within 1 uint8 level on > 99.9% of values (as tests/test_sana_diffusers_parity.py)."""
    assert ours.shape == theirs.shape, what
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    print(f"{what}: max {diff.max()} levels, {(diff > 0).mean():.3%} of values differ")
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, what


@pytest.mark.parametrize("solver,shift", [("euler", 1.0), ("dpm++", 2.0)])
def test_export_to_diffusers_and_sample_the_pipeline_like_the_checkpoint(trained, tmp_path, solver, shift):
    """`dcae t2i export` writes a SanaPipeline folder; `dcae t2i sample --ckpt` (the scheduler export writes for
    the solver and shift), `--model FOLDER` and diffusers' SanaPipeline on the folder (seed S, the record's
    max_sequence_length, no instruction, no binning) give the same picture; so does `generate` (Python)."""
    diffusers = pytest.importorskip("diffusers")
    from dcae.diffusion.t2i import generate

    assert _cli("t2i", "export", "--ckpt", trained, "-o", tmp_path / "pipe", "--solver", solver, "--shift",
                shift)[0] == 0  # fmt: skip
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    pipe = diffusers.SanaPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    prompt, seed = "a green square", 5
    for steps in (2, 4):
        same = ["--prompt", prompt, "--steps", steps, "--cfg", 2.0, "--size", "32x32", "--seed", seed]
        ckpt, model = tmp_path / f"ckpt{steps}", tmp_path / f"model{steps}"
        assert _cli("t2i", "sample", "--ckpt", trained, *same, "--solver", solver, "--shift", shift, "-o", ckpt)[0] == 0
        assert _cli("t2i", "sample", "--model", tmp_path / "pipe", *same, "-o", model)[0] == 0
        a, b = _png(ckpt), _png(model)
        assert np.array_equal(a, b), steps  # the same sampler, scheduler and noise
        assert a.std() > 1  # a picture
        image = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), height=32, width=32,
                     num_inference_steps=steps, guidance_scale=2.0, use_resolution_binning=False,
                     max_sequence_length=index["_dcae"]["max_tokens"], complex_human_instruction=None,
                     output_type="np").images[0]  # fmt: skip
        _close(b, (image * 255).round().astype(np.uint8), f"{solver} {steps} steps vs diffusers")
        (made,) = generate(tmp_path / "pipe", prompt, seed=seed, steps=steps, guidance_scale=2.0, height=32, width=32)
        assert np.array_equal(np.asarray(made), b)
    (made,) = generate(trained, [prompt], seed=seed, steps=4, guidance_scale=2.0, height=32, solver=solver,
                       shift=shift)  # fmt: skip
    assert np.array_equal(np.asarray(made), _png(tmp_path / "ckpt4"))
    rc, err = _cli("t2i", "export", "--ckpt", trained, "-o", tmp_path / "pipe")
    assert rc == 2 and "pipe" in err  # an existing pipeline is not overwritten silently


@pytest.mark.slow
def test_two_processes_split_the_prompts_and_make_the_same_images(trained, tmp_path):
    """Under torchrun each process makes every second image; the images equal what one process makes."""
    from test_train_helpers import torchrun_dcae

    common = ["t2i", "sample", "--ckpt", str(trained), "--prompt", "a red square", "--prompt", "a blue square",
              "--prompt", "a green square", "--steps", "2", "--size", "32x32", "--batch-size", "1"]  # fmt: skip
    assert _cli(*common, "-o", tmp_path / "one")[0] == 0
    proc = subprocess.run([*torchrun_dcae(), *common, "-o", str(tmp_path / "two")], env=ENV, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in [f"images/{i:06d}.png" for i in range(3)] + ["grid.png"]:
        a, b = (np.asarray(Image.open(tmp_path / d / name)) for d in ("one", "two"))
        assert np.array_equal(a, b), name
