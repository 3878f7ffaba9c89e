"""DC-AE 1.5's augmented diffusion training (Chen et al., "Accelerating Diffusion Model Convergence with
Structured Latent Space", ICCV 2025).

A structured autoencoder's latent is usable from any leading subset of its channels: the first channels carry
the coarse content, the later ones detail. Augmented training teaches the diffusion model the same structure:
with an adaptive patch embedding (the first c input channels of the patch conv) and a sliced output head (the
rows of the first c channels), one network denoises latent[:, :c] for every trained c, and the loss of a
micro-batch is the mean of the losses on leading subsets drawn from the configured set, plus the whole latent
when `include_full` (the `augmented:` section of the trainer's config, `AugmentedConfig`).

Every subset sees the whole micro-batch (its own times, noise and dropped conditions), so a step costs
(subsets + include_full) forward and backward passes. The subsets are drawn from a generator seeded with the
micro-batch's seed (the step seed of its slot = rank x accumulation + micro-batch): a resumed run draws the
same, DDP ranks draw different ones, and one process with accumulation k draws what k processes draw.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dcae.diffusion.conditioning import Condition
from dcae.diffusion.train.config import AugmentedConfig
from dcae.errors import UserError


def check(cfg: AugmentedConfig, full: int) -> None:
    """The configured channel counts fit a latent of `full` channels (one line naming the option otherwise)."""
    bad = [c for c in cfg.channels if not 1 <= c <= full]
    if bad:
        raise UserError(f"augmented.channels {bad} do not fit the cache's {full} latent channels (use 1..{full})")


def draw_channels(cfg: AugmentedConfig, full: int, seed: int) -> list[int]:
    """The channel counts of one micro-batch: `subsets` draws from cfg.channels (uniform, with replacement), then
    `full` if cfg.include_full."""
    rng = random.Random(seed)
    drawn = [rng.choice(cfg.channels) for _ in range(cfg.subsets)]
    return drawn + [full] if cfg.include_full else drawn


@dataclass
class AugmentedLoss:
    """`process.loss` averaged over leading channel subsets: the same call, so the loop runs either."""

    process: object
    cfg: AugmentedConfig

    def loss(self, model: Callable, x0: torch.Tensor, cond: Condition | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """Per-sample loss (shape B): the mean over the drawn subsets of the process's loss on x0[:, :c]."""
        seed = generator.initial_seed() if generator is not None else random.getrandbits(63)
        channels = draw_channels(self.cfg, x0.shape[1], seed)
        total = 0.0
        for c in channels:
            total = total + self.process.loss(model, x0[:, :c], cond, generator=generator)
        return total / len(channels)


def training_process(process, cfg: AugmentedConfig):
    """What the loop calls `.loss` on: the process itself, or with augmented training its averaged loss."""
    return AugmentedLoss(process, cfg) if cfg.channels else process


def model_overrides(overrides: dict, cfg: AugmentedConfig) -> dict:
    """The network's overrides: with augmented training the adaptive channels are switched on."""
    return {**overrides, "adaptive_channel": True} if cfg.channels else dict(overrides)
