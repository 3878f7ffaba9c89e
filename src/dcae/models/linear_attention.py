"""ReLU linear attention on token-major qkv, in PyTorch: the reference the fast path's kernels implement.

`dcae.models.fast` uses these on the CPU and wherever Triton is off; `dcae.models.fast_triton` falls back
to them for shapes its kernels do not take, and `fast.check_kernels` compares the kernels against them.
The eager modules compute the same attention head-major (`dcae.models.layers.relu_linear_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relu_linear_attention_kv(t: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First half of ReLU linear attention on a token-major qkv view t (B, N, heads, 3d), [q | k | v] per
    head: KV = sum_n relu(k_n) v_n^T (B, heads, d, d) and ksum = sum_n relu(k_n) (B, heads, d), fp32.
    Sums over tokens, so they can be accumulated over bands of rows."""
    _, k, v = t.float().split(head_dim, dim=-1)
    k = F.relu(k)
    return torch.einsum("bnhd,bnhe->bhde", k, v), k.sum(dim=1)


def relu_linear_attention_apply(
    t: torch.Tensor, kv: torch.Tensor, ksum: torch.Tensor, head_dim: int, eps: float = 1e-15
) -> torch.Tensor:
    """Second half: out_n = (relu(q_n) @ KV) / (relu(q_n) . ksum) -> (B, N, heads, d) fp32.

    The same kernel as the eager `relu_linear_attention` (which gets the denominator from a row of ones
    padded onto v). fp32 throughout: the sums over N overflow fp16.
    """
    q = F.relu(t[..., :head_dim].float())
    num = torch.einsum("bnhd,bhde->bnhe", q, kv)
    den = torch.einsum("bnhd,bhd->bnh", q, ksum)
    return num / (den.unsqueeze(-1) + eps)


def relu_linear_attention_tokens(t: torch.Tensor, head_dim: int, eps: float = 1e-15) -> torch.Tensor:
    """Both halves at once: t (B, N, heads, 3d) -> (B, N, heads, d) fp32."""
    return relu_linear_attention_apply(t, *relu_linear_attention_kv(t, head_dim), head_dim, eps)
