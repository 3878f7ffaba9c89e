"""Diffusion transformers for DC-AE latents: DiT (adaLN-zero) and U-ViT (long skips, conditions as tokens).

Both take `(x, t, y)`: latents Bx C x H x W, a float timestep per sample on the 0..1000 scale (the
diffusion process maps its own time onto that scale, so one sinusoidal embedding fits DDPM and flow
matching alike), and integer class labels where `num_classes` is the null class used for classifier-free
guidance. With `num_classes=0` the model is unconditional and `y` is ignored.

References: facebookresearch/DiT (models.py), baofff/U-ViT (libs/uvit.py), and the DC-AE paper's
UViT-H/1 and DiT-XL/1 setups (patch size 1 on f32/f64 latents).
"""

from __future__ import annotations

import inspect
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

#################################################################################
#                         Shared layers and embeddings                          #
#################################################################################


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


class LabelEmbedder(nn.Module):
    """The class table under the name the released DC-Gen checkpoints use (`<owner>.embedding_table.weight`)."""

    def __init__(self, num_rows: int, dim: int) -> None:
        super().__init__()
        # nn.Embedding's own N(0, 1) init, skipped on the meta device (where it is slow and holds no values)
        self.embedding_table = nn.Embedding(num_rows, dim, _weight=torch.empty(num_rows, dim))
        if self.embedding_table.weight.device.type != "meta":
            nn.init.normal_(self.embedding_table.weight)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


def label_table(num_classes: int, dim: int, released_layout: bool) -> nn.Module | None:
    """num_classes + 1 rows (the last is the null class of classifier-free guidance), or None if unconditional."""
    if num_classes <= 0:
        return None
    return LabelEmbedder(num_classes + 1, dim) if released_layout else nn.Embedding(num_classes + 1, dim)


def unpatchify(x: torch.Tensor, channels: int, patch_size: int, grid: int) -> torch.Tensor:
    """B x T x (p*p*C) -> B x C x H x W, inverse of the patch embedding's token order."""
    B = x.shape[0]
    p = patch_size
    x = x.reshape(B, grid, grid, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, grid * p, grid * p)


