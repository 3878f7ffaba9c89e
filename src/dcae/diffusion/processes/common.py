"""Small pieces shared by the flow-matching and DDPM processes."""

from __future__ import annotations

import torch

# Models see time on the DDPM scale (0..1000), whatever the process: one timestep embedding for both.
MODEL_TIME_SCALE = 1000.0


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def expand_as(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample value of shape B -> B x 1 x 1 x ... broadcastable against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))
