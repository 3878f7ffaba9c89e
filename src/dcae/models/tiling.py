"""Seamless tiled encode/decode: bounded memory for any image size and every compression factor.

How it works, per axis (the 2-D plan is the product of two 1-D plans):
- tiles of `tile` pixels (a multiple of the compression factor f, so every tile maps to whole
  latent pixels) whose starts are spread evenly over the image, each overlapping its neighbour by at
  least `overlap` pixels; the last tile ends exactly at the image border, so an f128 decode of a
  1024 px image gives 1024 px (diffusers' 448 px stride is not a multiple of 128 and gives 1152).
- each tile's output gets a weight profile that ramps (raised cosine) from ~0 to 1 across the
  overlap on the sides that have a neighbour, and stays 1 elsewhere; the profiles are normalised by
  their sum over all tiles, so the weights of every output pixel sum to exactly one, also where three
  tiles meet. A pixel that only one tile covers gets that tile's value unchanged.
- the weight map of a tile is the outer product of its two 1-D profiles: one multiply-add per tile
  (`addcmul_`) blends it into the output; no Python loop runs over pixels or rows.
- tiles of all images in the batch are stacked and run through the model together, as many per call
  as `max_batch_pixels` allows.

Why seams appear at all: DC-AE's linear attention is global, so a tile does not see the statistics of
the whole image and flat areas come out slightly different in neighbouring tiles. Long, smooth ramps
(256 px by default) spread that difference so it is not visible; short linear ramps (diffusers: 64 px)
leave a visible step on large flat areas at 4K.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Defaults: 1024 px tiles (a DC-AE's training resolution range) with 256 px of blending on each
# overlap. One 1024 px tile per model call keeps a 4096 px decode at about 1/10 of the untiled memory.
DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 256
DEFAULT_MAX_BATCH_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class TilingConfig:
    """Tile and overlap in image pixels (multiples of the compression factor); see `DCAE.enable_tiling`."""

    tile_size: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS

    def validated(self, factor: int) -> TilingConfig:
        """Round tile and overlap up to multiples of the compression factor and check them."""
        tile = _round_up(max(self.tile_size, factor), factor)
        overlap = _round_up(max(self.overlap, 0), factor)
        if overlap >= tile:
            raise ValueError(f"overlap ({overlap} px) must be smaller than the tile ({tile} px)")
        if self.max_batch_pixels <= 0:
            raise ValueError("max_batch_pixels must be positive")
        return TilingConfig(tile, overlap, self.max_batch_pixels)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tile_starts(length: int, tile: int, overlap: int, unit: int = 1) -> list[int]:
    """Starts of tiles of size `tile` covering [0, length), overlapping by >= `overlap`, multiples of `unit`.

    Tiles are spread evenly (the minimum number that keeps every overlap >= `overlap`); the first
    starts at 0 and the last ends at `length`. `length`, `tile` and `overlap` must be multiples of `unit`.
    """
    if length % unit or tile % unit or overlap % unit:
        raise ValueError(f"length {length}, tile {tile} and overlap {overlap} must be multiples of {unit}")
    if length <= tile:
        return [0]
    n_len, n_tile, n_over = length // unit, tile // unit, overlap // unit
    n = math.ceil((n_len - n_over) / (n_tile - n_over))
    # Rounding keeps every stride <= tile - overlap: the stride bound is an integer number of units.
    return [round(i * (n_len - n_tile) / (n - 1)) * unit for i in range(n)]


def ramp_profile(size: int, ramp: int, left: bool, right: bool) -> torch.Tensor:
    """1-D weights of one tile: raised-cosine ramps of `ramp` samples on the sides with a neighbour."""
    w = torch.ones(size, dtype=torch.float64)
    ramp = min(ramp, size // 2)
    if ramp > 0:
        t = (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp
        up = torch.sin(t * math.pi / 2) ** 2  # strictly positive: every covered pixel has weight > 0
        if left:
            w[:ramp] = up
        if right:
            w[size - ramp :] = up.flip(0)
    return w


def blend_profiles(length: int, starts: list[int], size: int, ramp: int) -> list[torch.Tensor]:
    """Per-tile 1-D weights on an output axis of `length`, normalised so that they sum to one everywhere."""
    n = len(starts)
    raw = [ramp_profile(size, ramp, i > 0, i < n - 1) for i in range(n)]
    total = torch.zeros(length, dtype=torch.float64)
    for s, w in zip(starts, raw):
        total[s : s + size] += w
    return [(w / total[s : s + size]).float() for s, w in zip(starts, raw)]


@dataclass(frozen=True)
class AxisPlan:
    starts_in: list[int]  # tile starts in input units
    size_in: int
    length_out: int
    starts_out: list[int]
    size_out: int
    weights: list[torch.Tensor]  # per tile, length size_out, summing to one over tiles at every position


def plan_axis(length_in: int, tile_in: int, overlap_in: int, unit_in: int, scale: float, ramp_out: int) -> AxisPlan:
    """Tiles along one axis; the output axis is the input axis times `scale` (f for decode, 1/f for encode)."""
    starts = tile_starts(length_in, tile_in, overlap_in, unit_in)
    size_in = min(tile_in, length_in)
    size_out, length_out = round(size_in * scale), round(length_in * scale)
    starts_out = [round(s * scale) for s in starts]
    weights = blend_profiles(length_out, starts_out, size_out, ramp_out)
    return AxisPlan(starts, size_in, length_out, starts_out, size_out, weights)


def tiled_apply(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    plan_h: AxisPlan,
    plan_w: AxisPlan,
    max_batch_pixels: int,
    pixels_per_tile: int,
) -> torch.Tensor:
    """Run `fn` on overlapping tiles of x (B, C, H, W) and blend the outputs with the plans' weights."""
    b = x.shape[0]
    tiles = [(i, j, k) for i in range(b) for j in range(len(plan_h.starts_in)) for k in range(len(plan_w.starts_in))]
    per_call = max(1, max_batch_pixels // max(1, pixels_per_tile))
    out = None
    for n0 in range(0, len(tiles), per_call):
        chunk = tiles[n0 : n0 + per_call]
        batch = torch.stack([_crop(x[i], plan_h, j, plan_w, k) for i, j, k in chunk])
        y = fn(batch)
        if out is None:  # fp32 accumulator, whatever the model's dtype
            shape = (b, y.shape[1], plan_h.length_out, plan_w.length_out)
            out = torch.zeros(shape, dtype=torch.float32, device=y.device)
            out_dtype = y.dtype
        for (i, j, k), tile in zip(chunk, y):
            _accumulate(out[i], tile, plan_h, j, plan_w, k)
        del y, batch
    return out.to(out_dtype)


def _crop(img: torch.Tensor, ph: AxisPlan, j: int, pw: AxisPlan, k: int) -> torch.Tensor:
    y0, x0 = ph.starts_in[j], pw.starts_in[k]
    return img[:, y0 : y0 + ph.size_in, x0 : x0 + pw.size_in]


def _accumulate(out: torch.Tensor, tile: torch.Tensor, ph: AxisPlan, j: int, pw: AxisPlan, k: int) -> None:
    wy = ph.weights[j].to(out.device)
    wx = pw.weights[k].to(out.device)
    y0, x0 = ph.starts_out[j], pw.starts_out[k]
    region = out[:, y0 : y0 + ph.size_out, x0 : x0 + pw.size_out]
    region.addcmul_(tile.float(), torch.outer(wy, wx))


class Tiler:
    """Tiled encode/decode for one model (compression factor f); created by `DCAE.enable_tiling`."""

    def __init__(self, factor: int, config: TilingConfig | None = None) -> None:
        self.factor = factor
        self.config = (config or TilingConfig()).validated(factor)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Tiler(f={self.factor}, tile_size={c.tile_size}, overlap={c.overlap}, "
            f"max_batch_pixels={c.max_batch_pixels})"
        )

    # Images no larger than one tile go through the model in one piece (bit-identical to untiled).
    def wants_encode(self, x: torch.Tensor) -> bool:
        return max(x.shape[-2:]) > self.config.tile_size

    def wants_decode(self, z: torch.Tensor) -> bool:
        return max(z.shape[-2:]) * self.factor > self.config.tile_size

    def encode(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x: images (B, C, H, W) with H, W multiples of f. fn: one model call on a batch of tiles."""
        f, c = self.factor, self.config
        ramp = c.overlap // f
        ph = plan_axis(x.shape[2], c.tile_size, c.overlap, f, 1 / f, ramp)
        pw = plan_axis(x.shape[3], c.tile_size, c.overlap, f, 1 / f, ramp)
        return tiled_apply(x, fn, ph, pw, c.max_batch_pixels, ph.size_in * pw.size_in)

    def decode(self, z: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """z: latents (B, C, h, w). fn: one model call on a batch of latent tiles."""
        f, c = self.factor, self.config
        ph = plan_axis(z.shape[2], c.tile_size // f, c.overlap // f, 1, f, c.overlap)
        pw = plan_axis(z.shape[3], c.tile_size // f, c.overlap // f, 1, f, c.overlap)
        return tiled_apply(z, fn, ph, pw, c.max_batch_pixels, ph.size_out * pw.size_out)
