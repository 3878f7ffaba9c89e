"""A run killed with SIGKILL after a checkpoint and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train_helpers import tiny_config, write_photos

from dcae.runtime import checkpoint as state


def _train_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dcae.cli", "train", str(config), "--out", str(out), *extra]


def _assert_same(a, b, where: str) -> None:
    """Recursive torch.equal over nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    photos = write_photos(tmp_path / "photos", n=10)
    cfg = tiny_config(tmp_path / "unused", [str(photos)])
    cfg["num_workers"] = 1  # worker processes must not change what a resumed run sees
    cfg["data"]["scale_range"] = [1.0, 1.5]
    cfg["phase1"]["steps"] = 4
    cfg["phase2"]["steps"] = 2
    cfg["phase3"]["steps"] = 40  # long enough that the kill lands mid-phase
    cfg["phase3"]["optim"] = {"warmup_steps": 3, "schedule": "cosine"}
    cfg["checkpoint"] = {"every": 2, "keep_last": 2}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    # One thread each: two runs share the cores, and oversubscribed OpenMP is pathologically slow.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    reference = subprocess.Popen(_train_cmd(config, straight), env=env, stdout=subprocess.DEVNULL)
    victim = subprocess.Popen(_train_cmd(config, killed), env=env, stdout=subprocess.DEVNULL)
    marker = killed / "phase3" / "checkpoints" / "step_00000002.pt"
    deadline = time.time() + 600
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "phase3" / "metrics.json").exists()

    resumed = subprocess.run(_train_cmd(config, killed, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed phase 3" in resumed.stdout + resumed.stderr
    assert reference.wait() == 0

    for n in (1, 2, 3):
        a = state.load_checkpoint(state.latest_checkpoint(straight / f"phase{n}" / "checkpoints"))
        b = state.load_checkpoint(state.latest_checkpoint(killed / f"phase{n}" / "checkpoints"))
        for key in ("step", "data", "model", "optimizer", "disc", "disc_optimizer", "ema", "scaler", "rng"):
            _assert_same(a[key], b[key], f"phase{n}.{key}")
        from safetensors.torch import load_file

        wa = load_file(straight / f"phase{n}" / "model" / "model.safetensors")
        wb = load_file(killed / f"phase{n}" / "model" / "model.safetensors")
        _assert_same(wa, wb, f"phase{n} export")
    assert a["step"] == 40 and a["data"]["batches_consumed"] == 40


def test_checkpoint_rng_state_round_trips_and_loads_weights_only(tmp_path):
    """RNG states are stored as tensors and plain types, so checkpoints load with weights_only=True
    (a downloaded checkpoint cannot run code), and restoring them replays the same random numbers."""
    import random

    np.random.seed(3)
    random.seed(3)
    torch.manual_seed(3)
    path = state.save_checkpoint({"rng": state.rng_state(), "step": 7}, state.checkpoint_path(tmp_path, 7), keep_last=2)
    expected = (np.random.rand(4), random.random(), torch.rand(3))
    np.random.rand(10), random.random(), torch.rand(10)  # move every generator on
    state.set_rng_state(state.load_checkpoint(path)["rng"])
    again = (np.random.rand(4), random.random(), torch.rand(3))
    assert np.array_equal(expected[0], again[0]) and expected[1] == again[1] and torch.equal(expected[2], again[2])


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    from argparse import Namespace  # any class outside the weights-only allow list

    path = tmp_path / "step_00000001.pt"
    torch.save({"step": 1, "payload": Namespace(a=1)}, path)
    with pytest.raises(Exception, match=r"cannot read training checkpoint .*step_00000001\.pt"):
        state.load_checkpoint(path)
