"""Our diffusion networks: DiT, U-ViT and SANA (text-to-image, diffusers' layout), and their named sizes."""

from dcae.diffusion.nets.dit import DiT
from dcae.diffusion.nets.registry import (
    DIT_SIZES,
    SANA_SIZES,
    UVIT_SIZES,
    create_diffusion_model,
    list_diffusion_models,
    parse_model_name,
    set_grad_checkpointing,
    transformer_blocks,
)
from dcae.diffusion.nets.sana import SanaTransformer
from dcae.diffusion.nets.uvit import UViT

__all__ = [
    "DIT_SIZES",
    "SANA_SIZES",
    "UVIT_SIZES",
    "DiT",
    "SanaTransformer",
    "UViT",
    "create_diffusion_model",
    "list_diffusion_models",
    "parse_model_name",
    "set_grad_checkpointing",
    "transformer_blocks",
]
