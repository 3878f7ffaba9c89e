"""Flow matching with the linear (rectified-flow / SiT) path.

x_t = (1 - t) * x0 + t * noise, t in [0, 1] (t = 0 data, t = 1 noise). The network predicts the velocity
v = noise - x0, the time derivative of the path, so sampling integrates dx/dt = v from t = 1 down to 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dcae.diffusion.conditioning import Condition, drop
from dcae.diffusion.processes.common import MODEL_TIME_SCALE, expand_as, mean_flat, randn


@dataclass
class FlowMatching:
    t_sampling: str = "logit_normal"  # "uniform" or "logit_normal" (SD3: more weight on mid-range t)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cond_dropout: float = 0.1  # classifier-free guidance: the share of conditions dropped to the null one
    prediction = "velocity"

    def __post_init__(self) -> None:
        if self.t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got {self.t_sampling!r}")

    # -- training --------------------------------------------------------------------------------
    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.t_sampling == "uniform":
            return torch.rand(n, generator=generator, device=device)
        u = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * u)

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, velocity target) for data x0, noise and per-sample t."""
        t = expand_as(t, x0)
        return (1 - t) * x0 + t * noise, noise - x0

    def loss(
        self,
        model: Callable,
        x0: torch.Tensor,
        cond: Condition | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean squared velocity error, per sample (shape B)."""
        t = self.sample_t(x0.shape[0], x0.device, generator)
        noise = randn(x0.shape, x0, generator)
        xt, target = self.interpolate(x0, noise, t)
        cond = drop(cond, self.cond_dropout, generator)
        pred = model(xt, t * MODEL_TIME_SCALE, cond)
        if pred.shape[1] != x0.shape[1]:
            raise ValueError("flow matching predicts a velocity only: build the model without learn_sigma")
        return mean_flat((pred.float() - target.float()) ** 2)

    # -- sampling interface (see sampling.py) ------------------------------------------------------
    @staticmethod
    def sampling_times(num_steps: int, shift: float = 1.0) -> list[float]:
        """num_steps + 1 times from 1 (noise) to 0 (data). shift > 1 spends more steps at high noise
        (SD3's resolution shift: t' = s t / (1 + (s - 1) t))."""
        ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        ts = shift * ts / (1 + (shift - 1) * ts)
        return ts.tolist()

    @staticmethod
    def alpha_sigma(t: float) -> tuple[float, float]:
        return 1.0 - t, t

    @staticmethod
    def model_time(t: float) -> float:
        return t * MODEL_TIME_SCALE

    @staticmethod
    def normalized_time(t: float) -> float:
        return t

    @staticmethod
    def velocity(out: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        return out

    @staticmethod
    def to_x0_eps(out: torch.Tensor, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity -> (data, noise) predictions: x = (1-t) x0 + t eps and v = eps - x0."""
        return x - t * out, x + (1 - t) * out
