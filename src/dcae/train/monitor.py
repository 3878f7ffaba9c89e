"""Seeing progress: CSV (+ TensorBoard) logs, held-out PSNR/SSIM, reconstruction grids, loss curves."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from dcae.data.images import center_crop_arr, make_grid, save_image, uint8_to_tensor
from dcae.utils.io import atomic_path

LOG_COLUMNS = (
    "step",
    "time_s",
    "lr",
    "img_per_s",
    "loss",
    "rec",
    "l1",
    "l2",
    "lpips",
    "g_loss",
    "gan_weight",
    "d_loss",
    "logits_real",
    "logits_fake",
    "skipped",
    "val_psnr",
    "val_ssim",
    "val_lpips",
)
CURVES = ("loss", "l1", "l2", "lpips", "g_loss", "d_loss", "val_psnr")


class Logger:
    """One CSV per phase (rewritten up to the resume step, then appended) and optional TensorBoard."""

    def __init__(self, folder: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = folder / "log.csv"
        folder.mkdir(parents=True, exist_ok=True)
        rows = read_log(self.path) if resume_step is not None else []
        rows = [r for r in rows if r["step"] <= (resume_step or 0)]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(v) for k, v in r.items() if k in LOG_COLUMNS})
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow({k: _fmt(row.get(k)) for k in LOG_COLUMNS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v: float | None) -> str:
    if v is None or v == "":
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def read_log(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def reconstruct_batches(
    model: torch.nn.Module, images: list[np.ndarray], resolution: int, batch_size: int, device, latents: bool = False
):
    """Yield (originals uint8 (B,3,R,R), reconstructions uint8[, latents]) for ADM-center-cropped images."""
    from dcae.metrics.psnr_ssim import quantize

    crops = [center_crop_arr(a, resolution) for a in images]
    for i in range(0, len(crops), batch_size):
        chunk = crops[i : i + batch_size]
        x = torch.stack([uint8_to_tensor(c) for c in chunk]).to(device)
        z = model.encode(x)
        rec = model.decode(z)[..., :resolution, :resolution]
        out = (quantize(x).cpu(), quantize(rec).cpu())
        yield (*out, z) if latents else out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: list[np.ndarray],
    resolution: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    lpips: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Held-out PSNR / SSIM (uint8, per image then averaged: the DC-AE protocol), optional LPIPS, and
    latent statistics (RMS, implied scaling factor), with the evaluation engineer's accumulators."""
    from dcae.metrics.accumulate import ReconstructionMetrics

    was_training = model.training
    model.eval()
    metrics = ReconstructionMetrics(lpips=lpips)
    for ref, rec, z in reconstruct_batches(model, images, resolution, batch_size, device, latents=True):
        metrics.update(ref, rec, z)
    model.train(was_training)
    return {"resolution": resolution, **metrics.compute()}


@torch.no_grad()
def save_recon_grid(
    model: torch.nn.Module, images: list[np.ndarray], resolution: int, path: Path, device, batch_size: int = 8
) -> Path:
    """Originals (top row) above their reconstructions (bottom row)."""
    was_training = model.training
    model.eval()
    refs, recs = [], []
    for ref, rec in reconstruct_batches(model, images, resolution, batch_size, device):
        refs.append(ref)
        recs.append(rec)
    model.train(was_training)
    ref, rec = torch.cat(refs), torch.cat(recs)
    tiles = [t.float() / 127.5 - 1 for t in (*ref, *rec)]
    return save_image(make_grid(tiles, nrow=len(ref)), path)


def side_by_side(pairs: list[tuple[str, list[torch.Tensor]]], path: Path) -> Path:
    """Rows of equally sized [-1, 1] images, one labelled row per entry (labels go in the file name
    order; rows: e.g. original / before training / after training)."""
    n = len(pairs[0][1])
    tiles = [t for _, row in pairs for t in row]
    return save_image(make_grid(tiles, nrow=n), path)


# ----------------------------------------------------------------------------- plots
def plot_curves(logs: dict[str, list[dict[str, float]]], path: Path, title: str = "") -> Path | None:
    """Loss curves (one panel per quantity) from one or more phases' CSV rows, phases side by side
    on a shared step axis. Matplotlib with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CURVES if any(k in r for rows in logs.values() for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    offset = 0.0
    for phase, rows in logs.items():
        if not rows:
            continue
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"] + offset, r[k]) for r in rows if k in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=phase, marker="." if len(pts) < 20 else None)
        offset += max(r["step"] for r in rows)
        for ax in axes[0]:
            if len(logs) > 1:
                ax.axvline(offset, color="gray", lw=0.5, ls="--")
    for ax, k in zip(axes[0], keys):
        ax.set_title(k)
        ax.set_xlabel("step")
        if k not in ("g_loss", "val_psnr") and all(r[k] > 0 for rows in logs.values() for r in rows if k in r):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path
