"""Reconstruction evaluation of an autoencoder (the DC-AE protocol): ADM center crop, encode, decode,
uint8 quantization, then rFID / PSNR / SSIM / LPIPS, latent statistics and throughput.

Any autoencoder with `encode(x) -> z` and `decode(z) -> x` (x in [-1, 1]) can be evaluated; DC-AE
models and diffusers autoencoders (AutoencoderKL, AutoencoderDC, AutoencoderTiny, ...) are wrapped by
`load_autoencoder`.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dcae.data.images import make_grid
from dcae.errors import UserError
from dcae.metrics.accumulate import ReconstructionMetrics
from dcae.metrics.data import Batch, ImageRef, dataset_id, iterate_batches
from dcae.metrics.fid import GaussianStats, StatsCache, stats_cache_key
from dcae.metrics.psnr_ssim import quantize, to_unit_range
from dcae.models import DCAE
from dcae.models.fast import compile_dcae
from dcae.models.finite import checked_by_caller


@runtime_checkable
class Autoencoder(Protocol):
    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LoadedAutoencoder:
    """An autoencoder behind plain tensor functions, with what the report needs to know about it."""

    name: str
    module: nn.Module
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    scaling_factor: float | None = None
    spatial_compression: int | None = None

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


# ----------------------------------------------------------------------------------------- models
def _diffusers_latent(out) -> torch.Tensor:
    """The deterministic latent of any diffusers encoder output (mode of a KL posterior)."""
    if isinstance(out, torch.Tensor):
        return out
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        return dist.mode()
    for attr in ("latent", "latents"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    if isinstance(out, tuple) and out:
        first = out[0]
        return first.mode() if hasattr(first, "mode") else first
    raise UserError(f"cannot find the latent in a diffusers encoder output of type {type(out).__name__}")


def _diffusers_image(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    return sample if sample is not None else out[0]


def wrap_autoencoder(module: nn.Module, name: str | None = None) -> LoadedAutoencoder:
    """Wrap a DCAE, a diffusers autoencoder, or any module with encode/decode."""
    if not isinstance(module, Autoencoder):
        raise UserError(f"{type(module).__name__} has no encode/decode methods")
    name = name or getattr(getattr(module, "config", None), "name", None) or type(module).__name__
    config = getattr(module, "config", None)
    if type(module).__module__.startswith("diffusers"):
        return LoadedAutoencoder(
            name,
            module,
            lambda x: _diffusers_latent(module.encode(x)),
            lambda z: _diffusers_image(module.decode(z)),
            getattr(config, "scaling_factor", None),
            _diffusers_compression(module),
        )
    sf = getattr(module, "scaling_factor", None) or getattr(config, "scaling_factor", None)
    return LoadedAutoencoder(
        name, module, module.encode, module.decode, sf, getattr(module, "spatial_compression", None)
    )


def _diffusers_compression(module: nn.Module) -> int | None:
    config = module.config
    if hasattr(module, "spatial_compression_ratio"):
        return int(module.spatial_compression_ratio)
    blocks = getattr(config, "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else None


def load_diffusers_autoencoder(path: str) -> nn.Module:
    """Any diffusers autoencoder folder: the class is read from config.json's `_class_name`."""
    import diffusers

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"diffusers:{path}: no config.json in {folder} (expected a diffusers model folder)")
    class_name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UserError(f"diffusers:{path}: unknown model class {class_name!r}")
    return cls.from_pretrained(str(folder))


