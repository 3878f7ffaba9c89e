"""Streaming metric accumulators: `update(...)` per batch, `merge(other)`, `all_reduce()` across
torch.distributed processes, `compute()` at the end.

Every accumulator keeps only sums (float64), so merging shards, batches or processes in any order gives
the same result as one pass. Training validation builds one `ReconstructionMetrics` per rank, calls
`update(real_u8, recon_u8, latents)` per batch, then `all_reduce()` and `compute()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from dcae.errors import UserError
from dcae.metrics.data import iterate_batches
from dcae.metrics.fid import FEATURE_DIM, GaussianStats, fid_from_stats, fid_method_used
from dcae.metrics.lpips_tiled import lpips_any_size
from dcae.metrics.psnr_ssim import psnr_per_image, ssim_per_image


class Accumulator:
    """Base: subclasses list their float64 sum tensors in `_state_names`."""

    _state_names: tuple[str, ...] = ()

    def _states(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self._state_names]

    def merge(self, other: Accumulator) -> Accumulator:
        """Add another accumulator's sums into this one (same type and shape); returns self."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for mine, theirs in zip(self._states(), other._states(), strict=True):
            mine += theirs.to(mine.device)
        return self

    def all_reduce(self, group=None) -> Accumulator:
        """Sum the state over all processes of a torch.distributed group (in place); returns self."""
        all_reduce_sum(self._states(), group)
        return self


def all_reduce_sum(tensors: list[torch.Tensor], group=None) -> None:
    """In-place SUM all-reduce of float64 tensors as one flat buffer (one collective, any backend)."""

    if not (dist.is_available() and dist.is_initialized()) or not tensors:
        return
    backend = dist.get_backend(group)
    # NCCL only reduces CUDA tensors; gloo and friends take CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class MeanAccumulator(Accumulator):
    """Mean (and standard deviation) of per-image values.

    NaN marks an image the metric is not defined for (smaller than its window, e.g. SSIM below 6 px):
    such values are left out of the mean and counted in `num_na` instead. +inf (PSNR of identical
    images) is a value and makes the mean +inf."""

    _state_names = ("count", "total", "total_sq", "na")

    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros((), dtype=torch.float64)
        self.total_sq = torch.zeros((), dtype=torch.float64)
        self.na = torch.zeros((), dtype=torch.float64)

    def add(self, values: torch.Tensor) -> torch.Tensor:
        """Add a batch of per-image values; returns them (float64, CPU), NaN where not defined."""
        values = values.detach().to(torch.float64).reshape(-1).cpu()
        defined = values[~values.isnan()]
        self.na += values.numel() - defined.numel()
        self.count += defined.numel()
        self.total += defined.sum()
        self.total_sq += defined.pow(2).sum()
        return values

    @property
    def num_na(self) -> int:
        return int(self.na)

    def compute(self) -> float:
        """Mean over the images the metric is defined for; NaN if there are none."""
        return float(self.total / self.count) if self.count > 0 else math.nan

    def std(self) -> float:
        if self.count < 2:
            return math.nan
        mean = self.total / self.count
        return float(((self.total_sq - self.count * mean**2) / (self.count - 1)).clamp(min=0).sqrt())


class _PairMetric(MeanAccumulator):
    """Mean of a per-image metric of (reference, test) uint8 batches; `update` returns the values."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def update(self, ref_u8: torch.Tensor, test_u8: torch.Tensor) -> torch.Tensor:
        return self.add(type(self).fn(ref_u8, test_u8))


class PSNRAccumulator(_PairMetric):
    fn = staticmethod(psnr_per_image)


class SSIMAccumulator(_PairMetric):
    fn = staticmethod(ssim_per_image)


class LPIPSAccumulator(MeanAccumulator):
    """Mean LPIPS of uint8 pairs with a given network (`dcae.metrics.lpips.LPIPS`); `name` labels it."""

    def __init__(self, lpips) -> None:
        super().__init__()
        self.lpips = lpips
        self.name = lpips.name

    @torch.no_grad()
    def update(self, ref_u8: torch.Tensor, test_u8: torch.Tensor) -> torch.Tensor:
        """NaN for images below the network's minimum size; large images are tiled (bounded memory)."""

        return self.add(lpips_any_size(self.lpips, ref_u8, test_u8))  # uint8 in: mapped to [-1, 1] inside

    def merge(self, other: Accumulator) -> Accumulator:
        if isinstance(other, LPIPSAccumulator) and other.name != self.name:
            raise ValueError(f"cannot merge LPIPS from {other.name} into {self.name}")
        return super().merge(other)


