"""Two-process DDP training on CPU (gloo), launched like a real multi-GPU run: `torchrun -m dcae.cli train`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from test_train_helpers import tiny_config, write_photos

from dcae.models import DCAE
from dcae.train import state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_run_finishes_with_checkpoints(tmp_path):
    photos = write_photos(tmp_path / "photos", n=10)
    cfg = tiny_config(tmp_path / "run", [str(photos)], grad_accum=2, mixed_precision="bf16")
    cfg["phase1"]["steps"] = 3
    cfg["phase2"]["steps"] = 2
    cfg["phase3"]["steps"] = 2  # discriminator + adaptive GAN weight under DDP
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "dcae.cli",
        "train",
        str(config),
        "--phase",
        "all",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es) (DistributedType.MULTI_CPU" in proc.stdout
    assert "mixed precision bf16" in proc.stdout
    run = tmp_path / "run"
    for n, steps in ((1, 3), (2, 2), (3, 2)):
        ck = state.load_checkpoint(state.latest_checkpoint(run / f"phase{n}" / "checkpoints"))
        assert ck["step"] == steps
        # 2 processes x batch 2 per micro-batch: each process consumed grad_accum batches per step
        assert ck["data"]["batches_consumed"] == 2 * steps
        metrics = json.loads((run / f"phase{n}" / "metrics.json").read_text())
        assert metrics["steps"] == steps
    DCAE.from_pretrained(run / "phase3" / "model")
