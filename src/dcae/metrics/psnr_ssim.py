"""PSNR and SSIM per image on uint8 images, as the DC-AE evaluation protocol computes them.

Both take (B, 3, H, W) uint8 tensors (reference, test) and return one float64 value per image; the
data set score is the plain mean over images (`accumulate.PSNRAccumulator` / `SSIMAccumulator`).

Both work on images of any size in bounded memory: they read the images in bands of rows and keep
only sums, so an 8K pair needs a few hundred MB at most beyond the two uint8 images.

- PSNR: exact integer sum of squared errors, 10 log10(255^2 / MSE); identical images give +inf.
- SSIM: torchmetrics' definition (see `ssim_per_image`); an image with a side below `SSIM_MIN_SIZE`
  has no SSIM under that definition and gets NaN ("n/a"), which the accumulators leave out of means
  and count separately.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DATA_RANGE = 255.0
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# torchmetrics' gaussian window: int(3.5 * sigma + 0.5) * 2 + 1 = 11 taps for sigma 1.5.
SSIM_WINDOW = int(3.5 * SSIM_SIGMA + 0.5) * 2 + 1
SSIM_PAD = (SSIM_WINDOW - 1) // 2
# torchmetrics reflect-pads by 5 px, which needs at least 6 rows and columns; below that it raises.
SSIM_MIN_SIZE = SSIM_PAD + 1
# Channel-pixels of one PSNR band: a few int32 / int64 copies of 1M values, about 16 MB.
PSNR_BAND_PIXELS = 2**20
# Working set of one SSIM band (float64 maps of one image): bounds memory for any image size.
BAND_BYTES = 256 * 2**20


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


def _band_rows(row_bytes: int, halo: int = 0) -> int:
    return max(1, BAND_BYTES // max(row_bytes, 1) - halo)


# ----------------------------------------------------------------------------------------- PSNR
def psnr_per_image(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image from the MSE over all pixels and channels; identical images give +inf.

    The squared errors are summed as integers (exact) over bands of rows, so memory stays bounded."""
    ref, test = _check_pair(ref, test)
    b, c, h, w = ref.shape
    rows = max(1, PSNR_BAND_PIXELS // max(c * w, 1))
    sse = torch.zeros(b, dtype=torch.int64)
    for r0 in range(0, h, rows):
        d = ref[:, :, r0 : r0 + rows].to(torch.int32).sub_(test[:, :, r0 : r0 + rows])
        sse += d.square_().flatten(1).sum(dim=1)  # integer sums accumulate in int64: exact
    mse = sse.to(torch.float64) / max(c * h * w, 1)
    with np.errstate(divide="ignore"):
        return 10.0 * torch.log10(DATA_RANGE**2 / mse)


# ----------------------------------------------------------------------------------------- SSIM
def _gaussian_taps() -> torch.Tensor:
    """torchmetrics' `_gaussian(11, 1.5)` in float64 (its 2-D window is the outer product of this)."""
    dist = torch.arange((1 - SSIM_WINDOW) / 2, (1 + SSIM_WINDOW) / 2, 1, dtype=torch.float64)
    gauss = torch.exp(-torch.pow(dist / SSIM_SIGMA, 2) / 2)
    return gauss / gauss.sum()


def _reflect_index(n: int, start: int, stop: int) -> torch.Tensor:
    """Indices of rows start..stop-1 of an axis of length n reflect-padded by SSIM_PAD (F.pad 'reflect')."""
    i = torch.arange(start - SSIM_PAD, stop - SSIM_PAD)
    i = i.abs()  # -k -> k
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def _banded(n_out: int, taps: torch.Tensor) -> torch.Tensor:
    """(n_out, n_out + len(taps) - 1) matrix whose rows are the shifted taps: 'valid' correlation."""
    band = torch.zeros(n_out, n_out + len(taps) - 1, dtype=taps.dtype)
    for i in range(n_out):
        band[i, i : i + len(taps)] = taps
    return band


def _filter(maps: torch.Tensor, taps: torch.Tensor, dim: int, block: int = 32) -> torch.Tensor:
    """'valid' 1-D correlation along `dim` (-1 or -2) as small banded-matrix GEMMs over blocks of
    `block` outputs: float64 GEMM is several times faster than 11 shifted multiply-adds or conv2d."""
    k = len(taps)
    n = maps.shape[dim] - k + 1
    shape = list(maps.shape)
    shape[dim] = n
    out = torch.empty(shape, dtype=maps.dtype)
    full = _banded(block, taps)
    for o0 in range(0, n, block):
        m = min(block, n - o0)
        band = full if m == block else _banded(m, taps)
        src = maps.narrow(dim, o0, m + k - 1)
        res = torch.matmul(band, src) if dim == -2 else torch.matmul(src, band.T)
        out.narrow(dim, o0, m).copy_(res)
    return out


def _ssim_band_sum(ref: torch.Tensor, test: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    """Sum of the SSIM map over one band; ref/test (C, H, W) uint8, rows/cols the padded indices."""
    x = test.index_select(1, rows).index_select(2, cols).to(torch.float64)  # preds, as torchmetrics names it
    y = ref.index_select(1, rows).index_select(2, cols).to(torch.float64)
    maps = torch.empty((5, *x.shape), dtype=torch.float64)
    maps[0], maps[1] = x, y
    torch.mul(x, x, out=maps[2])
    torch.mul(y, y, out=maps[3])
    torch.mul(x, y, out=maps[4])
    del x, y
    taps = _gaussian_taps()
    mu_x, mu_y, e_xx, e_yy, e_xy = _filter(_filter(maps, taps, -2), taps, -1)
    del maps
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    # The operations of torchmetrics' `_ssim_update`, in its order (in place where that changes nothing).
    mu_xx, mu_yy, mu_xy = mu_x.pow(2), mu_y.pow(2), mu_x * mu_y
    var_x = e_xx.sub_(mu_xx).clamp_(min=0.0)
    var_y = e_yy.sub_(mu_yy).clamp_(min=0.0)
    upper = e_xy.sub_(mu_xy).mul_(2).add_(c2)
    lower = var_x.add_(var_y).add_(c2)
    num = mu_xy.mul_(2).add_(c1).mul_(upper)
    den = mu_xx.add_(mu_yy).add_(c1).mul_(lower)
    return float(num.div_(den).sum())


def _ssim_one(ref: torch.Tensor, test: torch.Tensor) -> float:
    c, h, w = ref.shape
    if min(h, w) < SSIM_MIN_SIZE:
        return math.nan
    cols = _reflect_index(w, 0, w + 2 * SSIM_PAD)
    # about 24 float64 rows of (C, W + 10) live per band row: inputs, 5 maps, 2 filter passes, formula
    rows_per_band = min(256, _band_rows(24 * c * (w + 2 * SSIM_PAD) * 8, 2 * SSIM_PAD))
    total = 0.0
    for r0 in range(0, h, rows_per_band):
        r1 = min(h, r0 + rows_per_band)
        total += _ssim_band_sum(ref, test, _reflect_index(h, r0, r1 + 2 * SSIM_PAD), cols)
    return total / (c * h * w)


def ssim_per_image(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """SSIM per image, torchmetrics' `structural_similarity_index_measure(test, ref)` with a gaussian
    window (11 taps, sigma 1.5), data range 255, k1 0.01, k2 0.03, in float64: reflect padding by 5 px,
    the SSIM map over the full H x W image (padded border included, as torchmetrics 1.x does), its
    mean over pixels and channels. Computed in bands of rows with separable filtering, so memory does
    not grow with the image. An image with a side below `SSIM_MIN_SIZE` (6 px) gets NaN ("n/a")."""
    ref, test = _check_pair(ref, test)
    values = [_ssim_one(ref[i], test[i]) for i in range(ref.shape[0])]
    return torch.tensor(values, dtype=torch.float64)


def image_psnr_ssim(a, b) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two HxWx3 uint8 images, as the evaluation protocol computes them, in
    bounded memory at any size. PSNR is +inf for identical images; SSIM is NaN (not defined) for an
    image with a side below 6 px."""
    return float(psnr_per_image(a, b)[0]), float(ssim_per_image(a, b)[0])


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], the input range of LPIPS and the autoencoders."""
    return images.to(torch.float32) / 127.5 - 1.0


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8, rounded exactly like `dcae.data.images.tensor_to_uint8`."""
    return ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
