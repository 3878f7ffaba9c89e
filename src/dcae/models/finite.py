"""NaN / Inf checks that name where: which weight tensor, which items of a batch."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch

from dcae.errors import NonFiniteWarning


def non_finite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int, int]]:
    """(name, non-finite count, size) of each floating-point tensor that holds NaN or Inf."""
    bad = []
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append((name, int((~torch.isfinite(t)).sum()), t.numel()))
    return bad


def non_finite_items(t: torch.Tensor) -> list[int]:
    """Batch indices of `t` (B, ...) that hold NaN or Inf; one isfinite pass, per-item only when needed."""
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return []
    return [i for i, ok in enumerate(finite.flatten(1).all(1).tolist()) if not ok]


def warn_non_finite_weights(state: dict[str, torch.Tensor], source: str, stacklevel: int = 1) -> bool:
    """Warn (NonFiniteWarning) naming the first tensor of `state` that holds NaN/Inf, with the count of
    others; True when all are finite. stacklevel 1 points the warning at the caller."""
    bad = non_finite_tensors(state.items())
    if not bad:
        return True
    name, count, size = bad[0]
    more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
    message = f"{source}: weight {name} has {count} NaN/Inf of {size} values{more}; outputs will not be finite"
    warnings.warn(NonFiniteWarning(message), stacklevel=stacklevel + 1)
    return False


@contextlib.contextmanager
def checked_by_caller(module) -> Iterator[None]:
    """For callers that check each output for NaN/Inf themselves and name the file: the module's own
    output check (`DCAE.finite_check`: one more pass over every output and a device sync, whose warning
    knows only batch positions) is off meanwhile. Modules without the check are left as they are."""
    if not hasattr(module, "finite_check"):
        yield
        return
    previous = module.finite_check
    module.finite_check = "off"
    try:
        yield
    finally:
        module.finite_check = previous
