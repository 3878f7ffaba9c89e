"""PSNR and SSIM per image on uint8 images, as the DC-AE evaluation protocol computes them.

Both take (B, 3, H, W) uint8 tensors (reference, test) and return one float64 value per image; the
data set score is the plain mean over images (`accumulate.PSNRAccumulator` / `SSIMAccumulator`).
"""

from __future__ import annotations

import numpy as np
import torch

DATA_RANGE = 255.0


def as_uint8_batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, 3, H, W) uint8 tensor from a uint8 tensor/array in NCHW, or NHWC / HWC numpy arrays."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images (quantize reconstructions first), got {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(t.shape)}")
    if t.shape[1] != 3 and t.shape[-1] == 3:  # channels-last numpy layout
        t = t.permute(0, 3, 1, 2)
    return t


def _check_pair(ref: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ref, test = as_uint8_batch(ref), as_uint8_batch(test)
    if ref.shape != test.shape:
        raise ValueError(f"image shapes differ: {tuple(ref.shape)} vs {tuple(test.shape)}")
    return ref, test


def psnr_per_image(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, MSE over all pixels and channels in float64; identical images give inf."""
    ref, test = _check_pair(ref, test)
    diff = ref.to(torch.float64) - test.to(torch.float64)
    mse = diff.pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)


def ssim_per_image(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """SSIM per image: torchmetrics' SSIM (gaussian 11 px, sigma 1.5, data range 255), in float64."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    ref, test = _check_pair(ref, test)
    return structural_similarity_index_measure(
        test.to(torch.float64),
        ref.to(torch.float64),
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=DATA_RANGE,
        reduction="none",
    )


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], the input range of LPIPS and the autoencoders."""
    return images.to(torch.float32) / 127.5 - 1.0


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8, rounded exactly like `dcae.data.images.tensor_to_uint8`."""
    return ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
