"""Building blocks of DC-AE, one place for all of them.

Module and attribute names follow the released (original-format) checkpoints, so that a state dict
of `mit-han-lab/dc-ae-*` loads with strict key matching: `ConvLayer.conv/.norm`, `ResidualBlock.main`,
`OpSequential.op_list`, `LiteMLA.qkv/.aggreg/.proj`, `GLUMBConv.inverted_conv/.depth_conv/.point_conv`.

Residual autoencoding lives in the parameter-free shortcuts (`PixelUnshuffleChannelAveraging`,
`ChannelDuplicatingPixelShuffle`): the learned branch of every down/up-sampling block only has to
learn a residual on top of a space-to-channel (or channel-to-space) rearrangement.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- norms and activations
class RMSNorm2d(nn.Module):
    """RMS norm over channels at each pixel ("trms2d"), with weight and bias, computed in fp32.

    fp32 matters: in bf16/fp16 the mean of squares of wide activations loses precision and overflows.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=1, keepdim=True) + self.eps)
        out = x32 * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        return out.to(dtype)


def build_norm(name: str | None, channels: int) -> nn.Module | None:
    if name is None:
        return None
    if name == "trms2d":
        return RMSNorm2d(channels)
    if name == "bn2d":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {name!r} (expected 'trms2d', 'bn2d' or None)")


def build_act(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    acts = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r} (expected one of {sorted(acts)})")
    return acts[name]()


