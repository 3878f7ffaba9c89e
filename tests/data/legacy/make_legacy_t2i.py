# ruff: noqa: E501
"""Writes the legacy text-to-image cache and run in t2i/, with the code as it was at commit dfb2e3f (before the
typed latent-cache record: format dcae-text-latents/1, the autoencoder recorded as the path typed, the caption
width recorded three times in a checkpoint). Kept so that anyone can see how they were made; running it again
with later code would make *new* files, which is not what the legacy tests are about.

    cd tests/data/legacy/t2i && OMP_NUM_THREADS=1 python ../make_legacy_t2i.py

What it writes (all tiny, CPU), relative to t2i/:
- data/: 4 coloured squares with sidecar captions; ae/: a tiny f4 autoencoder;
- cache/: `dcae t2i cache --model ae` (32 px buckets, all-MiniLM-L6-v2, 16 tokens);
- run/checkpoints/step_0000001.pt: a SANA-tiny run of 2 steps stopped after step 1; final.pt: model and EMA of
  the uninterrupted step 2.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path.cwd()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ for the shared tiny autoencoder


def overrides(steps: int) -> list[str]:
    return [
        f"{k}={v}"
        for k, v in {
            "data": "cache",
            "out": "run",
            "model.name": "SANA-tiny",
            "batch_size": 2,
            "max_steps": steps,
            "log_every": 1,
            "model.overrides": "{num_layers: 1, num_attention_heads: 1, attention_head_dim: 16, num_cross_attention_heads: 1, "
            "cross_attention_head_dim: 16}",
            "ckpt_every": 1,
            "keep_last": 5,
            "mixed_precision": "no",
            "num_workers": 0,
            "sample.every": 0,
            "sample.decode": "false",
            "sample.num": 1,
            "sample.steps": 1,
            "optim.lr": "1e-3",
            "tensorboard": "false",
        }.items()
    ]


def main() -> None:
    from test_diffusion_latents import tiny_autoencoder

    from dcae.cli import main as dcae
    from dcae.diffusion.t2i.encoders import all_minilm_l6_v2
    from dcae.diffusion.train.config import load_config
    from dcae.diffusion.train.loop import train

    torch.manual_seed(0)
    (HERE / "data").mkdir()
    for i, (name, c) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 2):
        Image.fromarray(np.full((32, 32, 3), c, np.uint8)).save(HERE / "data" / f"{i}.png")
        (HERE / "data" / f"{i}.txt").write_text(f"a {name} square")
    tiny_autoencoder().save_pretrained(HERE / "ae")
    assert (
        dcae(
            [
                "t2i",
                "cache",
                "--data",
                "data",
                "--model",
                "ae",
                "--text-encoder",
                str(all_minilm_l6_v2()),
                "-o",
                "cache",
                "--resolution",
                "32",
                "--max-tokens",
                "16",
            ]
        )
        == 0
    )
    train(load_config(None, overrides(2)), progress=False)
    final = torch.load(HERE / "run" / "checkpoints" / "step_0000002.pt", weights_only=False)
    torch.save({"model": final["model"], "ema": final["ema"]}, HERE / "final.pt")
    (HERE / "run" / "checkpoints" / "step_0000002.pt").unlink()
    shutil.rmtree(HERE / "run" / "samples", ignore_errors=True)
    (HERE / "run" / "loss.png").unlink()


if __name__ == "__main__":
    main()
