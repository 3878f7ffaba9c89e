"""Named diffusion models: 'DiT-XL/1', 'UViT-H/1', ... -> a network for given latents."""

from __future__ import annotations

import inspect
import re

import torch.nn as nn

from dcae.diffusion.nets.dit import DiT
from dcae.diffusion.nets.uvit import UViT
from dcae.errors import UnknownModelError

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
