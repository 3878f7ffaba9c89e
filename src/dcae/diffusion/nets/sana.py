"""SANA (Xie et al. 2024): a linear-attention text-to-image transformer on DC-AE latents, in the layout of
diffusers' `SanaTransformer2DModel`, so that the state-dict keys ARE diffusers' keys and a
`Efficient-Large-Model/Sana_*_diffusers` transformer folder loads as it is (`from_diffusers`, `save_diffusers`).

A block (`SanaBlock`): ReLU linear self-attention (EfficientViT's kernel, head dim 32, in fp32), softmax
cross-attention to the text tokens under their padding mask (no norm before it, no gate), then the GLUMBConv
feed-forward (1x1 up, depthwise 3x3, gated SiLU, 1x1 down) on the token grid. Time enters through adaLN-single:
one timestep MLP gives 6 x width, each block adds its own `scale_shift_table` for shift / scale / gate of the
self-attention and the feed-forward. The caption goes through Linear-GELU(tanh)-Linear, then RMSNorm. No
position embedding (the released 512 / 1024 px models), or a sin-cos one scaled to `sample_size` when
`interpolation_scale` is set (the 2K / 4K models).

Takes `(x, t, cond)`: latents B x C x H x W (any H, W the patch size divides), a float timestep per sample on the
0..1000 scale of `dcae.diffusion.processes` and a `Text` condition. Time: our flow matching calls the model with
t * 1000 where x_t = (1 - t) x0 + t noise and the target is v = noise - x0; diffusers' SanaPipeline with a
FlowMatch (Euler or flow DPM-Solver) scheduler calls the transformer with `sigma * 1000 * timestep_scale` for the
same x_t = (1 - sigma) x0 + sigma noise and steps along the same v. So t = sigma, and
`model(x, t * 1000, cond) == SanaTransformer2DModel(x, timestep=t * 1000 * timestep_scale, ...)`: this module
applies `timestep_scale` itself (1.0 in every released SANA; SANA-Sprint's teacher uses another).

Every option of diffusers' config is honoured (SANA-Sprint's guidance embedding, `guidance_embeds`:
`model(x, t, cond, guidance=...)`) or refused by name: q/k norms other than SANA 1.5's `rms_norm_across_heads`,
and a `cross_attention_dim` other than the width (which diffusers' own model cannot run either).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dcae.diffusion.conditioning import Text, TextConditioning
from dcae.diffusion.nets.layers import (
    PatchEmbed,
    RMSNorm,
    adaptive_head,
    adaptive_patch_embed,
    check_channels,
    timestep_embedding,
)
from dcae.errors import UserError, WeightsError
from dcae.models.layers import relu_linear_attention
from dcae.models.weights import (
    DIFFUSERS_WEIGHTS,
    _diffusers_version,
    read_sharded,
    read_state_dict,
    state_dict_problems,
)
from dcae.utils.io import atomic_save_safetensors, atomic_write_json

DIFFUSERS_CLASS = "SanaTransformer2DModel"
QK_NORMS = (None, "rms_norm_across_heads")  # SANA 1.0 and SANA 1.5
MASK_BIAS = -10000.0  # diffusers' additive bias for padded text tokens (a fully padded prompt stays finite)


class SanaConfigError(UserError, ValueError):
    """A SanaTransformer2DModel config this module cannot build exactly; the message names every field."""


# ----------------------------------------------------------------------------- layers
def sincos_pos_embed(dim: int, h: int, w: int, base_size: int, scale: float, device=None) -> torch.Tensor:
    """SANA's / diffusers' 2-D sin-cos table for an h x w grid, (h*w, dim) in fp32: positions are stretched so
    that every grid spans `base_size` (the training grid) / `scale`; the first half of the channels embeds the
    column, the second the row, each [sin | cos]. Same float32 / float64 steps as theirs."""
    gh = torch.arange(h, device=device, dtype=torch.float32) / (h / base_size) / scale
    gw = torch.arange(w, device=device, dtype=torch.float32) / (w / base_size) / scale
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim / 4.0))

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    cols, rows = gw[None, :].expand(h, w), gh[:, None].expand(h, w)  # token order: row-major
    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class LinearAttention(nn.Module):
    """Multi-head ReLU linear self-attention (diffusers' SanaLinearAttnProcessor2_0): per head
    out_i = sum_j v_j (k_j . q_i) / (sum_j k_j . q_i + 1e-15) with q, k ReLU'd, in fp32."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, qk_norm: str | None, dropout: float) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_q = RMSNorm(inner) if qk_norm else None  # (diffusers' key order)
        self.norm_k = RMSNorm(inner) if qk_norm else None
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=bias) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        # (B, N, heads * d) -> (B, heads, d, N): head h owns channels [h*d, (h+1)*d)
        q, k, v = (y.transpose(1, 2).unflatten(1, (self.heads, -1)) for y in (q, k, v))
        out = relu_linear_attention(F.relu(q), F.relu(k), v)  # fp32
        out = self.to_out(out.flatten(1, 2).transpose(1, 2).to(x.dtype))
        return out.clip(-65504, 65504) if x.dtype == torch.float16 else out


