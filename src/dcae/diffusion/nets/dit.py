"""DiT (Peebles & Xie 2023): a transformer whose LayerNorms are modulated by time and condition (adaLN-zero).

Takes `(x, t, c)`: latents B x C x H x W, a float timestep per sample on the 0..1000 scale (each diffusion
process maps its own time onto that scale, so one sinusoidal embedding fits DDPM and flow matching alike), and
a condition (dcae.diffusion.conditioning): class labels, whose embedding is added to the time embedding.
With `num_classes=0` the model is unconditional and `c` is ignored. The DC-AE paper's DiT-XL/1 uses patch size
1 on f32/f64 latents.
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
    TimestepEmbedder,
    adaptive_head,
    adaptive_patch_embed,
    check_channels,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)


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
        self.patch_size = patch_size
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, channels: int | None = None, full: int = 0) -> torch.Tensor:
        """`channels` < `full`: only the rows of the first `channels` output channels (DC-AE 1.5)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        if channels is None or channels == full:
            return self.linear(x)
        return adaptive_head(self.linear, x, channels, full, self.patch_size)


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
        adaptive_channel: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        self.conditioning = conditioning_for(num_classes)
        # DC-AE 1.5: one set of weights serves any leading subset of the latent channels (structured latents).
        self.adaptive_channel = adaptive_channel
        if adaptive_channel and learn_sigma:
            raise ValueError("adaptive_channel needs learn_sigma=False (the output channels follow the input)")
        self.grid = input_size // patch_size
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # One extra row: the null class that classifier-free guidance conditions on.
        self.y_embedder = self.conditioning.embedder(hidden_size, released_layout)
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition | torch.Tensor | None = None) -> torch.Tensor:
        channels = x.shape[1]
        check_channels(channels, self.in_channels, self.adaptive_channel)
        x = adaptive_patch_embed(self.x_embedder, x, self.in_channels) + self.pos_embed  # B x T x D
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(class_labels(cond, x.shape[0], self.num_classes, x.device))
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c, channels, self.in_channels)
        out_channels = self.out_channels if channels == self.in_channels else channels
        return unpatchify(x, out_channels, self.patch_size, self.grid)
