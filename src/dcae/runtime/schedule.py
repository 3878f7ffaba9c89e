"""The learning rate as a pure function of the step (so a resumed run needs no scheduler state)."""

from __future__ import annotations

import math
from typing import Protocol


class LRSettings(Protocol):
    lr: float
    warmup_steps: int
    schedule: str  # constant | cosine
    min_lr_ratio: float


SCHEDULES = ("constant", "cosine")


def lr_at(step: int, total: int, o: LRSettings) -> float:
    """Linear warmup from 0 over `warmup_steps`, then constant, or cosine decay to lr * min_lr_ratio at `total`."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    floor = o.lr * o.min_lr_ratio
    return floor + 0.5 * (o.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