def load_autoencoder(
    spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, compiled: bool = False
) -> LoadedAutoencoder:
    """`diffusers:PATH` for a diffusers folder; `config:NAME_OR_FILE` for a randomly initialised DC-AE
    (timing only); anything else goes to `DCAE.from_pretrained` (zoo name, Hub id, folder, file).
    compiled: `dcae.models.fast.compile_dcae` for DC-AE models (others run as they are)."""
    if spec.startswith("diffusers:"):
        module = load_diffusers_autoencoder(spec[len("diffusers:") :])
    elif spec.startswith("config:"):
        warnings.warn(f"{spec}: randomly initialised weights; the metrics only test the pipeline", stacklevel=2)
        module = DCAE.from_config(spec[len("config:") :])
    else:
        module = DCAE.from_pretrained(spec)
    module = module.to(device=device)
    if next(module.parameters()).dtype != dtype:  # diffusers warns about any dtype cast, even a no-op
        module = module.to(dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    if compiled:
        if isinstance(module, DCAE):
            compile_dcae(module)
        else:
            warnings.warn(f"{spec}: --compile applies to DC-AE models only; this one runs uncompiled", stacklevel=2)
    return wrap_autoencoder(module, spec)


# ----------------------------------------------------------------------------------------- results
@dataclass(order=True)
class _Ranked:
    key: float
    index: int
    name: str = field(compare=False)
    psnr: float = field(compare=False)
    real: torch.Tensor = field(compare=False, repr=False)
    recon: torch.Tensor = field(compare=False, repr=False)


class Extremes:
    """The k best and k worst reconstructions by PSNR, kept with their pixels for a side-by-side PNG."""

    def __init__(self, k: int = 4) -> None:
        self.k = k
        self._best: list[_Ranked] = []  # min-heap on PSNR: the weakest of the best on top
        self._worst: list[_Ranked] = []  # min-heap on -PSNR

    def add(self, index: int, name: str, psnr: float, real: torch.Tensor, recon: torch.Tensor) -> None:
        p = psnr if math.isfinite(psnr) else 1e9
        self._push(self._best, _Ranked(p, -index, name, psnr, real, recon))  # ties: keep the earlier file
        self._push(self._worst, _Ranked(-p, -index, name, psnr, real, recon))

    def merge(self, other: Extremes) -> Extremes:
        """Keep the k best and worst of both (another process's share of the images)."""
        for item in other._best:
            self._push(self._best, item)
        for item in other._worst:
            self._push(self._worst, item)
        return self

    def _push(self, heap: list[_Ranked], item: _Ranked) -> None:
        if self.k <= 0:
            return
        if len(heap) < self.k:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)

    def best(self) -> list[_Ranked]:
        return sorted(self._best, reverse=True)

    def worst(self) -> list[_Ranked]:
        return sorted(self._worst, reverse=True)

    def grid(self) -> torch.Tensor | None:
        """Rows of [worst original | worst reconstruction | best original | best reconstruction]."""

        worst, best = self.worst(), self.best()
        if not worst:
            return None
        tiles = []
        for w, b in zip(worst, best):
            tiles += [to_unit_range(t) for t in (w.real, w.recon, b.real, b.recon)]
        return make_grid(tiles, nrow=4)


@dataclass
class EvalResult:
    summary: dict
    per_image: list[dict]
    skipped: list[dict]
    extremes: Extremes
    reference_stats: GaussianStats | None = None


# ----------------------------------------------------------------------------------------- loop
@dataclass
class EvalSettings:
    resolution: int = 256
    batch_size: int = 8
    workers: int = 0
    fid_method: str = "auto"
    keep_extremes: int = 4
    progress: bool = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_cache_key(refs: Sequence[ImageRef], sources: Sequence[str], resolution: int, inception) -> str:
    protocol = {"resolution": resolution, "crop": "adm-center", **inception.protocol}
    return stats_cache_key(dataset_id(sources), [r.fingerprint() for r in refs], protocol)


