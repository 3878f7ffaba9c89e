"""LPIPS at every image size: a defined minimum size, and exact tiling for large images.

LPIPS is a sum over five feature taps of the spatial mean of a per-pixel quantity. The trunks
(`dcae.metrics.lpips.Backbone`) are chains of convolutions, ReLUs, max-pools and blur-pools, so every
tap pixel depends on a known window of input pixels. `lpips_tiled` splits each tap's output into a
grid of tiles, works out per layer which rows and columns the tile needs (the receptive field, aligned
to each layer's stride), runs the layers on that crop with the layer's padding applied only where the
crop touches a true image edge, and keeps exactly the tap pixels the tile owns. Every tap pixel is thus
computed once, from the same inputs and padding as the untiled network, and the sums equal the untiled
result up to float rounding (about 1e-6 relative), with memory bounded by the tile size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dcae.metrics.lpips import LPIPS, BlurPool2d, _unit_normalize

# Owned input pixels per tile side; the crop a tile runs on is this plus the receptive-field halo.
TILE = 384
# Images with at most this many pixels run untiled (the plain forward, a few hundred MB for VGG).
UNTILED_PIXELS = 768 * 768


@dataclass(frozen=True)
class _Geometry:
    """How a layer maps input rows (or columns) to output ones: output i reads padded input
    rows i * stride .. i * stride + kernel - 1, the padded axis being `lo` + n + `hi` long."""

    kernel: int = 1
    stride: int = 1
    lo: int = 0
    hi: int = 0
    mode: str = "constant"  # padding mode of `F.pad`

    def out_size(self, n: int) -> int:
        return (n + self.lo + self.hi - self.kernel) // self.stride + 1

    def valid(self, n: int) -> bool:
        # F.pad's reflect mode needs more input rows than padding rows
        return self.out_size(n) >= 1 and (self.mode != "reflect" or max(self.lo, self.hi) < n)

    def needs(self, a: int, b: int) -> tuple[int, int]:
        """Padded-free input range [start, stop) (may leave the image) read by output rows [a, b)."""
        return a * self.stride - self.lo, (b - 1) * self.stride - self.lo + self.kernel


def _geometry(layer: nn.Module) -> _Geometry:
    if isinstance(layer, nn.Conv2d):
        assert layer.kernel_size[0] == layer.kernel_size[1] and layer.stride[0] == layer.stride[1]
        return _Geometry(layer.kernel_size[0], layer.stride[0], layer.padding[0], layer.padding[0])
    if isinstance(layer, nn.MaxPool2d):
        assert not layer.ceil_mode and layer.padding == 0 and layer.dilation == 1
        return _Geometry(layer.kernel_size, layer.stride)
    if isinstance(layer, BlurPool2d):
        lo, hi = layer.pad[0], layer.pad[1]
        return _Geometry(layer.filt.shape[-1], layer.stride, lo, hi, "reflect")
    if isinstance(layer, (nn.ReLU, nn.Identity)):
        return _Geometry()
    raise TypeError(f"no tiling geometry for {type(layer).__name__}")


def _run(layer: nn.Module, x: torch.Tensor, pad: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    """The layer on an already cropped input, with `pad` (left, right, top, bottom) applied here."""
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, layer.weight, layer.bias, stride=layer.stride)
    if isinstance(layer, BlurPool2d):
        return F.conv2d(x, layer.filt.to(x.dtype), stride=layer.stride, groups=x.shape[1])
    return layer(x)  # ReLU, unpadded max-pool


def _layers(model: LPIPS) -> tuple[list[nn.Module], list[int]]:
    """The trunk as one list of layers, and the positions whose outputs are the five taps."""
    layers: list[nn.Module] = []
    taps = []
    for k in range(5):
        layers += list(getattr(model.net, f"slice{k + 1}"))
        taps.append(len(layers) - 1)
    return layers, taps


def _sizes(geoms: list[_Geometry], n: int) -> list[int] | None:
    """Input size of every layer plus the last output size; None if some layer cannot run."""
    sizes = [n]
    for g in geoms:
        if not g.valid(sizes[-1]):
            return None
        sizes.append(g.out_size(sizes[-1]))
    return sizes


def min_size(model: LPIPS) -> int:
    """The smallest image side the network accepts (smaller images have no LPIPS: NaN)."""
    geoms = [_geometry(layer) for layer in _layers(model)[0]]
    return next(n for n in range(1, 4096) if _sizes(geoms, n) is not None)


def _split(n: int, parts: int, j: int) -> tuple[int, int]:
    return n * j // parts, n * (j + 1) // parts


def _plan(geoms: list[_Geometry], taps: list[int], sizes: list[int], parts: int, j: int) -> list:
    """Per layer, for tile j of `parts` along one axis: (clipped input start, stop, pad before, pad
    after) so that the layer outputs exactly the rows later layers and the owned tap rows need;
    None for layers the tile does not need."""
    plan: list = [None] * len(geoms)
    need: tuple[int, int] | None = None
    for i in range(len(geoms) - 1, -1, -1):
        if i in taps:
            own = _split(sizes[i + 1], parts, j)
            if own[1] > own[0]:
                need = own if need is None else (min(need[0], own[0]), max(need[1], own[1]))
        if need is None:
            continue
        start, stop = geoms[i].needs(*need)
        lo, hi = max(start, 0), min(stop, sizes[i])
        plan[i] = (lo, hi, lo - start, stop - hi)
        need = (lo, hi)
    return plan


def _tap_sum(model: LPIPS, k: int, f: torch.Tensor) -> torch.Tensor:
    """Sum over the pixels of f (2B, C, h, w: both images) of tap k's per-pixel distance."""
    f0, f1 = _unit_normalize(f).chunk(2)
    lin = getattr(model, f"lin{k}")
    return lin((f0 - f1).pow(2).to(lin.model[1].weight.dtype)).float().sum(dim=(1, 2, 3))


