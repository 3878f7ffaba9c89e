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
from fractions import Fraction

import torch
import torch.nn as nn

from dcae.models.fast import EagerRunner, decoder_units, encoder_units
from dcae.models.layers import (
    ChannelDuplicatingPixelShuffle,
    ConvLayer,
    ConvPixelShuffleUpsample,
    ConvPixelUnshuffleDownsample,
    GLUMBConv,
    InterpolateConvUpsample,
    OpSequential,
    PixelUnshuffleChannelAveraging,
    PlainBlock,
    ResBlock,
    ResidualBlock,
    RMSNorm2d,
    SliceableInputConv,
    SliceableOutputConv,
)

# Defaults: 1024 px tiles (a DC-AE's training resolution range) with 256 px of blending on each
# overlap. One 1024 px tile per model call keeps a 4096 px decode at about 1/10 of the untiled memory.
DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 256
DEFAULT_MAX_BATCH_PIXELS = 1024 * 1024
# The released in/mix decoders' ResBlock stages have a receptive radius of 114 px; 160 px admits them.
MIN_EXACT_RADIUS = 160


@dataclass(frozen=True)
class TilingConfig:
    """Tile and overlap in image pixels (multiples of the compression factor); see `DCAE.enable_tiling`."""

    tile_size: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS
    mode: str = "exact"  # "exact" (split at the attention stages, see above) or "blend"

    def validated(self, factor: int) -> TilingConfig:
        """Round tile and overlap up to multiples of the compression factor and check them."""
        tile = _round_up(max(self.tile_size, factor), factor)
        overlap = _round_up(max(self.overlap, 0), factor)
        if overlap >= tile:
            raise ValueError(f"overlap ({overlap} px, rounded to f={factor}) must be smaller than the tile ({tile} px)")
        if self.max_batch_pixels <= 0:
            raise ValueError("max_batch_pixels must be positive")
        if self.mode not in ("exact", "blend"):
            raise ValueError(f"tiling mode must be 'exact' or 'blend', got {self.mode!r}")
        return TilingConfig(tile, overlap, self.max_batch_pixels, self.mode)


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


# ----------------------------------------------------------------------------- exact mode
class NotLocal(Exception):
    """A module whose output at a pixel depends on far-away pixels (attention) or is not understood."""


_POINTWISE = (nn.Identity, nn.ReLU, nn.SiLU, nn.GELU, nn.BatchNorm2d, RMSNorm2d)


