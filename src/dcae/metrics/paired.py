"""Paired full-reference metrics between two image sets (`dcae metrics REF TEST`).

Files pair by relative path; what is left pairs by relative path without the extension (so
`a/x.JPEG` pairs with reconstructions saved as `a/x.png`). Unpaired files are counted, not errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dcae.data.images import ImageReadError, center_crop_arr
from dcae.data.sources import ImageRef, read_image
from dcae.metrics.accumulate import LPIPSAccumulator, PSNRAccumulator, SSIMAccumulator


@dataclass
class Pairing:
    pairs: list[tuple[ImageRef, ImageRef]]
    unmatched_ref: list[str]
    unmatched_test: list[str]


def _stem(name: str) -> str:
    head, dot, tail = name.rpartition(".")
    return head if dot and "/" not in tail else name


def pair_images(ref: Sequence[ImageRef], test: Sequence[ImageRef]) -> Pairing:
    """Pair by exact relative name, then by name without extension (first come, first paired)."""
    by_name = {r.name: r for r in test}
    pairs, rest_ref = [], []
    for r in ref:
        t = by_name.pop(r.name, None)
        if t is not None:
            pairs.append((r, t))
        else:
            rest_ref.append(r)
    by_stem: dict[str, ImageRef] = {}
    for t in by_name.values():
        by_stem.setdefault(_stem(t.name), t)
    unmatched_ref = []
    for r in rest_ref:
        t = by_stem.pop(_stem(r.name), None)
        if t is not None:
            pairs.append((r, t))
        else:
            unmatched_ref.append(r.name)
    paired_test = {t.name for _, t in pairs}
    unmatched_test = [t.name for t in test if t.name not in paired_test]
    return Pairing(pairs, unmatched_ref, unmatched_test)


@dataclass
class PairedResult:
    summary: dict
    per_image: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def _to_batch(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)[None]


def _load_pair(r: ImageRef, t: ImageRef, resolution: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = read_image(r), read_image(t)
    if resolution is not None:
        a, b = center_crop_arr(a, resolution), center_crop_arr(b, resolution)
    if a.shape != b.shape:
        raise ValueError(f"sizes differ: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]} (use --resolution)")
    return _to_batch(a), _to_batch(b)


def paired_metrics(
    pairing: Pairing, lpips: nn.Module | None = None, resolution: int | None = None, progress: bool = False
) -> PairedResult:
    """PSNR / SSIM / LPIPS per pair and their means; unreadable or size-mismatched pairs are skipped.
    A metric not defined for a pair (smaller than its window) is NaN in the row and counted in
    `<metric>_num_na` instead of entering the mean."""

    psnr, ssim = PSNRAccumulator(), SSIMAccumulator()
    lp = LPIPSAccumulator(lpips) if lpips is not None else None
    result = PairedResult({})
    for r, t in tqdm(pairing.pairs, desc="pairs", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            a, b = _load_pair(r, t, resolution)
        except (ImageReadError, ValueError) as exc:
            result.skipped.append({"name": r.name, "error": str(exc)})
            continue
        row = {"name": r.name, "test": t.name, "psnr": float(psnr.update(a, b)[0]), "ssim": float(ssim.update(a, b)[0])}
        if lp is not None:
            row["lpips"] = float(lp.update(a, b)[0])
        result.per_image.append(row)
    result.summary = {
        "num_pairs": len(result.per_image),
        "psnr": psnr.compute(),
        "ssim": ssim.compute(),
        "ssim_num_na": ssim.num_na,  # pairs too small for SSIM (NaN in their rows), left out of the mean
        **({"lpips": lp.compute(), "lpips_net": lp.name, "lpips_num_na": lp.num_na} if lp is not None else {}),
        "num_skipped": len(result.skipped),
        "unmatched_ref": len(pairing.unmatched_ref),
        "unmatched_test": len(pairing.unmatched_test),
        "resolution": resolution,
    }
    return result