def _unit(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A crop to the network's device, uint8 pixels mapped to [-1, 1] like `to_unit_range`."""
    x = x.to(device)
    return x.to(torch.float32) / 127.5 - 1.0 if x.dtype == torch.uint8 else x


def _tile(model, layers, geoms, taps, pair, rows, cols, sizes_h, sizes_w) -> torch.Tensor:
    """Tap sums (B, 5) of one tile; pair = (x, y), (B, 3, H, W) each, cropped and scaled here only."""
    device = next(model.parameters()).device
    sums = torch.zeros(pair[0].shape[0], 5, dtype=torch.float32, device=device)
    first = next((i for i in range(len(layers)) if rows[i] is not None and cols[i] is not None), None)
    if first is None:
        return sums
    crops = [_unit(v[:, :, rows[first][0] : rows[first][1], cols[first][0] : cols[first][1]], device) for v in pair]
    t = model.scaling_layer(torch.cat(crops))
    for i in range(first, len(layers)):
        r, c = rows[i], cols[i]
        if r is None or c is None:
            break
        t = _run(layers[i], t, (c[2], c[3], r[2], r[3]), geoms[i].mode)
        if i in taps:
            k = taps.index(i)
            r0, r1 = _split(sizes_h[i + 1], rows.parts, rows.j)
            c0, c1 = _split(sizes_w[i + 1], cols.parts, cols.j)
            out_r0, out_c0 = rows.out_start(i), cols.out_start(i)
            owned = t[:, :, r0 - out_r0 : r1 - out_r0, c0 - out_c0 : c1 - out_c0]
            if owned.numel():
                sums[:, k] = _tap_sum(model, k, owned)
        if i + 1 < len(layers) and rows[i + 1] is not None and cols[i + 1] is not None:
            # crop this output to what the next layer reads
            nr, nc = rows[i + 1], cols[i + 1]
            t = t[:, :, nr[0] - rows.out_start(i) : nr[1] - rows.out_start(i)]
            t = t[:, :, :, nc[0] - cols.out_start(i) : nc[1] - cols.out_start(i)]
    return sums


class _AxisPlan(list):
    """`_plan` plus what `_tile` needs to locate owned rows: the tile index and output starts."""

    def __init__(self, geoms, taps, sizes, parts: int, j: int) -> None:
        super().__init__(_plan(geoms, taps, sizes, parts, j))
        self.geoms, self.parts, self.j = geoms, parts, j

    def out_start(self, i: int) -> int:
        """First output row of layer i in this tile (its input start + pad, divided by the stride)."""
        lo, _, pad_lo, _ = self[i]
        return (lo - pad_lo + self.geoms[i].lo) // self.geoms[i].stride


@torch.no_grad()
def lpips_tiled(model: LPIPS, x: torch.Tensor, y: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """LPIPS of (B, 3, H, W) pairs in [-1, 1] (or uint8, mapped to [-1, 1] tile by tile), computed
    tile by tile (see the module docstring); equals `model(x, y)` up to float rounding, in memory
    bounded by `tile` (no float copy of the whole images is made)."""
    tile = tile or TILE
    layers, taps = _layers(model)
    geoms = [_geometry(layer) for layer in layers]
    h, w = x.shape[-2:]
    sizes_h, sizes_w = _sizes(geoms, h), _sizes(geoms, w)
    if sizes_h is None or sizes_w is None:
        raise ValueError(f"{model.name} needs images of at least {min_size(model)} px a side, got {w}x{h}")
    parts_h, parts_w = max(1, math.ceil(h / tile)), max(1, math.ceil(w / tile))
    sums = torch.zeros(x.shape[0], 5, dtype=torch.float32, device=next(model.parameters()).device)
    for jr in range(parts_h):
        rows = _AxisPlan(geoms, taps, sizes_h, parts_h, jr)
        for jc in range(parts_w):
            cols = _AxisPlan(geoms, taps, sizes_w, parts_w, jc)
            sums += _tile(model, layers, geoms, taps, (x, y), rows, cols, sizes_h, sizes_w)
    areas = torch.tensor([sizes_h[i + 1] * sizes_w[i + 1] for i in taps], dtype=torch.float32, device=sums.device)
    return (sums / areas).sum(dim=1)


@torch.no_grad()
def lpips_any_size(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The LPIPS metric of (B, 3, H, W) pairs of any size, uint8 or in [-1, 1]: NaN (not defined)
    below `min_size`, the plain forward for small images, `lpips_tiled` one pair at a time for large
    ones (bounded memory: uint8 images are converted tile by tile). Returns (B,) float32 on the CPU."""
    h, w = x.shape[-2:]
    if min(h, w) < min_size(model):
        return torch.full((x.shape[0],), math.nan)
    if h * w <= UNTILED_PIXELS:
        device = next(model.parameters()).device
        return model(_unit(x, device), _unit(y, device)).float().cpu()
    return torch.cat([lpips_tiled(model, x[i : i + 1], y[i : i + 1]).cpu() for i in range(x.shape[0])])
