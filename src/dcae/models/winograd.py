"""Winograd F(4x4, 3x3) convolution for CPU inference.

Why: on CPU, 80% of DC-AE's time goes into dense 3x3 convolutions (the ResBlock stages), which
oneDNN computes directly at the FMA limit. Winograd's minimal filtering computes each 4x4 output tile
with 36 multiplies per input/output channel pair instead of 144, turning the convolution into 36
batched GEMMs plus cheap linear transforms; measured on one AVX-512 core that is 1.6-2.4x faster
than oneDNN for the shapes DC-AE uses. The price is precision: about 3e-6 relative error per conv
in fp32 (10x the direct conv's), which is why the path is fp32-only and checked against the eager
model in the tests.

Layout: everything works on channels-last memory (B, H, W, C), so the per-position slices that the
transforms read are contiguous in C and the GEMMs need no transposes.
"""

from __future__ import annotations

import torch

# Transform matrices of F(4x4, 3x3) with interpolation points 0, +-1, +-2, inf (Lavin & Gray 2016).
_G = (
    (1 / 4, 0.0, 0.0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0.0, 0.0, 1.0),
)
TILE = 4  # output pixels per tile side
# Elements of the transformed input per GEMM chunk: bounds the scratch memory (36 x tiles x C floats)
# and keeps a chunk's transforms in cache.
CHUNK_ELEMENTS = 1 << 22


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) conv weight -> (36, Cin, Cout) transformed filters U = G w G^T.

    One GEMM: vec(G w G^T) = (G kron G) vec(w), with w laid out as (9, Cin * Cout), which lands U in the
    (36, Cin, Cout) layout the convolution's batched GEMM wants. 5x faster than the equivalent einsum in
    fp64 (this is the first call's cost of the fast path: ~1 GiB of filters for f32c32-in), and its fp32
    rounding (3e-8 relative) is 100x below Winograd's own (3e-6).
    """
    g = torch.tensor(_G, dtype=torch.float32, device=weight.device)
    o, c = weight.shape[:2]
    w = weight.float().permute(2, 3, 1, 0).reshape(9, c * o)
    return (torch.kron(g, g) @ w).view(36, c, o).to(weight.dtype)


def _input_transform(d: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """out = B^T d for 6 slices d (any shape, same for all); 12 elementwise ops, 2 temporaries."""
    d0, d1, d2, d3, d4, d5 = d
    a = torch.sub(d4, d2)
    b = torch.sub(d3, d1)
    torch.add(a, b, alpha=2, out=out[3])
    torch.add(a, b, alpha=-2, out=out[4])
    torch.add(d4, d2, alpha=-4, out=a)
    torch.add(d3, d1, alpha=-4, out=b)
    torch.add(a, b, out=out[1])
    torch.sub(a, b, out=out[2])
    torch.add(d4, d2, alpha=-5, out=a)
    torch.add(a, d0, alpha=4, out=out[0])
    torch.add(d5, d3, alpha=-5, out=b)
    torch.add(b, d1, alpha=4, out=out[5])


def _output_transform(m: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """out = A^T m for 6 slices m -> 4 outputs; 10 elementwise ops."""
    m0, m1, m2, m3, m4, m5 = m
    s1, d1 = m1 + m2, m1 - m2
    s2, d2 = m3 + m4, m3 - m4
    torch.add(s1, s2, out=out[0]).add_(m0)
    torch.add(d1, d2, alpha=2, out=out[1])
    torch.add(s1, s2, alpha=4, out=out[2])
    torch.add(d1, d2, alpha=8, out=out[3]).add_(m5)


def _conv_rows(xp: torch.Tensor, u: torch.Tensor, out: torch.Tensor, r0: int, r1: int) -> None:
    """Tile rows [r0, r1) of the output. xp: padded input (B, 4nh+2, 4nw+2, C); out: (B, nh, 4, nw, 4, Co).

    Each transform stage is a handful of large elementwise ops over all tiles at once: few parallel
    regions matter on CPU, where every op is one OpenMP fork/join.
    """
    b, _, wp, c = xp.shape
    nw = (wp - 2) // TILE
    rows = r1 - r0
    band = xp[:, TILE * r0 : TILE * r1 + 2]
    # Row transform over the 6 input rows of each tile (row r of tile i is padded row 4i + r).
    t = band.new_empty(6, b, rows, wp, c)
    _input_transform([band[:, r : r + TILE * rows : TILE] for r in range(6)], list(t))
    # Column transform (all 6 row outputs at once), written straight into the GEMM operand V.
    v = band.new_empty(6, 6, b, rows, nw, c)
    _input_transform([t[..., s : s + TILE * nw : TILE, :] for s in range(6)], list(v.unbind(1)))
    del t
    m = torch.bmm(v.view(36, -1, c), u).view(6, 6, b, rows, nw, -1)
    del v
    s = m.new_empty(4, 6, b, rows, nw, u.shape[-1])
    _output_transform(list(m), list(s))
    del m
    # out[:, r0:r1] as (j, a, B, rows, nw, Co): column j of output row a of every tile.
    dst = out[:, r0:r1].permute(4, 2, 0, 1, 3, 5)
    _output_transform(list(s.unbind(1)), list(dst))


def conv3x3_winograd(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """3x3 stride-1 'same' convolution of x (B, C, H, W), any layout, with filters from `winograd_weight`.

    Returns (B, Cout, H, W) in channels-last memory format.
    """
    b, c, h, w = x.shape
    co = u.shape[-1]
    nh, nw = -(-h // TILE), -(-w // TILE)
    # Zero padding: 1 pixel for the conv, and up to a multiple of the tile size at the bottom/right.
    xp = x.new_zeros(b, TILE * nh + 2, TILE * nw + 2, c)
    xp[:, 1 : h + 1, 1 : w + 1].copy_(x.permute(0, 2, 3, 1))
    out = x.new_empty(b, nh, TILE, nw, TILE, co)
    step = max(1, CHUNK_ELEMENTS // (36 * b * nw * max(c, co)))
    for r0 in range(0, nh, step):
        _conv_rows(xp, u, out, r0, min(nh, r0 + step))
    y = out.view(b, TILE * nh, TILE * nw, co)
    if TILE * nh != h or TILE * nw != w:
        y = y[:, :h, :w].contiguous()
    if bias is not None:
        y.add_(bias)
    return y.permute(0, 3, 1, 2)
