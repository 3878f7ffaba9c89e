"""Two-process DDP training on CPU (gloo), launched like a real multi-GPU run: `torchrun -m dcae.cli train`."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import yaml
from test_train_helpers import tiny_config, torchrun_dcae, write_photos

from dcae.models import DCAE
from dcae.runtime import checkpoint as state
from dcae.train.config import load_config


def _torchrun(config, *args: str) -> subprocess.CompletedProcess:
    cmd = [*torchrun_dcae(), "train", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_grad_accum(tmp_path):
    """`torchrun --nproc_per_node 2 dcae train` (DDP, gloo) and one process with grad_accum=2 see the same
    images in the same slots, so all three phases (phase 3 with the discriminator and the adaptive GAN
    weight) take the same optimizer steps, up to the summation order of the gradients: every parameter,
    the discriminator and the EMA weights agree to 1e-6.

    The model here has RMS norms only. With BatchNorm the running statistics differ, as in any DDP job:
    DDP keeps rank 0's (it broadcasts its buffers at every forward) where accumulation updates them with
    every micro-batch; phases 2 and 3 then start from those statistics (docs/training.md)."""
    from dcae.train.trainer import train

    photos = write_photos(tmp_path / "photos", n=10)  # 8 train (2 held out): 2 global batches of 4 per epoch
    runs = {}
    for label, accum in (("ddp", 1), ("accum", 2)):
        cfg = tiny_config(tmp_path / label, [str(photos)], grad_accum=accum)
        cfg["phase1"]["steps"], cfg["phase2"]["steps"], cfg["phase3"]["steps"] = 3, 2, 2
        for n in (1, 2, 3):  # the global batch: 2 processes x 1 accumulation x 2 = 1 process x 2 accumulation x 2
            cfg[f"phase{n}"]["batch_size"] = 4
        cfg["model"]["latent_channel_choices"] = [4, 8]  # per-slot draws must match too
        cfg["model"]["config"]["decoder_norms"] = ["trms2d"] * 6
        cfg["model"]["config"].update(encoder_out_shortcut=False, encoder_sliceable_out=True,
                                      decoder_in_shortcut=False, decoder_sliceable_in=True)  # fmt: skip
        config = tmp_path / f"{label}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        runs[label] = tmp_path / label
        if label == "ddp":
            proc = _torchrun(config, "--phase", "all")
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
            assert "2 process(es) (DistributedType.MULTI_CPU" in proc.stdout
            assert "batch 4 = 2 processes x 1 accumulation x 2" in proc.stdout
        else:
            train(load_config(cfg), phases=[1, 2, 3])
    for n, steps in ((1, 3), (2, 2), (3, 2)):
        ck = {k: state.load_checkpoint(state.latest_checkpoint(runs[k] / f"phase{n}" / "checkpoints")) for k in runs}
        assert ck["ddp"]["step"] == ck["accum"]["step"] == steps
        assert ck["ddp"]["data"]["batches_consumed"] == steps and ck["accum"]["data"]["batches_consumed"] == 2 * steps
        assert ck["ddp"]["data"]["micro_batch"] == ck["accum"]["data"]["micro_batch"] == 2
        for part in ("model", "ema", "disc"):
            if ck["ddp"][part] is None:
                assert ck["accum"][part] is None
                continue
            ref, got = ck["accum"][part], ck["ddp"][part]
            assert ref.keys() == got.keys()
            for name in ref:
                # The discriminator's BatchNorm statistics are rank 0's under DDP (see above); it always runs in
                # train mode, on batch statistics, so they never enter a result.
                if part == "disc" and name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    continue
                torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=f"phase {n} {part} {name}")
        losses = [json.loads((runs[k] / f"phase{n}" / "metrics.json").read_text()) for k in runs]
        assert losses[0]["steps"] == losses[1]["steps"] == steps
    DCAE.from_pretrained(runs["ddp"] / "phase3" / "model")
