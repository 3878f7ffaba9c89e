"""The `accelerate.Accelerator` every trainer runs under."""

from __future__ import annotations

from datetime import timedelta

import torch


def make_accelerator(mixed_precision: str = "no", find_unused_parameters: bool = False, timeout_s: int | None = None):
    """The `accelerate.Accelerator` of a training run, on one process or under `accelerate launch`/torchrun.

    Without a GPU, accelerate only sets up multi-process (gloo) training when told it runs on the CPU;
    otherwise each process of a CPU torchrun would train alone. mixed_precision "no" defers to the
    launcher (`accelerate launch --mixed_precision bf16`); an explicit value wins. `timeout_s`: how long a
    collective may wait (config `parallel.timeout_s`; multi-node runs whose first steps compile or read slowly)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    if timeout_s is not None:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)))
    mp = None if mixed_precision == "no" else mixed_precision
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
