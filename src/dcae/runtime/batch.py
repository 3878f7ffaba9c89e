"""The global batch: in every trainer's config `batch_size` is the number of images of one optimizer step, over
all processes and gradient accumulation steps together. Each process runs `grad_accum` micro-batches of

    batch_size / (processes x grad_accum)

images per step, so a config means the same training on one GPU with accumulation as on eight without it.
"""

from __future__ import annotations

from dcae.runtime.config import ConfigError


def micro_batch(batch_size: int, processes: int, grad_accum: int, field: str = "batch_size") -> int:
    """Images per micro-batch per process, or a one-line ConfigError naming `field` when the global batch
    does not divide into the processes and accumulation steps."""
    parts = processes * grad_accum
    if batch_size < parts or batch_size % parts:
        procs = f"{processes} process" + ("es" if processes != 1 else "")
        raise ConfigError(
            f"{field} {batch_size} is not divisible by the {procs} x {grad_accum} accumulation steps "
            f"({field} is the global batch of one optimizer step: use a multiple of {parts})"
        )
    return batch_size // parts


def describe(batch_size: int, processes: int, grad_accum: int) -> str:
    """'batch 32 = 2 processes x 2 accumulation x 8' (the split `micro_batch` makes)."""
    m = batch_size // (processes * grad_accum)
    procs = f"{processes} process" + ("es" if processes != 1 else "")
    return f"batch {batch_size} = {procs} x {grad_accum} accumulation x {m}"