class FeatureStatsAccumulator(Accumulator):
    """Sum and sum of outer products of feature vectors (float64) -> Gaussian mean / covariance.

    Up to `keep_features` vectors are also kept as they are, so that FID of small sets (validation
    during training) uses the exact low-rank formula instead of a 2048 x 2048 matrix square root.
    """

    _state_names = ("count", "total", "outer")

    def __init__(self, dim: int = FEATURE_DIM, keep_features: int = FEATURE_DIM) -> None:
        self.dim = dim
        self.keep_features = keep_features
        self.count = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.features: list[torch.Tensor] | None = []

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().to("cpu", torch.float64).reshape(-1, self.dim)
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f
        self._keep([f])

    def _keep(self, parts: list[torch.Tensor] | None) -> None:
        if self.features is None or parts is None or int(self.count) > self.keep_features:
            self.features = None
        else:
            self.features += parts

    def merge(self, other: Accumulator) -> Accumulator:
        super().merge(other)
        self._keep(other.features)
        return self

    def all_reduce(self, group=None) -> Accumulator:
        super().all_reduce(group)
        self.gather_features(group)
        return self

    def gather_features(self, group=None) -> None:
        """After the sums are reduced: collect every rank's kept features (or drop them all)."""

        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        gathered: list = [None] * world
        mine = None if self.features is None else torch.cat(self.features) if self.features else None
        dist.all_gather_object(gathered, ("none",) if self.features is None else ("ok", mine), group=group)
        if any(g[0] == "none" for g in gathered) or int(self.count) > self.keep_features:
            self.features = None
        else:
            self.features = [g[1] for g in gathered if g[1] is not None]

    def compute(self, meta: dict | None = None) -> GaussianStats:
        """Mean and unbiased covariance (N - 1, as numpy.cov and pytorch-fid)."""
        n = int(self.count)
        if n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {n}")
        mu = self.total / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        factor = None
        if self.features is not None and self.features:
            factor = ((torch.cat(self.features) - mu) / math.sqrt(n - 1)).numpy()
        return GaussianStats(mu.numpy(), sigma.numpy(), n, dict(meta or {}), factor)


class LatentStatsAccumulator(Accumulator):
    """Mean, RMS and std over all latent elements; the implied scaling factor is 1 / RMS (no shift),
    the convention of DC-AE's `scaling_factor`."""

    _state_names = ("count", "total", "total_sq")

    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros((), dtype=torch.float64)
        self.total_sq = torch.zeros((), dtype=torch.float64)

    def update(self, latents: torch.Tensor) -> None:
        z = latents.detach().to(torch.float64)
        self.count += z.numel()
        self.total += z.sum().cpu()
        self.total_sq += z.pow(2).sum().cpu()

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {"latent_mean": math.nan, "latent_rms": math.nan, "latent_std": math.nan}
        mean = self.total / self.count
        ms = self.total_sq / self.count
        rms = float(ms.sqrt())
        return {
            "latent_mean": float(mean),
            "latent_rms": rms,
            "latent_std": float((ms - mean**2).clamp(min=0).sqrt()),
            "implied_scaling_factor": 1.0 / rms if rms > 0 else math.inf,
        }


