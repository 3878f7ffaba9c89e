"""Writes the legacy training checkpoints in this folder, with the code as it was at commit 679cd50 (before
the shared training runtime). Kept so that anyone can see how they were made; running it again with later code
would make *new* checkpoints, which is not what the legacy tests are about.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1 python tests/data/legacy/make_legacy.py

What it writes (all tiny, CPU):
- ae/phase1/checkpoints/step_00000001.pt: an autoencoder phase-1 run of 2 steps, stopped after step 1 (EMA on);
  ae/final_ema.safetensors / final_raw.safetensors: what the uninterrupted run ends with (step 2).
- diffusion/checkpoints/step_0000001.pt: a DiT run of 2 steps stopped after step 1 (class-conditional);
  diffusion/latents/: the latents it trains on; diffusion/final.pt: model and EMA of the uninterrupted step 2.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/ for the shared tiny configs


def make_ae(tmp: Path) -> None:
    from test_train_helpers import tiny_config

    from dcae.train.config import load_config
    from dcae.train.trainer import train

    photos = tmp / "photos"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    cfg = tiny_config(tmp / "ae", [str(photos)])
    cfg["model"]["config"] = {"name": "legacy-f4c8", "latent_channels": 8, "encoder_widths": [8, 16, 16],
                              "encoder_depths": [0, 1, 1], "encoder_block_types": ["ResBlock"] * 3,
                              "decoder_widths": [8, 16, 16], "decoder_depths": [0, 1, 1],
                              "decoder_block_types": ["ResBlock"] * 3, "decoder_norms": ["bn2d"] * 3,
                              "decoder_acts": ["silu"] * 3}  # fmt: skip
    cfg["data"]["holdout"] = 0
    cfg["val"]["max_images"] = 0
    cfg["phase1"]["steps"] = 2
    train(load_config(cfg), phases=[1])
    out = HERE / "ae"
    shutil.rmtree(out, ignore_errors=True)
    (out / "phase1" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp / "ae" / "phase1" / "checkpoints" / "step_00000001.pt", out / "phase1" / "checkpoints")
    shutil.copytree(photos, out / "photos")
    final = torch.load(tmp / "ae" / "phase1" / "checkpoints" / "step_00000002.pt", weights_only=True)
    save_file({k: v.contiguous() for k, v in final["model"].items()}, str(out / "final_raw.safetensors"))
    save_file({k: v.contiguous() for k, v in final["ema"]["shadow"].items()}, str(out / "final_ema.safetensors"))


def make_diffusion(tmp: Path) -> None:
    from dcae.diffusion.trainer import load_config, train
    from test_diffusion_latents import tiny_autoencoder

    from dcae.diffusion.c2i.latents import extract_latents

    ae_dir = tmp / "aemodel"
    tiny_autoencoder().save_pretrained(ae_dir)
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp / "data" / c).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp / "data" / c / f"{i}.png")
    out = HERE / "diffusion"
    shutil.rmtree(out, ignore_errors=True)
    extract_latents(tiny_autoencoder(), tmp / "data", out / "latents", model_name="tiny-f4c8", resolution=16,
                    flip=False, num_workers=0, progress=False)  # fmt: skip
    overrides = [f"data={out / 'latents'}", f"out={tmp / 'run'}", "batch_size=4", "max_steps=2", "log_every=1",
                 "ckpt_every=1", "keep_last=2", "mixed_precision=no", "num_workers=0", "sample.every=0",
                 "sample.decode=false", "sample.steps=2", "sample.num=2", "optim.lr=1e-3",
                 "model.overrides={depth: 1, hidden_size: 16, num_heads: 2}"]  # fmt: skip
    train(load_config(None, overrides), progress=False)
    (out / "checkpoints").mkdir()
    shutil.copy(tmp / "run" / "checkpoints" / "step_0000001.pt", out / "checkpoints")
    final = torch.load(tmp / "run" / "checkpoints" / "step_0000002.pt", weights_only=True)
    torch.save({"model": final["model"], "ema": final["ema"]}, out / "final.pt")


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        make_ae(Path(d) / "a")
        make_diffusion(Path(d) / "d")
    print("written under", HERE)