class CrossAttention(nn.Module):
    """Softmax attention from the image tokens to the text tokens; `bias` is 0 for real tokens, -10000 for
    padding (B, 1, 1, L)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, dropout: float) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_q = RMSNorm(inner) if qk_norm else None  # (diffusers' key order)
        self.norm_k = RMSNorm(inner) if qk_norm else None
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, text: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(text), self.to_v(text)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))  # (B, heads, T, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GLUMBConv(nn.Module):
    """SANA's feed-forward on the token grid: 1x1 conv to 2 x hidden + SiLU, depthwise 3x3, split into
    (x, gate), x * SiLU(gate), 1x1 conv back (no bias, no norm)."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.conv_inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)
        return self.conv_point(x * F.silu(gate))


class SanaBlock(nn.Module):
    """Modulated linear self-attention, plain cross-attention, modulated GLUMBConv (adaLN-single)."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_heads: int, cross_head_dim: int, *,
                 mlp_ratio: float, attention_bias: bool, norm_affine: bool, norm_eps: float, qk_norm: str | None,
                 dropout: float) -> None:  # fmt: skip
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.attn1 = LinearAttention(dim, heads, head_dim, attention_bias, qk_norm, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=norm_affine, eps=norm_eps)
        self.attn2 = CrossAttention(dim, cross_heads, cross_head_dim, qk_norm, dropout)
        self.ff = GLUMBConv(dim, mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, text: torch.Tensor, bias: torch.Tensor, mod: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:  # fmt: skip
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + mod.reshape(B, 6, -1)
        ).chunk(6, dim=1)  # each (B, 1, D)
        h = (self.norm1(x) * (1 + scale_msa) + shift_msa).to(x.dtype)
        x = x + gate_msa * self.attn1(h)
        x = x + self.attn2(x, text, bias)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        h = self.ff(h.unflatten(1, grid).permute(0, 3, 1, 2))  # B x D x h x w
        return x + gate_mlp * h.flatten(2).transpose(1, 2)


class TimestepMLP(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


class AdaLNSingle(nn.Module):
    """PixArt-alpha's adaLN-single: sinusoidal [cos | sin] (256) -> MLP -> the embedding (for the output
    layer) and Linear(SiLU(embedding)) -> 6 x width (for every block)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.emb = nn.ModuleDict({"timestep_embedder": TimestepMLP(dim)})
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb["timestep_embedder"](timestep_embedding(t, 256).to(dtype))
        return self.linear(F.silu(emb)), emb


