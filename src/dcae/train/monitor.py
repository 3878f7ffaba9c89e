"""Seeing an autoencoder learn: the columns of its log (written by dcae.runtime.log), held-out PSNR/SSIM and
reconstruction grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dcae.data.images import center_crop_arr, make_grid, save_image, uint8_to_tensor
from dcae.metrics.accumulate import ReconstructionMetrics
from dcae.metrics.psnr_ssim import quantize

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
# The quantities plotted as loss curves.
CURVES = ("loss", "l1", "l2", "lpips", "g_loss", "d_loss", "val_psnr")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def reconstruct_batches(
    model: torch.nn.Module, images: list[np.ndarray], resolution: int, batch_size: int, device, latents: bool = False
):
    """Yield (originals uint8 (B,3,R,R), reconstructions uint8[, latents]) for ADM-center-cropped images."""

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
