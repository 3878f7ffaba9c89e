"""The autoencoder trainer under `parallel.strategy: fsdp` (dcae.runtime.sharding): every block of the encoder's
and decoder's stages is one FSDP unit, the root holds the input and output layers. The phases with a GAN term
run unsharded: their adaptive weight differentiates the loss with respect to the last decoder layer's weight
(under FSDP a sharded tensor the forward never sees), and the phase that has it (3) trains the decoder head
only, a few million parameters that fit any GPU."""

from __future__ import annotations

import torch
from torch import nn

from dcae.runtime import sharding
from dcae.runtime.memory import MemoryPlan, plan


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


def phase_plan(model: nn.Module, cfg, phase, world: int, micro_batch: int) -> MemoryPlan:
    """The memory plan of a phase's autoencoder (its trainable set as selected; the discriminator and the
    perceptual network are not in it), before sharding."""
    meta = sharding.meta_copy(model)
    meta.enable_gradient_checkpointing(False)  # activation_bytes applies checkpointing itself
    dtype = torch.bfloat16 if cfg.mixed_precision in ("bf16", "fp16") else torch.float32
    x = torch.empty(micro_batch, 3, phase.resolution, phase.resolution, device="meta", dtype=dtype)
    strategy = "fsdp" if sharded_phase(cfg, phase) else "ddp"
    return plan(meta, stage_units(meta), (x,), strategy=strategy, world=world, micro_batch=micro_batch,
                mixed_precision=cfg.mixed_precision, checkpointing=cfg.model.gradient_checkpointing,
                reshard_after_forward=cfg.parallel.reshard_after_forward, grad_accum=cfg.grad_accum)  # fmt: skip
