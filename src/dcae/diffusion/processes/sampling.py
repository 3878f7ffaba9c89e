"""Samplers for flow-matching and DDPM models, with classifier-free guidance.

Every process (FlowMatching, GaussianDiffusion) describes its path by (alpha_t, sigma_t), x_t = alpha x0 +
sigma eps, and converts a network output into (x0, eps) predictions. The solvers work on that:

- euler, heun: the flow ODE dx/dt = v (flow matching only). Heun is 2nd order: 2 model calls per step.
- ddim: deterministic (eta = 0) or stochastic DDIM; for the linear flow path eta = 0 DDIM *is* Euler.
- dpm++: DPM-Solver++(2M) (Lu et al. 2022), multistep 2nd order in log-SNR with data prediction,
  one model call per step; first order on the first and the last step.
- ddpm: ancestral sampling with the (learned) DDPM variance, DiT's default (DDPM models only).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from dcae.diffusion.conditioning import Condition, with_null
from dcae.diffusion.processes.common import randn
from dcae.diffusion.solvers import (
    DDPM_MODEL_SOLVERS,
    DDPM_ONLY_SOLVERS,
    FLOW_MODEL_SOLVERS,
    FLOW_ONLY_SOLVERS,
    SOLVERS,
)
from dcae.errors import UserError


def guided_output(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: Condition, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), both from one batched model call.
    Only the prediction channels are guided; learned-variance channels keep the conditional value."""
    out = model(torch.cat([x, x]), torch.cat([t, t]), with_null(cond))
    cond, uncond = out.chunk(2)
    C = x.shape[1]
    guided = uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C])
    return torch.cat([guided, cond[:, C:]], dim=1) if out.shape[1] > C else guided


class Denoiser:
    """The model as the solvers see it: (x, process time) -> network output, with guidance applied when
    the (normalized) time lies inside `guidance_interval` (Kynkaanniemi et al. 2024: guiding only the middle
    of the trajectory keeps diversity)."""

    def __init__(
        self,
        model: Callable,
        process,
        cond: Condition | None = None,
        cfg_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.model, self.process, self.cond = model, process, cond
        self.cfg_scale, self.interval = cfg_scale, guidance_interval
        self.nfe = 0  # network evaluations, for reporting

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        tm = torch.full((x.shape[0],), self.process.model_time(t), device=x.device, dtype=torch.float32)
        lo, hi = self.interval
        self.nfe += 1
        if self.cond is not None and self.cfg_scale != 1.0 and lo <= self.process.normalized_time(t) <= hi:
            return guided_output(self.model, x, tm, self.cond, self.cfg_scale).float()
        return self.model(x, tm, self.cond).float()


@torch.no_grad()
def sample(
    model: Callable,
    process,
    noise: torch.Tensor,
    cond: Condition | None = None,
    steps: int = 50,
    solver: str = "heun",
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    eta: float = 0.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from `noise` (a standard normal tensor) to data with `steps` solver steps, conditioned on
    `cond` (None: unconditional, or the null condition of a conditional model)."""
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    is_flow = process.prediction == "velocity"
    if solver in FLOW_ONLY_SOLVERS and not is_flow:
        raise UserError(
            f"solver {solver!r} integrates the flow ODE; for a DDPM model use {', '.join(DDPM_MODEL_SOLVERS)}"
        )
    if solver in DDPM_ONLY_SOLVERS and is_flow:
        raise UserError(f"solver {solver!r} needs a DDPM model; for flow matching use {', '.join(FLOW_MODEL_SOLVERS)}")
    denoise = Denoiser(model, process, cond, cfg_scale, guidance_interval)
    times = process.sampling_times(steps, shift=shift) if is_flow else process.sampling_times(steps)
    x = noise.float()
    x0_prev, lam_prev = None, None
    for i in tqdm(range(len(times) - 1), desc=f"sampling ({solver})", disable=not progress, leave=False):
        t, t_next = times[i], times[i + 1]
        if solver in ("euler", "heun"):
            v = denoise(x, t)
            x_euler = x + (t_next - t) * v
            if solver == "euler":
                x = x_euler
            else:  # trapezoid rule with the slope at the Euler point
                x = x + (t_next - t) * 0.5 * (v + denoise(x_euler, t_next))
            continue
        out = denoise(x, t)
        if solver == "ddpm":
            x = process.ancestral_step(out, x, t, t_next, generator)
            continue
        x0, eps = process.to_x0_eps(out, x, t)
        (a_s, s_s), (a_t, s_t) = process.alpha_sigma(t), process.alpha_sigma(t_next)
        if solver == "ddim":
            # Posterior std for eta = 1 is s_t * sqrt(1 - exp(-2h)) with exp(-h) = (a_s s_t) / (s_s a_t).
            ratio = (a_s * s_t) / (s_s * a_t) if a_t > 0 else 0.0
            c = eta * s_t * math.sqrt(max(1.0 - ratio**2, 0.0))
            x = a_t * x0 + math.sqrt(max(s_t**2 - c**2, 0.0)) * eps
            if c > 0:
                x = x + c * randn(x.shape, x, generator)
            continue
        # DPM-Solver++(2M): x_t = (s_t / s_s) x_s + a_t (1 - e^{-h}) D, h = lambda_t - lambda_s, lambda = log(a / s).
        # Written with e^{-h} = (a_s s_t) / (s_s a_t), which stays finite when a_s = 0 (pure noise) or s_t = 0.
        exp_neg_h = (a_s * s_t) / (s_s * a_t)
        finite = a_s > 0 and s_t > 0
        lam_s = math.log(a_s / s_s) if a_s > 0 else None
        D = x0
        if finite and x0_prev is not None and lam_prev is not None:
            h = math.log(a_t / s_t) - lam_s
            r = (lam_s - lam_prev) / h
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (s_t / s_s) * x + a_t * (1 - exp_neg_h) * D
        x0_prev, lam_prev = x0, lam_s
    return x
