"""Layers shared by the diffusion transformers: attention, MLP, timestep and position embeddings, patches.

References: facebookresearch/DiT (models.py), baofff/U-ViT (libs/uvit.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch SDPA (flash / memory-efficient)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # (B, N, 3, heads, head_dim) -> three (B, heads, N, head_dim) views; SDPA takes strided inputs.
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, the mean square always in fp32 (diffusers' RMSNorm: the
    result is cast to the weight's dtype only when that is fp16 / bf16)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str = "tanh") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps: B -> B x dim, [cos | sin] as in DiT and U-ViT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies followed by a 2-layer MLP (DiT)."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / DiT): grid*grid x dim, half the channels per axis."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # DiT/MAE: first half embeds w, second h

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(gx), embed_1d(gy)], dim=1).float()


class PatchEmbed(nn.Module):
    """B x C x H x W -> B x (H/p * W/p) x D with a stride-p convolution (a plain linear layer for p=1)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, channels: int, patch_size: int, grid: int) -> torch.Tensor:
    """B x T x (p*p*C) -> B x C x H x W, inverse of the patch embedding's token order."""
    B = x.shape[0]
    p = patch_size
    x = x.reshape(B, grid, grid, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, grid * p, grid * p)


# ----------------------------------------------------------------------------- DC-AE 1.5 adaptive channels
def check_channels(c: int, full: int, adaptive: bool) -> None:
    """A latent of c channels fits a model of `full` channels: all of them, or (adaptive) a leading subset."""
    if c == full:
        return
    if not adaptive or not 0 < c < full:
        raise ValueError(
            f"the model takes {full} latent channels"
            + (f" or fewer (adaptive channels), got {c}" if adaptive else f", got {c}")
        )


def adaptive_patch_embed(embed: nn.Module, x: torch.Tensor, full: int) -> torch.Tensor:
    """DC-AE 1.5's adaptive patch embedding: a c-channel latent through the first c input channels of the patch
    conv (`embed.proj`), as if the missing channels were zero. B x c x H x W -> B x T x D. All channels go
    through the module itself (whatever wraps it, e.g. a LoRA layer, stays in the path)."""
    c = x.shape[1]
    if c == full:
        return embed(x)
    proj = embed.proj
    return F.conv2d(x, proj.weight[:, :c], proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)


def adaptive_head(linear: nn.Linear, x: torch.Tensor, channels: int, full: int, patch_size: int) -> torch.Tensor:
    """DC-AE 1.5's sliced output head: of the p*p*full outputs per token (laid out p, p, channel as `unpatchify`
    reads them) only those of the first `channels` channels, so the output is a p*p*channels token."""
    if channels == full:
        return linear(x)
    if patch_size == 1:
        keep: slice | torch.Tensor = slice(0, channels)
    else:
        rows = torch.arange(patch_size * patch_size * full, device=linear.weight.device)
        keep = rows[rows % full < channels]
    return F.linear(x, linear.weight[keep], linear.bias[keep] if linear.bias is not None else None)