class GuidanceTimeEmbed(nn.Module):
    """SANA-Sprint's time embedding (diffusers' SanaCombinedTimestepGuidanceEmbeddings): the timestep's and the
    guidance scale's sinusoidal embeddings, each through its MLP, summed; then as adaLN-single."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepMLP(dim)
        self.guidance_embedder = TimestepMLP(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype, guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.timestep_embedder(timestep_embedding(t, 256).to(dtype))
        emb = emb + self.guidance_embedder(timestep_embedding(guidance, 256).to(dtype))
        return self.linear(F.silu(emb)), emb


class CaptionProjection(nn.Module):
    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(y)))


# ----------------------------------------------------------------------------- the network
class SanaTransformer(nn.Module):
    """SANA's linear DiT. Arguments are diffusers' `SanaTransformer2DModel` config fields with its defaults
    (the 1.6B model), plus `max_tokens` (the prompt length the text side pads to; not part of diffusers'
    config). `self.config` holds every diffusers field."""

    def __init__(
        self,
        in_channels: int = 32,
        out_channels: int | None = 32,
        num_attention_heads: int = 70,
        attention_head_dim: int = 32,
        num_layers: int = 20,
        num_cross_attention_heads: int | None = 20,
        cross_attention_head_dim: int | None = 112,
        cross_attention_dim: int | None = 2240,
        caption_channels: int = 2304,
        mlp_ratio: float = 2.5,
        dropout: float = 0.0,
        attention_bias: bool = False,
        sample_size: int = 32,
        patch_size: int = 1,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        guidance_embeds: bool = False,
        guidance_embeds_scale: float = 0.1,
        qk_norm: str | None = None,
        timestep_scale: float = 1.0,
        max_tokens: int = 300,
        adaptive_channel: bool = False,
    ) -> None:
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k in DIFFUSERS_FIELDS}
        self.config["out_channels"] = out_channels = out_channels or in_channels
        dim = num_attention_heads * attention_head_dim
        _check(self.config, dim)
        self.in_channels, self.out_channels, self.patch_size = in_channels, out_channels, patch_size
        self.sample_size, self.timestep_scale = sample_size, timestep_scale
        self.interpolation_scale = interpolation_scale
        self.conditioning = TextConditioning(caption_channels, max_tokens)
        self.grad_checkpointing = False
        # DC-AE 1.5: any leading subset of the latent channels through the same weights (not a diffusers field:
        # the weights are diffusers' own, only the first / last layer is sliced at run time)
        self.adaptive_channel = adaptive_channel
        if adaptive_channel and out_channels != in_channels:
            raise SanaConfigError(f"adaptive_channel needs out_channels = in_channels, got {out_channels}")

        self.patch_embed = PatchEmbed(patch_size, in_channels, dim)
        self.guidance_embeds = bool(guidance_embeds)
        self.time_embed = GuidanceTimeEmbed(dim) if guidance_embeds else AdaLNSingle(dim)
        self.caption_projection = CaptionProjection(caption_channels, dim)
        self.caption_norm = RMSNorm(dim, eps=1e-5)
        self.transformer_blocks = nn.ModuleList(
            SanaBlock(dim, num_attention_heads, attention_head_dim, num_cross_attention_heads,
                      cross_attention_head_dim, mlp_ratio=mlp_ratio, attention_bias=attention_bias,
                      norm_affine=norm_elementwise_affine, norm_eps=norm_eps, qk_norm=qk_norm, dropout=dropout)
            for _ in range(num_layers)
        )  # fmt: skip
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        if self.scale_shift_table.device.type != "meta":  # meta tensors hold no values (and their init is slow)
            self.initialize_weights()

    def initialize_weights(self) -> None:
        """SANA's recipe (NVlabs/Sana Sana.initialize_weights): Xavier-uniform linears with zero biases, the patch
        embedding like a linear layer, N(0, 0.02) for the timestep and caption MLPs and the adaLN-single
        projection; scale-shift tables N(0, 1/width); convolutions keep PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        mlps = [self.time_embed.timestep_embedder, self.time_embed.guidance_embedder] if self.guidance_embeds else [
            self.time_embed.emb["timestep_embedder"]]  # fmt: skip
        for layer in (*(m for mlp in mlps for m in (mlp.linear_1, mlp.linear_2)), self.time_embed.linear,
                      self.caption_projection.linear_1, self.caption_projection.linear_2):  # fmt: skip
            nn.init.normal_(layer.weight, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: Text | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """`guidance`: SANA-Sprint's embedded guidance (B,), as diffusers' `guidance` (the scale times
        guidance_embeds_scale); required exactly when the config has guidance_embeds."""
        if (guidance is None) == self.guidance_embeds:
            raise ValueError("a guidance-embedded SANA (Sprint) takes `guidance`; another SANA takes none")
        if cond is None:
            raise ValueError(
                "SANA is a text-to-image model and has no null prompt of its own: pass a Text condition (its "
                "null() is the empty prompt's encoding, the unconditional half of classifier-free guidance)"
            )
        if not isinstance(cond, Text):
            raise TypeError(f"SANA takes a Text condition (encoded prompts and their mask), got {type(cond).__name__}")
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"latents of {H} x {W} are not divisible by the patch size {p}")
        grid = (H // p, W // p)
        channels = x.shape[1]
        check_channels(channels, self.in_channels, self.adaptive_channel)
        tokens = adaptive_patch_embed(self.patch_embed, x, self.in_channels)  # B x T x D
        if self.interpolation_scale is not None:
            pe = sincos_pos_embed(tokens.shape[-1], *grid, self.sample_size // p, self.interpolation_scale, x.device)
            tokens = (tokens + pe).to(tokens.dtype)
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(B)
        if self.timestep_scale != 1.0:
            t = t * self.timestep_scale
        if self.guidance_embeds:
            g = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(B)
            mod, temb = self.time_embed(t, tokens.dtype, g)
        else:
            mod, temb = self.time_embed(t, tokens.dtype)
        text = self.caption_norm(self.caption_projection(cond.emb.to(self.caption_projection.linear_1.weight.dtype)))
        bias = ((1 - cond.mask.to(tokens.dtype)) * MASK_BIAS)[:, None, None, :]  # B x 1 x 1 x L
        for block in self.transformer_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, text, bias, mod, grid, use_reentrant=False)
            else:
                tokens = block(tokens, text, bias, mod, grid)
        shift, scale = (self.scale_shift_table[None] + temb[:, None]).chunk(2, dim=1)
        tokens = self.norm_out(tokens) * (1 + scale) + shift
        out_channels = self.out_channels if channels == self.in_channels else channels
        out = adaptive_head(self.proj_out, tokens, out_channels, self.out_channels, p)
        out = out.reshape(B, *grid, p, p, out_channels).permute(0, 5, 1, 3, 2, 4)  # B C h p w p
        return out.reshape(B, out_channels, H, W)


# ----------------------------------------------------------------------------- config and weights
DIFFUSERS_FIELDS = tuple(
    k for k in inspect.signature(SanaTransformer).parameters if k not in ("max_tokens", "adaptive_channel")
)


def _check(c: dict[str, Any], dim: int) -> None:
    """Refuse, all at once and by name, what diffusers' model would build differently or not at all."""
    problems = []
    if c["qk_norm"] not in QK_NORMS:
        problems.append(f"qk_norm = {c['qk_norm']!r}: supported are None (SANA) and 'rms_norm_across_heads' (SANA 1.5)")
    if c["cross_attention_dim"] != dim:
        problems.append(f"cross_attention_dim = {c['cross_attention_dim']!r}: must equal num_attention_heads x "
                        f"attention_head_dim = {dim} (the caption is projected to the width)")  # fmt: skip
    for key in ("num_cross_attention_heads", "cross_attention_head_dim", "num_attention_heads", "attention_head_dim",
                "num_layers", "in_channels", "caption_channels", "patch_size", "sample_size"):  # fmt: skip
        if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
            problems.append(f"{key} = {c[key]!r}: expected a positive integer")
    if c["interpolation_scale"] is not None and dim % 4:
        problems.append(
            f"interpolation_scale = {c['interpolation_scale']!r}: a sin-cos table needs a width divisible by 4"
        )
    if problems:
        raise SanaConfigError("unsupported SanaTransformer2DModel config: " + "; ".join(problems))


def config_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from a diffusers config (a config.json's dict): private fields (`_class_name`,
    `_diffusers_version`, ...) are dropped after checking the class; unknown fields are refused by name."""
    name = config.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise SanaConfigError(f"_class_name = {name!r}: not a SANA transformer (expected {DIFFUSERS_CLASS!r})")
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(fields) - set(DIFFUSERS_FIELDS))
    if unknown:
        raise SanaConfigError(f"unknown SanaTransformer2DModel config field(s) {', '.join(map(repr, unknown))}")
    return fields


def diffusers_config(model: SanaTransformer) -> dict[str, Any]:
    """The config.json diffusers writes for this model (every field, the class name and a version)."""
    return {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": _diffusers_version(), **model.config}


def to_diffusers_state_dict(model: SanaTransformer) -> dict[str, torch.Tensor]:
    """The weights under diffusers' names: ours are the same (identity)."""
    return dict(model.state_dict())


def _variant(name: str, variant: str | None) -> str:
    """diffusers' file name of a variant: diffusion_pytorch_model.bf16.safetensors,
    diffusion_pytorch_model.safetensors.index.bf16.json."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _read_folder(folder: Path, variant: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not (folder / "config.json").exists() and (folder / "transformer" / "config.json").exists():
        folder = folder / "transformer"  # a whole pipeline folder
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{folder}: no readable config.json ({exc})") from exc
    for name in (DIFFUSERS_WEIGHTS, f"{DIFFUSERS_WEIGHTS}.index.json", "diffusion_pytorch_model.bin"):
        path = folder / _variant(name, variant)
        if path.exists():
            return config, read_sharded(path) if name.endswith(".index.json") else read_state_dict(path)
    found = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
    hint = " (pass variant=, e.g. 'bf16' for diffusion_pytorch_model.bf16.safetensors)" if found and not variant else ""
    raise WeightsError(
        f"{folder} holds no {_variant(DIFFUSERS_WEIGHTS, variant)} (or sharded); found {found or 'nothing'}{hint}"
    )


def from_diffusers(
    source: str | os.PathLike | dict[str, torch.Tensor],
    config: dict[str, Any] | str | os.PathLike | None = None,
    *,
    max_tokens: int = 300,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> SanaTransformer:
    """Our model from a diffusers `SanaTransformer2DModel`: a folder (config.json + diffusion_pytorch_model
    [.variant].safetensors, sharded or not; a pipeline folder's transformer/ is found) or a state dict with its
    config (a dict or a config.json path; for a folder it replaces the folder's config). Keys are checked
    strictly before loading; the weights keep their dtype unless `dtype` is given."""
    if isinstance(config, str | os.PathLike):
        config = json.loads(Path(config).read_text())
    if isinstance(source, dict):
        if config is None:
            raise ValueError("a state dict needs its config (the transformer's config.json)")
        state_dict = source
    else:
        folder_config, state_dict = _read_folder(Path(source), variant)
        config = config or folder_config
    with torch.device("meta"):  # no random init: every tensor comes from the state dict
        model = SanaTransformer(**config_kwargs(config), max_tokens=max_tokens)
    problems = state_dict_problems(model.state_dict(), state_dict)
    if problems:
        where = "the state dict" if isinstance(source, dict) else str(source)
        raise WeightsError(f"weights in {where} do not fit the SANA config: " + "; ".join(problems))
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def save_diffusers(model: SanaTransformer, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """config.json + diffusion_pytorch_model.safetensors, each written atomically, that
    `diffusers.SanaTransformer2DModel.from_pretrained(folder)` loads. Existing weights are kept unless
    `overwrite`."""
    folder = Path(folder)
    if (folder / DIFFUSERS_WEIGHTS).exists() and not overwrite:
        raise UserError(f"{folder / DIFFUSERS_WEIGHTS} already exists (pass overwrite=True)")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(to_diffusers_state_dict(model), folder / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", diffusers_config(model))
    return folder
