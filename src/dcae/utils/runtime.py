"""Device and dtype names as the command line spells them."""

from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch spells it (cpu, cuda:1, mps)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected one of {sorted(DTYPES)})")
    return DTYPES[name]


def make_accelerator(mixed_precision: str = "no", find_unused_parameters: bool = False):
    """The `accelerate.Accelerator` of a training run, on one process or under `accelerate launch`/torchrun.

    Without a GPU, accelerate only sets up multi-process (gloo) training when told it runs on the CPU;
    otherwise each process of a CPU torchrun would train alone. mixed_precision "no" defers to the
    launcher (`accelerate launch --mixed_precision bf16`); an explicit value wins."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    mp = None if mixed_precision == "no" else mixed_precision
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def process_group_from_env(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun / `accelerate launch` with more than one
    process the process group is set up here, and "auto" means this process's own GPU; otherwise (0, 1,
    resolve_device(device))."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, resolve_device(device)
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.device if device == "auto" else resolve_device(device)
