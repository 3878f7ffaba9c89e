"""Triton kernels for the CUDA fast path: channel RMS norm and ReLU linear attention.

Both read the channels-last activations in place (no movedim/reshape copies), compute in fp32 and
write the caller's dtype. They are optional: `available()` is False without CUDA or Triton, and the
fast path then uses the plain PyTorch ops. The kernels also run under Triton's CPU interpreter
(TRITON_INTERPRET=1), which is how they are tested on machines without a GPU.

- `rms_norm_channels_last`: one program per block of pixels; each row is the C contiguous channels
  of one pixel. Replaces fp32 upcast + pow + mean + rsqrt + 2 muls + add (6 passes) by one.
- `relu_linear_attention_tokens`: two kernels. (1) per (batch, head, split of N): partial sums of
  relu(k)^T v (d x d) and of relu(k) (d); (2) per (batch, head, block of N): relu(q) @ KV divided by
  relu(q) . ksum. The partials are summed with torch (deterministic, no atomics). Matmuls use IEEE
  fp32 (no TF32): the eager reference is fp32 and tests compare at 1e-5.
"""

from __future__ import annotations

import os

import torch

from dcae.models import linear_attention as reference

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs do not have it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None


def available() -> bool:
    """Triton importable and a CUDA device present (or the CPU interpreter explicitly requested)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, rows, C, eps, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_C)
        mask = (r[:, None] < rows) & (c[None, :] < C)
        offs = r[:, None].to(tl.int64) * C + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
        w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        y = x * inv[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _kv_kernel(
        t_ptr, kv_ptr, ks_ptr, N, heads, n_per_split,
        s_b, s_n, s_h,
        D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b, h = bh // heads, bh % heads
        d = tl.arange(0, D)
        base = t_ptr + b.to(tl.int64) * s_b + h * s_h
        acc = tl.zeros((D, D), dtype=tl.float32)
        ksum = tl.zeros((D,), dtype=tl.float32)
        n_start = split * n_per_split
        for n0 in range(n_start, n_start + n_per_split, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            m = (n < N) & (n < n_start + n_per_split)
            rows = base + n[:, None].to(tl.int64) * s_n
            k = tl.load(rows + D + d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
            v = tl.load(rows + 2 * D + d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
            k = tl.maximum(k, 0.0)
            acc += tl.dot(tl.trans(k), v, input_precision="ieee")
            ksum += tl.sum(k, axis=0)
        out = (bh * tl.num_programs(1) + split).to(tl.int64)
        tl.store(kv_ptr + out * D * D + d[:, None] * D + d[None, :], acc)
        tl.store(ks_ptr + out * D + d, ksum)

    @triton.jit
    def _apply_kernel(
        t_ptr, kv_ptr, ks_ptr, o_ptr, N, heads, eps,
        s_b, s_n, s_h, o_b, o_n, o_h,
        D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        b, h = bh // heads, bh % heads
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        m = n < N
        q = tl.load(t_ptr + b.to(tl.int64) * s_b + h * s_h + n[:, None].to(tl.int64) * s_n + d[None, :],
                    mask=m[:, None], other=0.0).to(tl.float32)  # fmt: skip
        q = tl.maximum(q, 0.0)
        kv = tl.load(kv_ptr + bh.to(tl.int64) * D * D + d[:, None] * D + d[None, :])
        ks = tl.load(ks_ptr + bh.to(tl.int64) * D + d)
        num = tl.dot(q, kv, input_precision="ieee")
        den = tl.sum(q * ks[None, :], axis=1)
        out = num / (den[:, None] + eps)
        dst = o_ptr + b.to(tl.int64) * o_b + h * o_h + n[:, None].to(tl.int64) * o_n + d[None, :]
        tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=m[:, None])


def rms_norm_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over C of a channels-last (B, C, H, W) tensor, fp32 math, output in x's dtype and layout."""
    b, c, h, w = x.shape
    xt = x.permute(0, 2, 3, 1)  # contiguous (B, H, W, C) for channels-last input
    if not xt.is_contiguous():
        xt = xt.contiguous()
    y = torch.empty_like(xt)
    rows = b * h * w
    block_c = triton.next_power_of_2(c)
    block_m = max(1, min(16, 4096 // block_c))
    _rms_norm_kernel[(triton.cdiv(rows, block_m),)](xt, weight, bias, y, rows, c, eps, BLOCK_M=block_m, BLOCK_C=block_c)
    return y.permute(0, 3, 1, 2)


def _supported(t: torch.Tensor, head_dim: int) -> bool:
    d = head_dim
    return t.shape[-1] == 3 * d and t.stride(-1) == 1 and d >= 16 and not d & (d - 1)


def relu_linear_attention_kv(t: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KV (B, heads, d, d) and ksum (B, heads, d) in fp32 from a token-major qkv view t (B, N, heads, 3d)
    with unit stride in the last dim; same contract as `dcae.models.linear_attention.relu_linear_attention_kv`."""
    if not _supported(t, head_dim):
        return reference.relu_linear_attention_kv(t, head_dim)
    b, n, heads, _ = t.shape
    d, block_n = head_dim, 64
    # Enough programs to fill the GPU even for batch 1 with few heads: split N, sum the partials after.
    splits = max(1, min(triton.cdiv(n, 4 * block_n), triton.cdiv(1024, b * heads)))
    n_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, n_per_split)
    kv = torch.empty(b * heads, splits, d, d, device=t.device, dtype=torch.float32)
    ks = torch.empty(b * heads, splits, d, device=t.device, dtype=torch.float32)
    _kv_kernel[(b * heads, splits)](
        t, kv, ks, n, heads, n_per_split, t.stride(0), t.stride(1), t.stride(2), D=d, BLOCK_N=block_n
    )
    return kv.sum(1).view(b, heads, d, d), ks.sum(1).view(b, heads, d)


def relu_linear_attention_apply(
    t: torch.Tensor, kv: torch.Tensor, ksum: torch.Tensor, head_dim: int, eps: float = 1e-15
) -> torch.Tensor:
    """(B, N, heads, d) fp32 = relu(q) @ KV / (relu(q) . ksum); see `relu_linear_attention_kv`."""
    if not _supported(t, head_dim):
        return reference.relu_linear_attention_apply(t, kv, ksum, head_dim, eps)
    b, n, heads, _ = t.shape
    d, block_n = head_dim, 64
    kv, ksum = kv.contiguous(), ksum.contiguous()
    out = torch.empty(b, n, heads, d, device=t.device, dtype=torch.float32)
    _apply_kernel[(b * heads, triton.cdiv(n, block_n))](
        t, kv, ksum, out, n, heads, eps,
        t.stride(0), t.stride(1), t.stride(2), out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_N=block_n,
    )  # fmt: skip
    return out


def relu_linear_attention_tokens(t: torch.Tensor, head_dim: int, eps: float = 1e-15) -> torch.Tensor:
    """Both halves: t (B, N, heads, 3d) -> (B, N, heads, d) fp32."""
    return relu_linear_attention_apply(t, *relu_linear_attention_kv(t, head_dim), head_dim, eps)
