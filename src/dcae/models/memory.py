"""Peak tensor memory of a call on any device, CPU and meta included.

CUDA has `torch.cuda.max_memory_allocated`; CPU has no allocator statistics, and process RSS mixes in
the Python heap, allocator caching and page reuse. `TensorMemoryTracker` counts what an implementation
actually asks for: a TorchDispatchMode sees every aten op, and each new storage an op returns is
counted as live until the last tensor that uses it is freed. On the meta device this measures a full
4096 px decode of a full-size model in a second, without computing anything.

Not counted: tensors that exist before the call (weights, the input) and backend scratch space that
never becomes a tensor (oneDNN/cuDNN workspaces).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryTracker(TorchDispatchMode):
    """`with TensorMemoryTracker() as t: fn()` then `t.peak` (bytes) and `t.current` (still alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage id -> [bytes, live tensors]

    def __enter__(self) -> TensorMemoryTracker:
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {_storage_id(t) for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        key = _storage_id(t)
        entry = self._live.get(key)
        if entry is None:
            if key in inputs:  # an in-place or view result on a tensor from before the call
                return
            entry = self._live[key] = [t.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def estimate_peak_bytes(model, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Peak tensor memory of an untiled `model.encode` / `model.decode` (kind "encode" / "decode") of an input
    of `shape`, measured on a meta-device twin (`type(model)(model.config)`, a DCAE with default settings):
    no memory is allocated and nothing computed (~1 s for a full-size model at 4096 px). Weights and the
    input are not counted."""
    with torch.device("meta"):
        twin = type(model)(model.config).to(dtype).eval()
    x = torch.empty(shape, device="meta", dtype=dtype)
    with torch.inference_mode(), TensorMemoryTracker() as tracker:
        getattr(twin, kind)(x)
    return tracker.peak


def available_ram_bytes() -> int | None:
    """Memory the system can still give this process (Linux MemAvailable, else psutil), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None
