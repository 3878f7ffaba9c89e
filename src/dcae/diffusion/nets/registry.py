"""Named diffusion models: 'DiT-XL/1', 'UViT-H/1', 'SANA-600M', ... -> a network for given latents."""

from __future__ import annotations

import inspect
import re

import torch.nn as nn

from dcae.diffusion.nets.dit import DiT, DiTBlock
from dcae.diffusion.nets.sana import SanaBlock, SanaTransformer
from dcae.diffusion.nets.uvit import UViT, UViTBlock
from dcae.errors import UnknownModelError, UserError

# (depth, width, heads). DiT sizes from the DiT paper (Table 1); U-ViT sizes from the U-ViT paper (depth counts
# in + out blocks, the mid block comes on top: UViT-H = 14 + 1 + 14) and UViT-2B from DC-AE (width 2048, 32 heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
UVIT_SIZES = {"S": (12, 512, 8), "M": (16, 768, 12), "L": (20, 1024, 16), "H": (28, 1152, 16), "2B": (28, 2048, 32)}
_NAME = re.compile(r"^(DiT|UViT)-([A-Z0-9]+)/(\d+)$", re.IGNORECASE)

# SANA: the released checkpoints' shapes (diffusers' scripts/convert_sana_to_diffusers.py): width = heads x 32,
# cross-attention to the same width with its own heads; SANA 1.5 adds RMS q/k norms across heads. Each builds with
# caption_channels 2304 (Gemma-2-2B) unless overridden; 'SANA-tiny' (~0.5M parameters) is for CPU tests.
# (layers, heads of 32, cross-attention heads, cross-attention head dim, q/k norm)
SANA_SIZES: dict[str, tuple[int, int, int, int, str | None]] = {
    "SANA-tiny": (4, 2, 2, 32, None),
    "SANA-600M": (28, 36, 16, 72, None),
    "SANA-1600M": (20, 70, 20, 112, None),
    "SANA1.5-1600M": (20, 70, 20, 112, "rms_norm_across_heads"),
    "SANA1.5-4800M": (60, 70, 20, 112, "rms_norm_across_heads"),
}
_SANA_NAME = re.compile(r"^(SANA(?:1\.5)?-[A-Z0-9]+)(?:/(\d+))?$", re.IGNORECASE)


def list_diffusion_models() -> list[str]:
    return (
        [f"DiT-{s}/{p}" for s in DIT_SIZES for p in (1, 2, 4, 8)]
        + [f"UViT-{s}/{p}" for s in UVIT_SIZES for p in (1, 2, 4)]
        + list(SANA_SIZES)
    )


def parse_model_name(name: str) -> tuple[str, dict]:
    """'DiT-XL/1' -> ('DiT', {depth, hidden_size, num_heads, patch_size}); 'SANA-600M' (patch 1, as released;
    'SANA-600M/2' for patch 2) -> ('SANA', SanaTransformer's arguments)."""
    sana = _SANA_NAME.match(name.strip())
    if sana:
        size = {k.lower(): k for k in SANA_SIZES}.get(sana.group(1).lower())
        if size is None:
            raise UnknownModelError(f"unknown SANA model {name!r}: use one of {', '.join(SANA_SIZES)}")
        layers, heads, cross_heads, cross_head_dim, qk_norm = SANA_SIZES[size]
        return "SANA", {
            "num_layers": layers,
            "num_attention_heads": heads,
            "attention_head_dim": 32,
            "num_cross_attention_heads": cross_heads,
            "cross_attention_head_dim": cross_head_dim,
            "qk_norm": qk_norm,
            "patch_size": int(sana.group(2) or 1),
        }
    m = _NAME.match(name.strip())
    family = {"dit": "DiT", "uvit": "UViT"}.get(m.group(1).lower()) if m else None
    sizes = DIT_SIZES if family == "DiT" else UVIT_SIZES
    size = m.group(2).upper() if m else None
    if m is None or size not in sizes:
        raise UnknownModelError(
            f"unknown diffusion model {name!r}: use <DiT|UViT>-<size>/<patch>, DiT sizes {list(DIT_SIZES)}, "
            f"UViT sizes {list(UVIT_SIZES)}, e.g. DiT-XL/1 or UViT-H/1, or a text-to-image {list(SANA_SIZES)}"
        )
    depth, width, heads = sizes[size]
    return family, {"depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": int(m.group(3))}


def create_diffusion_model(
    name: str,
    in_channels: int,
    input_size: int,
    num_classes: int | None = None,
    learn_sigma: bool = False,
    **overrides,
) -> DiT | UViT | SanaTransformer:
    """A named model (e.g. 'DiT-XL/1', 'UViT-H/1', 'SANA-600M') for latents of `in_channels` x `input_size`^2.
    Keyword overrides (depth, hidden_size, num_heads, mlp_ratio, ...; SANA: its diffusers config fields such as
    num_layers, caption_channels, and max_tokens) replace the named size, for small experiments. Class-conditional
    families default to 1000 classes (0: unconditional); SANA is text-conditioned and takes no classes. For SANA,
    `input_size` is diffusers' `sample_size`, the grid a sin-cos position table (if any) is scaled to; any latent
    size runs."""
    family, kwargs = parse_model_name(name)
    kwargs.update(overrides)
    if family == "SANA":
        return _create_sana(name, in_channels, input_size, num_classes, learn_sigma, kwargs, overrides)
    num_classes = 1000 if num_classes is None else num_classes
    cls = DiT if family == "DiT" else UViT
    valid = set(inspect.signature(cls).parameters) - {"input_size", "in_channels", "num_classes", "learn_sigma"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise UnknownModelError(
            f"unknown {family} setting(s) {', '.join(map(repr, unknown))} in the model overrides; valid: "
            f"{', '.join(sorted(valid))} (YAML needs a space after the colon: {{depth: 4}})"
        )
    return cls(
        input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma, **kwargs
    )


def _create_sana(name, in_channels, input_size, num_classes, learn_sigma, kwargs, overrides) -> SanaTransformer:
    if num_classes:
        raise UserError(f"{name} is text-conditioned: it takes no class labels (num_classes={num_classes})")
    valid = set(inspect.signature(SanaTransformer).parameters) - {"in_channels", "sample_size", "out_channels"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise UnknownModelError(
            f"unknown SANA setting(s) {', '.join(map(repr, unknown))} in the model overrides; valid: "
            f"{', '.join(sorted(valid))}"
        )
    kwargs.setdefault("cross_attention_dim", kwargs["num_attention_heads"] * kwargs["attention_head_dim"])
    out_channels = 2 * in_channels if learn_sigma else in_channels
    return SanaTransformer(in_channels=in_channels, out_channels=out_channels, sample_size=input_size, **kwargs)


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> None:
    """Recompute each transformer block in the backward pass: less activation memory for ~30% more compute."""
    model.grad_checkpointing = enabled


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a DiT, U-ViT or SANA, in order: the units that sharded training (FSDP2) gathers
    and frees one at a time (dcae.runtime.sharding)."""
    return [m for m in model.modules() if isinstance(m, (DiTBlock, UViTBlock, SanaBlock))]