# ----------------------------------------------------------------------------- containers
class ConvLayer(nn.Module):
    """conv (same padding) -> optional norm -> optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        norm: str | None = None,
        act: str | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias
        )
        self.norm = build_norm(norm, out_channels)
        self.act = build_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequential(nn.Module):
    """A sequence of ops stored as `op_list` (the released checkpoints' key layout)."""

    def __init__(self, ops: list[nn.Module | None]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList([op for op in ops if op is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class ResidualBlock(nn.Module):
    """main(x) + shortcut(x). The shortcut is identity or a parameter-free residual-autoencoding shortcut."""

    def __init__(self, main: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


class PlainBlock(nn.Module):
    """A block whose residual-autoencoding shortcut is switched off (stage down/upsampling, bottleneck): the
    learned branch only.

    The branch keeps ResidualBlock's `main` name, so a plain and a residual model share every state-dict
    key and weights move between them unchanged (the shortcuts have no parameters).
    """

    def __init__(self, main: nn.Module) -> None:
        super().__init__()
        self.main = main

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# ----------------------------------------------------------------------------- residual-autoencoding shortcuts
class PixelUnshuffleChannelAveraging(nn.Module):
    """Space-to-channel (factor f) then average groups of consecutive channels down to `out_channels`.

    With factor 1 this is the encoder's bottleneck shortcut (mean over channel groups).
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int) -> None:
        super().__init__()
        if (in_channels * factor**2) % out_channels:
            raise ValueError(f"{in_channels}*{factor}^2 channels cannot be averaged down to {out_channels}")
        self.factor = factor
        self.group_size = in_channels * factor**2 // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor > 1:
            x = F.pixel_unshuffle(x, self.factor)
        b, c, h, w = x.shape
        return x.view(b, c // self.group_size, self.group_size, h, w).mean(dim=2)


class ChannelDuplicatingPixelShuffle(nn.Module):
    """Duplicate each channel (repeat_interleave) then channel-to-space (factor f).

    The order (duplicate first, then shuffle) is the one the released weights were trained with.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int) -> None:
        super().__init__()
        if (out_channels * factor**2) % in_channels:
            raise ValueError(f"{in_channels} channels cannot be duplicated up to {out_channels}*{factor}^2")
        self.factor = factor
        self.repeats = out_channels * factor**2 // in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.repeat_interleave(self.repeats, dim=1)
        if self.factor > 1:
            x = F.pixel_shuffle(x, self.factor)
        return x


# ----------------------------------------------------------------------------- down / up sampling (learned branch)
class ConvPixelUnshuffleDownsample(nn.Module):
    """conv3x3 to out/f^2 channels, then pixel_unshuffle(f)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__()
        if out_channels % factor**2:
            raise ValueError(f"out_channels {out_channels} not divisible by {factor**2}")
        self.factor = factor
        self.conv = ConvLayer(in_channels, out_channels // factor**2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(self.conv(x), self.factor)


class ConvPixelShuffleUpsample(nn.Module):
    """conv3x3 to out*f^2 channels, then pixel_shuffle(f)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.conv = ConvLayer(in_channels, out_channels * factor**2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), self.factor)


class InterpolateConvUpsample(nn.Module):
    """nearest x f, then conv3x3 (SANA decoders)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.conv = ConvLayer(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


def build_downsample(kind: str, in_channels: int, out_channels: int, factor: int = 2) -> nn.Module:
    if kind == "pixel_unshuffle":
        return ConvPixelUnshuffleDownsample(in_channels, out_channels, factor)
    if kind == "conv":
        if factor != 2:
            raise ValueError("a strided-conv downsample only supports factor 2")
        return ConvLayer(in_channels, out_channels, 3, stride=2)
    raise ValueError(f"unknown downsample {kind!r} (expected 'pixel_unshuffle' or 'conv')")


def build_upsample(kind: str, in_channels: int, out_channels: int, factor: int = 2) -> nn.Module:
    if kind == "pixel_shuffle":
        return ConvPixelShuffleUpsample(in_channels, out_channels, factor)
    if kind == "interpolate":
        return InterpolateConvUpsample(in_channels, out_channels, factor)
    raise ValueError(f"unknown upsample {kind!r} (expected 'pixel_shuffle' or 'interpolate')")


def downsample_block(kind: str, in_channels: int, out_channels: int, shortcut: bool = True) -> nn.Module:
    """An encoder stage's x2 downsampling; `shortcut`: add the space-to-channel + channel-averaging shortcut."""
    main = build_downsample(kind, in_channels, out_channels)
    if not shortcut:
        return PlainBlock(main)
    return ResidualBlock(main, PixelUnshuffleChannelAveraging(in_channels, out_channels, 2))


def upsample_block(kind: str, in_channels: int, out_channels: int, shortcut: bool = True) -> nn.Module:
    """A decoder stage's x2 upsampling; `shortcut`: add the channel-duplicating + channel-to-space shortcut."""
    main = build_upsample(kind, in_channels, out_channels)
    if not shortcut:
        return PlainBlock(main)
    return ResidualBlock(main, ChannelDuplicatingPixelShuffle(in_channels, out_channels, 2))


# ----------------------------------------------------------------------------- channel-sliceable convs (DC-AE 1.5)
class SliceableOutputConv(nn.Module):
    """Encoder output conv whose first k output channels can be used alone (structured latent space)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, kernel_size // 2)

    def forward(self, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:
        if out_channels is None or out_channels == self.conv.out_channels:
            return self.conv(x)
        w, b = self.conv.weight[:out_channels], self.conv.bias[:out_channels]
        return F.conv2d(x, w, b, 1, self.conv.padding)


class SliceableInputConv(nn.Module):
    """Decoder input conv that accepts only the first k latent channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        if k == self.conv.in_channels:
            return self.conv(x)
        if k > self.conv.in_channels:
            raise ValueError(f"latent has {k} channels, the decoder accepts at most {self.conv.in_channels}")
        return F.conv2d(x, self.conv.weight[:, :k], self.conv.bias, 1, self.conv.padding)


# ----------------------------------------------------------------------------- blocks
class ResBlock(nn.Module):
    """conv3x3 (bias) -> act -> conv3x3 (no bias) -> norm. Wrapped in a ResidualBlock with identity."""

    def __init__(self, channels: int, norm: str | None, act: str | None) -> None:
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, bias=True, act=act)
        self.conv2 = ConvLayer(channels, channels, 3, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention over N tokens. q, k, v: (B, heads, d, N), already ReLU'd (q, k).

    out_i = sum_j v_j (k_j . q_i) / sum_j (k_j . q_i). Computed as (v_pad k^T) q with v padded by a row
    of ones, so that the normaliser comes out of the same matmul. Always in fp32: the sums over N tokens
    overflow fp16 and lose precision in bf16.
    """
    q, k, v = q.float(), k.float(), v.float()
    v = F.pad(v, (0, 0, 0, 1), value=1.0)  # (B, h, d+1, N)
    vk = torch.matmul(v, k.transpose(-1, -2))  # (B, h, d+1, d)
    out = torch.matmul(vk, q)  # (B, h, d+1, N)
    return out[:, :, :-1] / (out[:, :, -1:] + eps)


def relu_quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """Same kernel as `relu_linear_attention`, N x N form; cheaper when N <= head dim."""
    q, k, v = q.float(), k.float(), v.float()
    att = torch.matmul(k.transpose(-1, -2), q)  # (B, h, N, N)
    att = att / (att.sum(dim=2, keepdim=True) + eps)
    return torch.matmul(v, att)


class LiteMLA(nn.Module):
    """Lightweight multi-scale ReLU linear attention (EfficientViT).

    qkv is one 1x1 conv to 3C channels in head-major layout: head h owns channels [96h, 96h+96) as
    [q(32) | k(32) | v(32)]. Each multi-scale branch (depthwise kxk + grouped 1x1) aggregates the same
    3C channels over a neighbourhood and contributes extra heads.
    """

    def __init__(self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (), norm: str = "trms2d") -> None:
        super().__init__()
        self.head_dim = head_dim
        heads = channels // head_dim
        self.qkv = ConvLayer(channels, 3 * channels, 1, bias=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * channels, 3 * channels, s, padding=s // 2, groups=3 * channels, bias=False),
                nn.Conv2d(3 * channels, 3 * channels, 1, groups=3 * heads, bias=False),
            )
            for s in scales
        )
        self.proj = ConvLayer(channels * (1 + len(scales)), channels, 1, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        if len(self.aggreg):
            qkv = torch.cat([qkv] + [agg(qkv) for agg in self.aggreg], dim=1)
        qkv = qkv.reshape(b, -1, 3 * self.head_dim, h * w)
        q, k, v = qkv.chunk(3, dim=2)
        q, k = F.relu(q), F.relu(k)
        attend = relu_linear_attention if h * w > self.head_dim else relu_quadratic_attention
        out = attend(q, k, v).to(x.dtype)
        return self.proj(out.reshape(b, -1, h, w))


class GLUMBConv(nn.Module):
    """Gated inverted bottleneck: 1x1 C->8C + SiLU, depthwise 3x3, split (x, gate), x*SiLU(gate), 1x1 4C->C + norm."""

    def __init__(self, channels: int, expand_ratio: float = 4, norm: str = "trms2d", act: str = "silu") -> None:
        super().__init__()
        hidden = int(channels * expand_ratio)
        self.inverted_conv = ConvLayer(channels, 2 * hidden, 1, bias=True, act=act)
        self.depth_conv = ConvLayer(2 * hidden, 2 * hidden, 3, groups=2 * hidden, bias=True)
        self.glu_act = build_act(act)
        self.point_conv = ConvLayer(hidden, channels, 1, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depth_conv(self.inverted_conv(x))
        x, gate = x.chunk(2, dim=1)
        return self.point_conv(x * self.glu_act(gate))


class EfficientViTBlock(nn.Module):
    """Global context (LiteMLA) then local mixing (GLUMBConv), each with an identity residual."""

    def __init__(
        self,
        channels: int,
        scales: tuple[int, ...] = (),
        norm: str = "trms2d",
        act: str = "silu",
        head_dim: int = 32,
        local_norm: str | None = None,
    ) -> None:
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(channels, head_dim, scales, norm), nn.Identity())
        self.local_module = ResidualBlock(GLUMBConv(channels, norm=local_norm or norm, act=act), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


# Block types: "ResBlock", or an EfficientViT block "EViT[S<k>...]GLU" whose attention has one multi-scale
# aggregation branch per S<k> (k x k depthwise). The releases use "EViTGLU" and "EViTS5GLU" (SANA).
BLOCK_TYPES = ("ResBlock", "EViTGLU", "EViTS5GLU")
_EVIT = re.compile(r"EViT((?:S\d+)*)GLU")


def evit_scales(kind: str) -> tuple[int, ...] | None:
    """The multi-scale kernel sizes of an EfficientViT block type ("EViTS3S5GLU" -> (3, 5)); None otherwise."""
    m = _EVIT.fullmatch(kind)
    return None if m is None else tuple(int(k) for k in re.findall(r"\d+", m.group(1)))


def evit_block_type(scales: tuple[int, ...]) -> str:
    return "EViT" + "".join(f"S{k}" for k in scales) + "GLU"


def build_block(
    kind: str, channels: int, norm: str | None, act: str | None, head_dim: int = 32, local_norm: str | None = None
) -> nn.Module:
    """A stage's block; `local_norm` overrides the norm of an EfficientViT block's GLUMBConv."""
    if kind == "ResBlock":
        return ResidualBlock(ResBlock(channels, norm, act), nn.Identity())
    scales = evit_scales(kind)
    if scales is None:
        raise ValueError(f"unknown block type {kind!r} (expected 'ResBlock' or 'EViT[S<k>...]GLU', e.g. {BLOCK_TYPES})")
    return EfficientViTBlock(channels, scales, norm or "trms2d", act or "silu", head_dim, local_norm)
