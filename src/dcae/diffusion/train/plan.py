"""The memory plan of a diffusion / text-to-image run (dcae.runtime.memory) from its config and latent cache:
printed when training starts, and by `dcae diffusion train CONFIG --plan` / `dcae t2i train CONFIG --plan`
without training."""

from __future__ import annotations

import torch

from dcae.diffusion.nets import create_diffusion_model, transformer_blocks
from dcae.diffusion.train import checkpoint as run_ckpt
from dcae.diffusion.train.lora import spec_of, train_only
from dcae.runtime.memory import MemoryPlan, plan


def memory_plan(cfg, model_args: dict, latent_shape: tuple[int, int, int], conditioning, world: int,
                memory: int | None = None) -> MemoryPlan:  # fmt: skip
    """The plan of `cfg` on `world` processes, for the network `model_args` builds and one micro-batch of
    latents of `latent_shape` (the most common bucket of a text cache)."""
    if cfg.finetune.lora.rank and "lora" not in model_args:  # --plan: before the training loop adds them
        model_args = {**model_args, "lora": spec_of(cfg.finetune)}
    with torch.device("meta"):  # shapes only: a 4.8B network costs nothing here
        model = run_ckpt.build_model(model_args)  # with its LoRA adapters, if any (only they train)
    if cfg.finetune.trainable:  # frozen weights need no gradients, optimizer state or EMA
        train_only(model, cfg.finetune.trainable)
    micro = max(cfg.batch_size // (world * cfg.grad_accum), 1)
    return plan_network(model, micro, latent_shape, conditioning, strategy=cfg.parallel.strategy, world=world,
                        mixed_precision=cfg.mixed_precision, checkpointing=cfg.model.gradient_checkpointing,
                        reshard_after_forward=cfg.parallel.reshard_after_forward, grad_accum=cfg.grad_accum,
                        memory=memory)  # fmt: skip


def plan_network(model: torch.nn.Module, micro_batch: int, latent_shape: tuple[int, int, int], conditioning,
                 **kw) -> MemoryPlan:  # fmt: skip
    """The plan of a meta-device network for micro-batches of `micro_batch` latents of `latent_shape`."""
    dtype = torch.bfloat16 if kw["mixed_precision"] in ("bf16", "fp16") else torch.float32
    x = torch.empty(micro_batch, *latent_shape, device="meta", dtype=dtype)
    t = torch.empty(micro_batch, device="meta")
    gen = torch.Generator().manual_seed(0)  # a plan must not move the run's global random state
    cond = conditioning.random(micro_batch, device="meta", generator=gen)
    return plan(model, transformer_blocks(model), (x, t, cond), micro_batch=micro_batch, **kw)


def named_network_plan(name: str, latent_shape: tuple[int, int, int], micro_batch: int, conditioning,
                       **kw) -> MemoryPlan:  # fmt: skip
    """The plan of a named model (`SANA-1600M`, `DiT-XL/1`, ...) on latents of `latent_shape` (the docs' table)."""
    C, H, _ = latent_shape
    with torch.device("meta"):
        model = create_diffusion_model(name, in_channels=C, input_size=H, **conditioning.network_args())
    return plan_network(model, micro_batch, latent_shape, conditioning, **kw)
