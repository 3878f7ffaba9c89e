"""The autoencoder trainer under `parallel.strategy: fsdp` (dcae.runtime.sharding): every block of the encoder's
and decoder's stages is one FSDP unit, the root holds the input and output layers. The phases with a GAN term
run unsharded: their adaptive weight differentiates the loss with respect to the last decoder layer's weight
(under FSDP a sharded tensor the forward never sees), and the phase that has it (3) trains the decoder head
only, a few million parameters that fit any GPU."""

from __future__ import annotations

import torch
from torch import nn

from dcae.runtime import sharding


def sharded_phase(cfg, phase) -> bool:
    """Whether this phase trains sharded."""
    return cfg.parallel.strategy == "fsdp" and phase.loss.gan_weight == 0


def stage_units(model: nn.Module) -> list[nn.Module]:
    """The blocks of the encoder's and decoder's stages that hold parameters: the FSDP units. Blocks, not
    whole stages: the coders call each block of a stage (and checkpoint it) themselves, never the stage."""
    coders = (model.encoder, model.decoder)
    blocks = [b for c in coders for st in c.stages for b in st.op_list]
    return [b for b in blocks if any(True for _ in b.parameters())]


def shard_autoencoder(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """Shard `model` in place; returns its storage-free template (for the gathered copies on rank 0)."""
    template = sharding.meta_copy(model)
    sharding.shard(model, stage_units(model), cfg.mixed_precision, cfg.parallel.reshard_after_forward, device)
    return template


def whole(template: nn.Module | None, model: nn.Module, main: bool, device) -> nn.Module | None:
    """The unsharded model for evaluation and sample grids on the main process: gathered when sharded (every
    process calls it; None on the others), else the model itself."""
    if template is None:
        return model
    return sharding.full_model(template, model, {}, main, device)