#################################################################################
#                                      DiT                                      #
#################################################################################


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning (adaLN-zero)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023). With `learn_sigma` the output has 2x channels: the
    prediction, then the variance interpolation values of improved DDPM."""

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        released_layout: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        self.grid = input_size // patch_size
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # One extra row: the null class that classifier-free guidance conditions on.
        self.y_embedder = label_table(num_classes, hidden_size, released_layout)
        on_meta = torch.empty(0).device.type == "meta"  # built for shapes only: no values to compute
        table = (
            torch.empty(1, self.grid**2, hidden_size) if on_meta else sincos_pos_embed_2d(hidden_size, self.grid)[None]
        )
        if released_layout:  # the released checkpoints store the fixed table as a frozen parameter
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        else:  # fixed, so a non-persistent buffer: it is rebuilt from the config and never saved
            self.register_buffer("pos_embed", table, persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if self.pos_embed.device.type != "meta":  # meta tensors hold no values (and their init is slow)
            self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight  # initialise the patch embedding like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(next(self.y_embedder.parameters()), std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-zero: every residual branch and the output start at zero, so the network starts as identity
        # on the residual stream and predicts 0.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed  # B x T x D
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:  # no labels: everything is the null class
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)
        return unpatchify(x, self.out_channels, self.patch_size, self.grid)


#################################################################################
#                                     U-ViT                                     #
#################################################################################


class UViTBlock(nn.Module):
    """Pre-norm transformer block; blocks of the second half first fuse their long skip (concat + linear)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none")

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT (Bao et al. 2023) as used by DC-AE: time and class are tokens, `depth // 2` in-blocks, a mid
    block and `depth // 2` out-blocks, each out-block fed by the matching in-block through a long skip."""

    def __init__(
        self,
        input_size: int = 8,
        patch_size: int = 1,
        in_channels: int = 128,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        final_conv: bool = False,
        released_layout: bool = False,
        adaptive_channel: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_classes, self.hidden_size = learn_sigma, num_classes, hidden_size
        # DC-AE 1.5: one set of weights serves any leading subset of the latent channels (structured latents).
        self.adaptive_channel = adaptive_channel
        if adaptive_channel and learn_sigma:
            raise ValueError("adaptive_channel needs learn_sigma=False (the output channels follow the input)")
        self.grid = input_size // patch_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        # DC-AE's UViT feeds the raw sinusoid as the time token; the original U-ViT optionally adds an MLP.
        self.time_embed = (
            nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(), nn.Linear(4 * hidden_size, hidden_size))
            if mlp_time_embed
            else nn.Identity()
        )
        self.label_emb = label_table(num_classes, hidden_size, released_layout)
        self.extras = 2 if num_classes > 0 else 1  # condition tokens in front of the patch tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.grid**2, hidden_size))

        self.in_blocks = nn.ModuleList(
            [UViTBlock(hidden_size, num_heads, mlp_ratio, qkv_bias) for _ in range(depth // 2)]
        )
        self.mid_block = UViTBlock(hidden_size, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList(
            [UViTBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, skip=True) for _ in range(depth // 2)]
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.decoder_pred = nn.Linear(hidden_size, patch_size**2 * self.out_channels)
        # The U-ViT paper's 3x3 conv against patch-boundary artifacts; DC-AE's patch-1 models omit it.
        self.final_layer = (
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1) if final_conv else nn.Identity()
        )
        if self.pos_embed.device.type != "meta":  # meta tensors hold no values (and their init is slow)
            self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _run(self, block: UViTBlock, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, skip, use_reentrant=False)
        return block(x, skip)

    def _embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens; with adaptive channels a c-channel input uses the first c input channels of the conv."""
        c = x.shape[1]
        if c == self.in_channels:
            return self.patch_embed(x)
        if not self.adaptive_channel or not 0 < c < self.in_channels:
            raise ValueError(
                f"the model takes {self.in_channels} latent channels"
                + (f" or fewer (adaptive channels), got {c}" if self.adaptive_channel else f", got {c}")
            )
        proj = self.patch_embed.proj
        x = F.conv2d(x, proj.weight[:, :c], proj.bias, stride=proj.stride)
        return x.flatten(2).transpose(1, 2)

    def _predict(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """Tokens -> output channels; with adaptive channels only the first channels * p * p rows of the head."""
        if channels == self.in_channels:
            return self.decoder_pred(x)
        rows = channels * self.patch_size**2
        return F.linear(x, self.decoder_pred.weight[:rows], self.decoder_pred.bias[:rows])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        channels = x.shape[1]
        x = self._embed_patches(x)
        tokens = [self.time_embed(timestep_embedding(t, self.hidden_size).to(x.dtype))[:, None]]
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            tokens.append(self.label_emb(y)[:, None])
        x = torch.cat([*tokens[::-1], x], dim=1) + self.pos_embed  # [label, time, patches] as in U-ViT

        skips = []
        for block in self.in_blocks:
            x = self._run(block, x)
            skips.append(x)
        x = self._run(self.mid_block, x)
        for block in self.out_blocks:
            x = self._run(block, x, skips.pop())

        x = self._predict(self.norm(x), channels)[:, self.extras :]
        out_channels = self.out_channels if channels == self.in_channels else channels
        return self.final_layer(unpatchify(x, out_channels, self.patch_size, self.grid))


#################################################################################
#                                Named model sizes                              #
#################################################################################

# (depth, width, heads). DiT sizes from the DiT paper (Table 1); U-ViT sizes from the U-ViT paper (depth counts
# in + out blocks, the mid block comes on top: UViT-H = 14 + 1 + 14) and UViT-2B from DC-AE (width 2048, 32 heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
UVIT_SIZES = {"S": (12, 512, 8), "M": (16, 768, 12), "L": (20, 1024, 16), "H": (28, 1152, 16), "2B": (28, 2048, 32)}
_NAME = re.compile(r"^(DiT|UViT)-([A-Z0-9]+)/(\d+)$", re.IGNORECASE)


def list_diffusion_models() -> list[str]:
    return [f"DiT-{s}/{p}" for s in DIT_SIZES for p in (1, 2, 4, 8)] + [
        f"UViT-{s}/{p}" for s in UVIT_SIZES for p in (1, 2, 4)
    ]


def parse_model_name(name: str) -> tuple[str, dict]:
    """'DiT-XL/1' -> ('DiT', {depth, hidden_size, num_heads, patch_size})."""
    m = _NAME.match(name.strip())
    family = {"dit": "DiT", "uvit": "UViT"}.get(m.group(1).lower()) if m else None
    sizes = DIT_SIZES if family == "DiT" else UVIT_SIZES
    size = m.group(2).upper() if m else None
    if m is None or size not in sizes:
        from dcae.errors import UnknownModelError

        raise UnknownModelError(
            f"unknown diffusion model {name!r}: use <DiT|UViT>-<size>/<patch>, DiT sizes {list(DIT_SIZES)}, "
            f"UViT sizes {list(UVIT_SIZES)}, e.g. DiT-XL/1 or UViT-H/1"
        )
    depth, width, heads = sizes[size]
    return family, {"depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": int(m.group(3))}


def create_diffusion_model(
    name: str, in_channels: int, input_size: int, num_classes: int = 1000, learn_sigma: bool = False, **overrides
) -> DiT | UViT:
    """A named model (e.g. 'DiT-XL/1', 'UViT-H/1') for latents of `in_channels` x `input_size`^2. Keyword
    overrides (depth, hidden_size, num_heads, mlp_ratio, ...) replace the named size, for small experiments."""
    family, kwargs = parse_model_name(name)
    kwargs.update(overrides)
    cls = DiT if family == "DiT" else UViT
    valid = set(inspect.signature(cls).parameters) - {"input_size", "in_channels", "num_classes", "learn_sigma"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        from dcae.errors import UnknownModelError

        raise UnknownModelError(
            f"unknown {family} setting(s) {', '.join(map(repr, unknown))} in the model overrides; valid: "
            f"{', '.join(sorted(valid))} (YAML needs a space after the colon: {{depth: 4}})"
        )
    return cls(
        input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma, **kwargs
    )


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> None:
    """Recompute each transformer block in the backward pass: less activation memory for ~30% more compute."""
    model.grad_checkpointing = enabled
