"""Our diffusion networks: DiT and U-ViT, and their named sizes."""

from dcae.diffusion.nets.dit import DiT
from dcae.diffusion.nets.registry import (
    DIT_SIZES,
    UVIT_SIZES,
    create_diffusion_model,
    list_diffusion_models,
    parse_model_name,
    set_grad_checkpointing,
)
from dcae.diffusion.nets.uvit import UViT

__all__ = [
    "DIT_SIZES",
    "UVIT_SIZES",
    "DiT",
    "UViT",
    "create_diffusion_model",
    "list_diffusion_models",
    "parse_model_name",
    "set_grad_checkpointing",
]
