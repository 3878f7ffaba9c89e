"""Resolution buckets: training on several aspect ratios at about the same number of pixels, as PixArt and
SANA do.

`bucket_table(R, patch_multiple)`: the sizes (h, w) on a grid of about R/16 (a multiple of `patch_multiple`,
the autoencoder's downsampling factor times the network's patch size: 32 for f32 DC-AE with patch 1, 64 for
f64) with 0.9 R^2 <= h w <= R^2 (never more pixels than the square) and aspect ratios from 1:4 to 4:1. At
256, 512 and 1024 this holds every entry of diffusers' PixArt / SANA ASPECT_RATIO_*_BIN tables and 8 more:
the transpose of their 0.52 bucket (1.91: 1344x704 at 1024), in none of their tables, and the 7 that
PixArt's / SANA's full ASPECT_RATIO_1024 has but the binning tables leave out (0.26, 0.27, 2.89, 3.11,
3.62, 3.75, 3.88); at 2048 and 4096 diffusers' tables are the full ones, ours again adds 1.91.

`assign_buckets(sizes, R, patch_multiple)`: each image's bucket, the one closest to its upright aspect ratio
(`image_sizes`: from the headers, EXIF orientation applied), compared in log aspect so that an image and its
transpose get transposed buckets (diffusers' `classify_height_width_bin` compares h/w with keys rounded to
two decimals; the choice differs only near the middle between two buckets).

`resize_to_bucket(arr, (h, w))`: resize so that the image covers the bucket, then center-crop.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from dcae.data.images import ImageReadError
from dcae.data.sources import Skipped, read_size, record_skip


def bucket_table(
    base_resolution: int,
    patch_multiple: int = 32,
    *,
    step: int | None = None,
    min_area: float = 0.9,
    max_aspect: float = 4.0,
) -> tuple[tuple[int, int], ...]:
    """Bucket sizes (height, width) for `base_resolution` R, by aspect ratio h/w ascending: every h, w on
    a grid of `step` with min_area * R^2 <= h * w <= R^2 and 1/max_aspect <= h/w <= max_aspect (one size
    per aspect ratio: the largest). `step` defaults to about R/16 (PixArt's grid: 32 at 512, 64 at 1024),
    rounded down to a multiple of `patch_multiple`, the autoencoder's factor times the patch size."""
    if base_resolution <= 0 or patch_multiple <= 0:
        raise ValueError(f"base_resolution and patch_multiple must be positive ({base_resolution}, {patch_multiple})")
    if step is None:
        step = patch_multiple * max(1, base_resolution // 16 // patch_multiple)
    if step % patch_multiple:
        raise ValueError(f"step {step} is not a multiple of patch_multiple {patch_multiple}")
    area = base_resolution**2
    best: dict[tuple[int, int], tuple[int, int]] = {}  # reduced aspect -> size
    for h in range(step, math.isqrt(int(area * max_aspect)) + step, step):
        for w in range(step * max(1, math.ceil(min_area * area / h / step)), area // h + 1, step):
            if min_area * area <= h * w <= area and h <= max_aspect * w and w <= max_aspect * h:
                g = math.gcd(h, w)
                if best.get((h // g, w // g), (0, 0))[0] < h:
                    best[(h // g, w // g)] = (h, w)
    if not best:
        raise ValueError(f"no bucket of about {base_resolution}^2 pixels on a grid of {step}")
    return tuple(sorted(best.values(), key=lambda s: s[0] / s[1]))


def assign_buckets(
    sizes: Iterable[tuple[int, int] | None],
    base_resolution: int,
    patch_multiple: int = 32,
    *,
    table: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int] | None]:
    """The bucket (height, width) of each image size (height, width), upright as `image_sizes` gives them:
    the one of `table` (default `bucket_table(base_resolution, patch_multiple)`) closest in log aspect
    ratio, so an image and its transpose get transposed buckets; halfway between two: the squarer. None
    stays None."""
    table = sorted(table or bucket_table(base_resolution, patch_multiple), key=lambda s: s[0] / s[1])
    logs = [math.log(h / w) for h, w in table]
    out: list[tuple[int, int] | None] = []
    for size in sizes:
        if size is None:
            out.append(None)
            continue
        h, w = size
        if h <= 0 or w <= 0:
            raise ValueError(f"image size {size} is not positive")
        a = math.log(h / w)
        i = bisect.bisect_left(logs, a)
        near = [j for j in (i - 1, i) if 0 <= j < len(table)]
        out.append(tuple(table[min(near, key=lambda j: (abs(logs[j] - a), abs(logs[j])))]))
    return out


def resize_to_bucket(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> the bucket's (height, width): resized (bicubic, antialiased) so that it covers the
    bucket, then center-cropped; done as one resize of the central region with the bucket's aspect ratio
    (sub-pixel box), so a long strip is never enlarged whole."""
    bh, bw = size
    h, w = arr.shape[:2]
    if (h, w) == (bh, bw):
        return arr
    if w * bh > h * bw:  # wider than the bucket: cut the sides
        cw = h * bw / bh
        box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
    else:
        ch = w * bh / bw
        box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
    return np.asarray(Image.fromarray(arr).resize((bw, bh), resample=Image.BICUBIC, box=box))


def image_sizes(items: Sequence) -> list[tuple[int, int] | None]:
    """The upright (height, width) of each image (`ImageRef`s, or records with a `.ref` such as
    `captions.Captioned`) from its header (`sources.read_size`); None for one that cannot be read, named in a
    warning and added to `items.skipped` when the list has one (ImageList, CaptionList)."""
    skipped = getattr(items, "skipped", None)
    sizes: list[tuple[int, int] | None] = []
    for item in items:
        ref = getattr(item, "ref", item)
        try:
            sizes.append(tuple(read_size(ref)))
        except ImageReadError as exc:
            record_skip(skipped, Skipped(ref.name, str(exc)))
            sizes.append(None)
    return sizes