def evaluate_reconstruction(
    model: LoadedAutoencoder,
    refs: Sequence[ImageRef],
    settings: EvalSettings,
    lpips: nn.Module | None = None,
    inception: nn.Module | None = None,
    reference_stats: GaussianStats | None = None,
    rank: int = 0,
    world: int = 1,
) -> EvalResult:
    """Run `model` over `refs` and accumulate every metric. `reference_stats` (real-image Inception
    statistics of exactly these files and protocol) skip the real-image Inception pass.

    With world > 1 (an initialised torch.distributed group), process `rank` takes every world-th image and
    every process returns the result of all images: sums are all-reduced, per-image rows, skipped files
    and extremes gathered back into file order."""

    metrics = ReconstructionMetrics(lpips=lpips, inception=inception, real_stats=reference_stats)
    extremes = Extremes(settings.keep_extremes)
    mine = list(range(rank, len(refs), world))  # global indices of this process's images
    local = [refs[i] for i in mine]
    per_image: list[tuple[int, dict]] = []
    skipped: list[tuple[int, dict]] = []
    device, dtype = model.device, model.dtype
    ae_time = 0.0
    show = settings.progress and rank == 0
    bar = tqdm(total=len(local), desc=model.name, unit="img", disable=not show, dynamic_ncols=True)
    start = time.perf_counter()
    for batch in iterate_batches(local, settings.resolution, settings.batch_size, settings.workers):
        skipped += [(mine[i], {"name": local[i].name, "error": err}) for i, err in batch.errors]
        if batch.indices:
            t0 = time.perf_counter()
            batch, z, recon, failed = _reconstruct_guarded(model, batch, device, dtype)
            _sync(device)
            ae_time += time.perf_counter() - t0
            skipped += [(mine[i], {"name": local[i].name, "error": f"{local[i].name}: {err}"}) for i, err in failed]
            if batch.indices:
                values = metrics.update(batch.images, recon, z)
                _record(batch, local, mine, values, recon, per_image, extremes)
        bar.update(len(batch.indices) + len(batch.errors))
    bar.close()
    elapsed = time.perf_counter() - start
    if world > 1:
        metrics.all_reduce()
        per_image, skipped, extremes, elapsed, ae_time = _gather(per_image, skipped, extremes, elapsed, ae_time)
    per_image = [row for _, row in sorted(per_image, key=lambda item: item[0])]
    skipped = [row for _, row in sorted(skipped, key=lambda item: item[0])]
    if not per_image:
        raise UserError(f"none of the {len(refs)} images could be evaluated; first problem: {skipped[0]['error']}")
    summary = _summary(model, metrics, settings, len(per_image), elapsed, ae_time, skipped)
    return EvalResult(summary, per_image, skipped, extremes, metrics.reference_stats())


@torch.no_grad()
def _reconstruct(model: LoadedAutoencoder, images_u8: torch.Tensor, device, dtype):
    """(latents, uint8 reconstructions, batch positions whose latents or reconstruction hold NaN/Inf)."""

    x = to_unit_range(images_u8).to(device=device, dtype=dtype)
    with checked_by_caller(model.module):  # non-finite outputs are reported by file by the caller
        z = model.encode(x)
        y = model.decode(z)[..., : x.shape[-2], : x.shape[-1]]
    finite = torch.isfinite(z).flatten(1).all(1) & torch.isfinite(y).flatten(1).all(1)
    bad = [j for j, ok in enumerate(finite.tolist()) if not ok]
    return z.float(), quantize(y.float().cpu()), bad


def _reconstruct_guarded(model: LoadedAutoencoder, batch, device, dtype):
    """(batch of the images that worked, their latents, their reconstructions, [(index, reason)] of the
    others): an image whose reconstruction fails or is not finite is skipped with the reason."""
    try:
        z, recon, bad = _reconstruct(model, batch.images, device, dtype)
    except Exception as exc:  # out of memory, or an input the model cannot take: image by image
        if len(batch.indices) == 1:
            lines = str(exc).strip().splitlines()
            reason = f"reconstruction failed ({type(exc).__name__}: {lines[0] if lines else ''})"
            return _take(batch, []), None, None, [(batch.indices[0], reason)]
        return _join([_reconstruct_guarded(model, _take(batch, [j]), device, dtype) for j in range(len(batch.indices))])
    reason = "the autoencoder's output is not finite (NaN/Inf); check the weights"
    keep = [j for j in range(len(batch.indices)) if j not in bad]
    return _take(batch, keep), z[keep], recon[keep], [(batch.indices[j], reason) for j in bad]


def _take(batch, js: list[int]):

    return Batch([batch.indices[j] for j in js], batch.images[js], [])


def _join(parts: list):
    """One result from the per-image results of `_reconstruct_guarded`."""

    ok = [p for p in parts if p[0].indices]
    failed = [f for p in parts for f in p[3]]
    if not ok:
        return parts[0][0], None, None, failed
    merged = Batch([i for p in ok for i in p[0].indices], torch.cat([p[0].images for p in ok]), [])
    return merged, torch.cat([p[1] for p in ok]), torch.cat([p[2] for p in ok]), failed


