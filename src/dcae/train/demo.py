"""A few-minute CPU demo of the three training phases, on photos that ship with scikit-image.

    from dcae.train.demo import train_demo
    result = train_demo("demo_out/train", minutes=4)

Trains the packaged `tiny` config (a ~1M-parameter f32 DC-AE) through phase 1 (64 px, all parameters),
phase 2 (128 px, latent-adjacent layers) and phase 3 (64 px, decoder head + GAN), each phase stopped by
wall time, then reconstructs two held-out photos (coffee, rocket) before and after training.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dcae.models import DCAE
from dcae.runtime.checkpoint import seed_everything
from dcae.train import monitor
from dcae.train.config import load_config
from dcae.train.data import list_items, load_val_images
from dcae.train.trainer import build_model, train

# Share of the time budget per phase: phase 1 does the heavy lifting.
PHASE_SHARE = {1: 0.7, 2: 0.15, 3: 0.15}
EVAL_RESOLUTION = 128


def train_demo(
    out_dir: str | Path, minutes: float = 4.0, seed: int = 0, progress: bool = True, threads: int | None = None
) -> dict[str, Any]:
    """Train for about `minutes` of wall time (plus ~20 s of evaluation and export), print held-out
    PSNR/SSIM before and after, write a side-by-side PNG. Returns the numbers and file paths.

    `threads`: torch intra-op threads during the demo (None: see `demo_threads`)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or demo_threads())
    try:
        return _train_demo(Path(out_dir), minutes, seed, progress)
    finally:
        torch.set_num_threads(previous_threads)


def demo_threads() -> int:
    """Intra-op threads for the tiny demo model. Its ops are so small that OpenMP threads mostly wait on
    each other; when other processes also want the cores, every op waits for a descheduled thread and a
    step gets ~100x slower (measured here: 17 ms with 1 thread vs 7 s with 2 on a busy 2-core machine).
    So: all cores only when the machine looks idle."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] > 0.5
    except OSError:  # not available on this platform
        busy = True
    return 1 if busy or cores <= 1 else min(cores, torch.get_num_threads())


def _train_demo(out: Path, minutes: float, seed: int, progress: bool) -> dict[str, Any]:

    t0 = time.time()
    for n in PHASE_SHARE:  # a previous demo in the same folder: start over (only the demo's own phase folders)
        if (out / f"phase{n}" / "trainable.txt").is_file():
            shutil.rmtree(out / f"phase{n}")
    # Time-bounded phases: a constant LR after warmup (a cosine needs a known horizon).
    overrides = [
        f"seed={seed}",
        "num_workers=0",  # decoding cached photos is cheap; a worker would only compete for 2 cores
        f"log.progress={progress}",
        "log.image_every=0",
        "checkpoint.every=1000000",
        f"val.resolutions=[{EVAL_RESOLUTION}]",
    ]
    for n, share in PHASE_SHARE.items():
        overrides += [f"phase{n}.steps=100000", f"phase{n}.max_minutes={minutes * share}"]
        overrides += [f"phase{n}.optim.schedule=constant"]
    cfg = load_config("tiny", overrides)
    cfg.out_dir = str(out)

    held_out, _ = load_val_images(list_items(cfg.data.val), max_images=8)
    seed_everything(cfg.seed)
    untrained = build_model(cfg)  # the same weights phase 1 starts from (same seed, same order)
    before = monitor.evaluate(untrained, held_out, EVAL_RESOLUTION)

    result = train(cfg, phases=[1, 2, 3], resume=False)

    trained = DCAE.from_pretrained(result["model"])
    after = monitor.evaluate(trained, held_out, EVAL_RESOLUTION)

    rows = [("original", []), ("before", []), ("after", [])]
    for model, row in ((untrained, rows[1][1]), (trained, rows[2][1])):
        for ref, rec in monitor.reconstruct_batches(model.eval(), held_out, EVAL_RESOLUTION, 8, "cpu"):
            row += [t.float() / 127.5 - 1 for t in rec]
            if not rows[0][1]:
                rows[0][1].extend(t.float() / 127.5 - 1 for t in ref)
    image = monitor.side_by_side(rows, out / "before_after.png")

    numbers = {
        "psnr_before": round(before["psnr"], 3),
        "ssim_before": round(before["ssim"], 4),
        "psnr_after": round(after["psnr"], 3),
        "ssim_after": round(after["ssim"], 4),
        "resolution": EVAL_RESOLUTION,
        "held_out": [it.key for it in list_items(cfg.data.val)],
        "steps": {n: m.get("steps") for n, m in result["phases"].items()},
        "minutes": round((time.time() - t0) / 60, 2),
        "image": str(image),
        "model": str(result["model"]),
        "loss_curves": str(out / "loss_curves.png"),
        "phases": result["phases"],
    }
    print(
        f"held-out photos ({', '.join(numbers['held_out'])}, {EVAL_RESOLUTION} px): "
        f"PSNR {numbers['psnr_before']:.2f} -> {numbers['psnr_after']:.2f} dB, "
        f"SSIM {numbers['ssim_before']:.3f} -> {numbers['ssim_after']:.3f}; "
        f"rows original / before / after: {image}"
    )
    return numbers


if __name__ == "__main__":
    import sys

    train_demo(sys.argv[1] if len(sys.argv) > 1 else "demo_out/train", float(sys.argv[2]) if len(sys.argv) > 2 else 4.0)
