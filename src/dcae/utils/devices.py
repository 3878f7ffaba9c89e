"""Device and dtype names as the command line spells them, and the process group of inference commands."""

from __future__ import annotations

import os

import torch

from dcae.utils.cliargs import DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu (AUTO_DEVICE); anything else as torch spells it (DEVICE_EXAMPLES)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def dtype_name(dtype: torch.dtype) -> str:
    """The command line's name of a dtype (fp32, bf16, fp16); torch's own for others."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected one of {sorted(DTYPES)})")
    return DTYPES[name]


def process_group_from_env(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun / `accelerate launch` with more than one
    process the process group is set up here, and "auto" means this process's own GPU; otherwise (0, 1,
    resolve_device(device))."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, resolve_device(device)
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.device if device == "auto" else resolve_device(device)


def match_inductor_to_aten_isa() -> None:
    """Before `torch.compile` on the CPU: make Inductor generate vector code of the width ATen runs at.

    Inductor picks its vector width from the host CPU, not from ATEN_CPU_CAPABILITY. With ATen capped at AVX2 on
    an AVX-512 machine (as CI caps it, to run what the weakest machine runs), its channels-last kernels then
    compute wrong values (PyTorch 2.13: 0.88 relative error on DC-AE's encoder). Only acts when the variable is
    set; a CPU left to itself is untouched."""
    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        return
    import torch._inductor.config as inductor

    width = {"AVX2": 256, "DEFAULT": 1, "NO AVX": 1}.get(torch.backends.cpu.get_cpu_capability())
    if width is not None:
        inductor.cpp.simdlen = width