class ReconstructionMetrics:
    """All reconstruction metrics of one model on one data set, accumulated batch by batch.

    `inception` (a `dcae.metrics.fid.InceptionFeatures`) and `lpips` are optional. If `real_stats` is
    given (e.g. cached reference statistics) real images are not passed through Inception again.
    """

    def __init__(self, lpips=None, inception=None, real_stats: GaussianStats | None = None) -> None:
        self.psnr = PSNRAccumulator()
        self.ssim = SSIMAccumulator()
        self.lpips = LPIPSAccumulator(lpips) if lpips is not None else None
        self.inception = inception
        self.real_stats = real_stats
        self.fake_features = FeatureStatsAccumulator() if inception is not None else None
        need_real = inception is not None and real_stats is None
        self.real_features = FeatureStatsAccumulator() if need_real else None
        self.latents = LatentStatsAccumulator()

    def _parts(self) -> list[Accumulator]:
        parts = [self.psnr, self.ssim, self.lpips, self.fake_features, self.real_features, self.latents]
        return [p for p in parts if p is not None]

    def update(self, real_u8: torch.Tensor, recon_u8: torch.Tensor, latents: torch.Tensor | None = None) -> dict:
        """Add one batch; returns the per-image values (float64 numpy arrays) for reporting."""
        out = {"psnr": self.psnr.update(real_u8, recon_u8).numpy(), "ssim": self.ssim.update(real_u8, recon_u8).numpy()}
        if self.lpips is not None:
            out["lpips"] = self.lpips.update(real_u8, recon_u8).numpy()
        if self.inception is not None:
            self.fake_features.update(self.inception(recon_u8))
            if self.real_features is not None:
                self.real_features.update(self.inception(real_u8))
        if latents is not None:
            self.latents.update(latents)
        return out

    def merge(self, other: ReconstructionMetrics) -> ReconstructionMetrics:
        for mine, theirs in zip(self._parts(), other._parts(), strict=True):
            mine.merge(theirs)
        return self

    def all_reduce(self, group=None) -> ReconstructionMetrics:
        all_reduce_sum([t for p in self._parts() for t in p._states()], group)  # one collective for all sums
        for part in self._parts():
            if isinstance(part, FeatureStatsAccumulator):  # and the kept features of the exact low-rank FID
                part.gather_features(group)
        return self

    def reference_stats(self) -> GaussianStats | None:
        if self.real_stats is not None:
            return self.real_stats
        return self.real_features.compute() if self.real_features is not None else None

    def compute(self, fid_method: str = "auto") -> dict:
        """Summary dict: psnr, ssim, lpips (+ lpips_net), fid, latent stats, num_images; `ssim_num_na` /
        `lpips_num_na` count the images too small for that metric (left out of its mean)."""
        res: dict = {
            "num_images": int(self.psnr.count + self.psnr.na),
            "psnr": self.psnr.compute(),
            "ssim": self.ssim.compute(),
            "ssim_num_na": self.ssim.num_na,  # images too small for SSIM, left out of its mean
        }
        if self.lpips is not None:
            res.update(lpips=self.lpips.compute(), lpips_net=self.lpips.name, lpips_num_na=self.lpips.num_na)
        if self.fake_features is not None and int(self.fake_features.count) >= 2:
            ref = self.reference_stats()
            fake = self.fake_features.compute()
            res["fid"] = fid_from_stats(ref, fake, method=fid_method)
            res["fid_method"] = fid_method_used(ref, fake, fid_method)
            res["fid_num_images"] = int(min(ref.count or fake.count, fake.count))
        if int(self.latents.count) > 0:
            res.update(self.latents.compute())
        return res


# ----------------------------------------------------------------------------- data sets
def dataset_stats(
    refs,
    inception,
    resolution: int | None = None,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
    desc: str = "inception",
) -> tuple[GaussianStats, list[dict]]:
    """Inception statistics of images (`dcae.metrics.data.ImageRef`s; `inception`: a
    `dcae.metrics.fid.InceptionFeatures`); resolution=None feeds each image at its own size (resized to 299
    alone), else ADM center crop first. Returns (stats, skipped)."""

    acc = FeatureStatsAccumulator()
    skipped: list[dict] = []
    with tqdm(total=len(refs), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in iterate_batches(refs, resolution, batch_size, workers):
            skipped += [{"name": refs[i].name, "error": err} for i, err in batch.errors]
            if batch.indices:
                acc.update(inception(batch.images))
            bar.update(len(batch.indices) + len(batch.errors))
    if int(acc.count) < 2:
        raise UserError(f"FID needs at least 2 readable images, found {int(acc.count)} of {len(refs)}")
    meta = {"resolution": resolution, "crop": "adm-center" if resolution else "none", **inception.protocol}
    return acc.compute(meta), skipped
