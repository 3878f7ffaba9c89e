"""U-ViT (Bao et al. 2023) as used by DC-AE: time and condition are tokens in front of the patch tokens, and
long skips join each in-block to its out-block. Takes `(x, t, c)` as DiT does (see dit.py). The DC-AE paper's
UViT-H/1 and UViT-2B/1 use patch size 1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from dcae.diffusion.conditioning import Condition, class_labels, conditioning_for
from dcae.diffusion.nets.layers import (
    Attention,
    Mlp,
    PatchEmbed,
    adaptive_head,
    adaptive_patch_embed,
    check_channels,
    timestep_embedding,
    unpatchify,
)


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
        self.conditioning = conditioning_for(num_classes)
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
        self.label_emb = self.conditioning.embedder(hidden_size, released_layout)
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
        check_channels(x.shape[1], self.in_channels, self.adaptive_channel)
        return adaptive_patch_embed(self.patch_embed, x, self.in_channels)

    def _predict(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """Tokens -> output channels; with adaptive channels only the head's rows of the first channels."""
        return adaptive_head(self.decoder_pred, x, channels, self.in_channels, self.patch_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition | torch.Tensor | None = None) -> torch.Tensor:
        channels = x.shape[1]
        x = self._embed_patches(x)
        tokens = [self.time_embed(timestep_embedding(t, self.hidden_size).to(x.dtype))[:, None]]
        if self.label_emb is not None:
            tokens.append(self.label_emb(class_labels(cond, x.shape[0], self.num_classes, x.device))[:, None])
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