def _record(batch, refs, index, values: dict, recon: torch.Tensor, per_image: list, extremes: Extremes) -> None:
    """Per-image rows as (global index, row); refs[i] is global image index[i]."""
    for j, i in enumerate(batch.indices):
        row = {"name": refs[i].name, **{k: float(v[j]) for k, v in values.items()}}
        per_image.append((index[i], row))
        extremes.add(index[i], refs[i].name, row["psnr"], batch.images[j], recon[j])


def _gather(per_image: list, skipped: list, extremes: Extremes, elapsed: float, ae_time: float) -> tuple:
    """Every process's rows, skipped files and extremes; the slowest process's times (wall clock of the run)."""

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (per_image, skipped, extremes, elapsed, ae_time))
    merged = Extremes(extremes.k)
    for part in parts:
        merged.merge(part[2])
    return (
        [row for part in parts for row in part[0]],
        [row for part in parts for row in part[1]],
        merged,
        max(part[3] for part in parts),
        max(part[4] for part in parts),
    )


def _summary(model, metrics: ReconstructionMetrics, settings, n: int, elapsed: float, ae_time: float, skipped) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = metrics.compute(fid_method=settings.fid_method)
    fid_warnings = [str(w.message) for w in caught if "FID from" in str(w.message)]
    for w in caught:  # pass everything on to the caller's filters too
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    summary = {
        "model": model.name,
        **res,
        "images_per_s": n / elapsed if elapsed > 0 else math.nan,
        "ae_images_per_s": n / ae_time if ae_time > 0 else math.nan,
        "seconds": elapsed,
        "num_skipped": len(skipped),
        "resolution": settings.resolution,
        "batch_size": settings.batch_size,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "num_params": model.num_params,
        "configured_scaling_factor": model.scaling_factor,
        "spatial_compression": model.spatial_compression,
    }
    if fid_warnings:
        summary["fid_warning"] = fid_warnings[0]
    return summary


def cached_reference_stats(
    cache: StatsCache | None, refs: Sequence[ImageRef], sources: Sequence[str], resolution: int, inception
) -> tuple[str | None, GaussianStats | None]:
    """(key, stats) of the real-image statistics for these files, if cached."""
    if cache is None or inception is None:
        return None, None
    key = reference_cache_key(refs, sources, resolution, inception)
    return key, cache.get(key)


def summary_row(summary: dict) -> list[str]:
    def fmt(key: str, spec: str) -> str:
        v = summary.get(key)
        if v is None:
            return "-"
        if isinstance(v, float) and math.isnan(v):
            return "n/a"  # not defined for any image (e.g. all smaller than the SSIM window)
        return format(v, spec) + (f" ({summary[f'{key}_num_na']} n/a)" if summary.get(f"{key}_num_na") else "")

    lp = fmt("lpips", ".4f") + (f" ({summary['lpips_net']})" if "lpips_net" in summary else "")
    return [
        summary["model"],
        str(summary["num_images"]),
        fmt("fid", ".3f"),
        fmt("psnr", ".3f"),
        fmt("ssim", ".4f"),
        lp,
        fmt("latent_rms", ".4f"),
        fmt("implied_scaling_factor", ".4f"),
        fmt("images_per_s", ".2f"),
    ]


def markdown_table(summaries: Sequence[dict]) -> str:
    """One row per model: the comparison table written next to the JSON."""
    header = ["model", "images", "rFID", "PSNR", "SSIM", "LPIPS", "latent RMS", "implied scaling", "img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(summary_row(s)) + " |" for s in summaries]
    return "\n".join(lines) + "\n"


def per_image_csv(rows: Sequence[dict]) -> str:

    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return buf.getvalue()


def _csv_value(v):
    if not isinstance(v, float):
        return v
    return "n/a" if math.isnan(v) else f"{v:.6f}"  # NaN: the metric is not defined for this image


def as_json(summary: dict) -> dict:
    """JSON-safe copy: inf / nan -> null, numpy scalars -> Python."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out