def receptive_walk(module: nn.Module, scale: Fraction) -> tuple[Fraction, Fraction]:
    """(receptive radius in image pixels, scale after the module) for a purely local module.

    `scale` is image pixels per feature pixel at the module's input (1 for images, f for latents).
    Radii of modules in sequence add up; a kxk conv at scale s adds (k // 2) * s. Raises NotLocal
    for attention and for module types it does not know (then the caller falls back to blending).
    """
    if isinstance(module, _POINTWISE):
        return Fraction(0), scale
    if isinstance(module, nn.Conv2d):
        radius = Fraction(module.dilation[0] * (module.kernel_size[0] // 2)) * scale
        return radius, scale * module.stride[0]
    if isinstance(module, (ConvLayer, ResBlock, GLUMBConv)):
        parts = [module.conv, module.norm, module.act] if isinstance(module, ConvLayer) else list(module.children())
        return _walk_sequence([m for m in parts if m is not None], scale)
    if isinstance(module, (SliceableInputConv, SliceableOutputConv)):
        return receptive_walk(module.conv, scale)
    if isinstance(module, OpSequential):
        return _walk_sequence(list(module.op_list), scale)
    if isinstance(module, PlainBlock):  # residual autoencoding switched off: the learned branch alone
        return receptive_walk(module.main, scale)
    if isinstance(module, ResidualBlock):
        r_main, s_main = receptive_walk(module.main, scale)
        r_short, s_short = receptive_walk(module.shortcut, scale)
        if s_main != s_short:
            raise NotLocal(f"branches of {type(module).__name__} end at different scales")
        return max(r_main, r_short), s_main
    if isinstance(module, ConvPixelUnshuffleDownsample):
        radius, s = receptive_walk(module.conv, scale)
        return radius, s * module.factor
    if isinstance(module, ConvPixelShuffleUpsample):
        radius, s = receptive_walk(module.conv, scale)
        return radius, s / module.factor
    if isinstance(module, InterpolateConvUpsample):
        return receptive_walk(module.conv, scale / module.factor)
    if isinstance(module, PixelUnshuffleChannelAveraging):
        return Fraction(0), scale * module.factor
    if isinstance(module, ChannelDuplicatingPixelShuffle):
        return Fraction(0), scale / module.factor
    raise NotLocal(f"{type(module).__name__} is global or unknown to the tiler")


def _walk_sequence(modules: list[nn.Module], scale: Fraction) -> tuple[Fraction, Fraction]:
    total = Fraction(0)
    for m in modules:
        radius, scale = receptive_walk(m, scale)
        total += radius
    return total, scale


def _unit_walk(units: list[nn.Module], scale: Fraction) -> list[tuple[Fraction, Fraction | None]]:
    """(input scale, receptive radius or None when not local) of each unit, in order."""
    out = []
    for unit in units:
        try:
            radius, next_scale = receptive_walk(unit, scale)
        except NotLocal:
            radius, next_scale = None, _scale_through([unit], scale)
        out.append((scale, radius))
        scale = next_scale
    return out


def _scale_through(units: list[nn.Module], scale: Fraction) -> Fraction:
    """Scale after units that may contain attention (attention keeps the scale)."""
    for unit in units:
        for m in unit.modules():
            if isinstance(m, (ConvPixelUnshuffleDownsample, PixelUnshuffleChannelAveraging)) and not _inside_shortcut(
                unit, m
            ):
                scale *= m.factor
            elif isinstance(m, (ConvPixelShuffleUpsample, InterpolateConvUpsample)):
                scale /= m.factor
            elif isinstance(m, nn.Conv2d) and m.stride[0] > 1:
                scale *= m.stride[0]
    return scale


def _inside_shortcut(unit: nn.Module, module: nn.Module) -> bool:
    return any(isinstance(m, ResidualBlock) and m.shortcut is module for m in unit.modules())


@dataclass(frozen=True)
class ExactPlan:
    """Where a coder splits into a full-image part (with attention) and a tiled local part."""

    global_units: list  # (name, module), run on the whole image
    local_units: list  # (name, module), run tile by tile
    scale: Fraction  # image px per feature px where the two parts meet
    radius: Fraction  # receptive radius of the local part, image px


def exact_plan(units: list[tuple[str, nn.Module]], encoder: bool, factor: int, max_radius: int) -> ExactPlan | None:
    """Split a coder's units into a tiled local part and a full-image part.

    Encoders: the local part is the longest prefix of local units whose receptive radius stays within
    `max_radius` image pixels; decoders: the longest such suffix. Radii add up along the chain, so models
    without attention (DC-AE 1.5) still get a small halo: their deep, low-resolution stages (huge
    receptive field, little memory) go to the full-image part.
    """
    walk = _unit_walk([m for _, m in units], Fraction(1 if encoder else factor))
    order = range(len(units)) if encoder else range(len(units) - 1, -1, -1)
    radius, chosen = Fraction(0), []
    for k in order:
        r = walk[k][1]
        if r is None or radius + r > max_radius:
            break
        radius += r
        chosen.append(k)
    if not chosen:
        return None
    if encoder:
        k = len(chosen)
        local_units, global_units = units[:k], units[k:]
        scale = walk[k][0] if k < len(units) else Fraction(factor)
    else:
        k = len(units) - len(chosen)
        global_units, local_units = units[:k], units[k:]
        scale = walk[k][0]
    if scale.denominator != 1:
        return None
    return ExactPlan(global_units, local_units, scale, radius)


def run_local_tiled(
    run_units: Callable[[list, torch.Tensor], torch.Tensor],
    units: list,
    h: torch.Tensor,
    core: int,
    halo: int,
    up: int,
    down: int,
    max_batch_pixels: int,
) -> torch.Tensor:
    """Run local `units` on h (B, C, H, W) tile by tile: each core tile (core x core input pixels) gets
    `halo` pixels of real context on every side that has image there (zero padding at the image border,
    as in the untiled model), and only its core goes to the output. With halo >= the receptive radius
    the result equals the untiled one. Output pixels = input pixels * up / down."""
    b, _, height, width = h.shape
    groups: dict[tuple, list] = {}
    for i in range(b):
        for y0 in range(0, height, core):
            for x0 in range(0, width, core):
                y1, x1 = min(y0 + core, height), min(x0 + core, width)
                ty, tx = max(0, y0 - halo), max(0, x0 - halo)
                by, bx = min(height, y1 + halo), min(width, x1 + halo)
                # Tiles with the same crop geometry can share one batched model call.
                key = (by - ty, bx - tx, y0 - ty, x0 - tx, y1 - y0, x1 - x0)
                groups.setdefault(key, []).append((i, ty, tx, y0, x0))
    out = None
    for (ch, cw, oy, ox, ny, nx), members in groups.items():
        # Budget in image pixels: the input side for encoders (down > 1), the output side for decoders.
        per_call = max(1, max_batch_pixels // max(1, ch * cw * up * up))
        for n0 in range(0, len(members), per_call):
            chunk = members[n0 : n0 + per_call]
            batch = torch.stack([h[i, :, ty : ty + ch, tx : tx + cw] for i, ty, tx, _, _ in chunk])
            y = run_units(units, batch)
            if out is None:
                out = y.new_empty(b, y.shape[1], height * up // down, width * up // down)
            cy, cx, sy, sx = oy * up // down, ox * up // down, ny * up // down, nx * up // down
            for (i, _, _, y0, x0), tile in zip(chunk, y):
                oy0, ox0 = y0 * up // down, x0 * up // down
                out[i, :, oy0 : oy0 + sy, ox0 : ox0 + sx] = tile[:, cy : cy + sy, cx : cx + sx]
            del y, batch
    return out


class Tiler:
    """Tiled encode/decode for one model (compression factor f); created by `DCAE.enable_tiling`."""

    def __init__(self, factor: int, config: TilingConfig | None = None) -> None:
        self.factor = factor
        self.config = (config or TilingConfig()).validated(factor)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Tiler(f={self.factor}, mode={c.mode!r}, tile_size={c.tile_size}, overlap={c.overlap}, "
            f"max_batch_pixels={c.max_batch_pixels})"
        )

    @property
    def max_radius(self) -> int:
        """Largest receptive radius (image px) the exact mode accepts for its tiled part: the halo costs
        compute, (tile + 2 radius)^2 / tile^2."""
        return max(MIN_EXACT_RADIUS, self.config.tile_size // 8)

    # Images no larger than one tile go through the model in one piece (bit-identical to untiled).
    def wants_encode(self, x: torch.Tensor) -> bool:
        return max(x.shape[-2:]) > self.config.tile_size

    def wants_decode(self, z: torch.Tensor) -> bool:
        return max(z.shape[-2:]) * self.factor > self.config.tile_size

    def wants(self, kind: str, x: torch.Tensor) -> bool:
        """`wants_encode` or `wants_decode` (kind "encode" / "decode")."""
        return self.wants_encode(x) if kind == "encode" else self.wants_decode(x)

    def run(self, kind: str, model, x: torch.Tensor) -> torch.Tensor:
        """`encode` or `decode` (kind "encode" / "decode") of `model` in tiles."""
        return self.encode(model, x) if kind == "encode" else self.decode(model, x)

    def encode(self, model, x: torch.Tensor) -> torch.Tensor:
        """x: images (B, C, H, W), H and W multiples of f."""
        if self.config.mode == "exact":
            runner = _runner(model)
            plan = exact_plan(encoder_units(model.encoder), True, self.factor, self.max_radius)
            if plan is not None:
                s = int(plan.scale)
                halo = _round_up(math.ceil(plan.radius), s) + s
                h = run_local_tiled(runner.run_units, plan.local_units, x, _round_up(self.config.tile_size, s),
                                    halo, 1, s, self.config.max_batch_pixels)  # fmt: skip
                return runner.run_units(plan.global_units, h) if plan.global_units else h
        return self.blend_encode(x, model._encode_once)

    def decode(self, model, z: torch.Tensor) -> torch.Tensor:
        """z: latents (B, C, h, w)."""
        if self.config.mode == "exact":
            runner = _runner(model)
            plan = exact_plan(decoder_units(model.decoder), False, self.factor, self.max_radius)
            if plan is not None:
                s = int(plan.scale)
                h = runner.run_units(plan.global_units, z) if plan.global_units else z
                halo = math.ceil(plan.radius / s) + 1
                core = max(1, self.config.tile_size // s)
                return run_local_tiled(runner.run_units, plan.local_units, h, core, halo, s, 1,
                                       self.config.max_batch_pixels)  # fmt: skip
        return self.blend_decode(z, model._decode_once)

    def blend_encode(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Overlapping tiles blended in latent space. fn: one model call on a batch of image tiles."""
        f, c = self.factor, self.config
        ramp = c.overlap // f
        ph = plan_axis(x.shape[2], c.tile_size, c.overlap, f, 1 / f, ramp)
        pw = plan_axis(x.shape[3], c.tile_size, c.overlap, f, 1 / f, ramp)
        return tiled_apply(x, fn, ph, pw, c.max_batch_pixels, ph.size_in * pw.size_in)

    def blend_decode(self, z: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Overlapping latent tiles blended in pixel space. fn: one model call on a batch of latent tiles."""
        f, c = self.factor, self.config
        ph = plan_axis(z.shape[2], c.tile_size // f, c.overlap // f, 1, f, c.overlap)
        pw = plan_axis(z.shape[3], c.tile_size // f, c.overlap // f, 1, f, c.overlap)
        return tiled_apply(z, fn, ph, pw, c.max_batch_pixels, ph.size_out * pw.size_out)


def _runner(model):
    fast = model._fast_path()
    return fast if fast is not None else EagerRunner()
