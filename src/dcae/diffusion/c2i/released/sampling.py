"""Sampling the released models the way DC-Gen's `generate` does, plus faster fixed-step options.

Classifier-free guidance as in the original: the state holds [cond rows; uncond rows] (the initial noise
duplicated), every evaluation runs the network on the first half duplicated with labels [y; null] and
writes the guided prediction into both halves (`forward_with_cfg`), and the first half is returned.

Samplers (`SAMPLERS`):
- ddpm (dit): ancestral DDPM with learned-range variance on `steps` respaced steps (released: 250);
  the network sees the original integer step index of each respaced step.
- dpm-solver (uvit): U-ViT's DPM-Solver, `steps` evaluations (released: 30).
- dopri5 (sit, usit): torchdiffeq's adaptive dopri5, atol 1e-6, rtol 1e-3, from t = 0 (noise) to 1 (data);
  `steps` output grid points (released: 250; the result does not depend on it).
- heun2, midpoint, rk4 (sit, usit): torchdiffeq's fixed-grid solvers on `steps` grid points
  (steps - 1 solver steps), e.g. heun2 with 8 points = 14 network evaluations.
- dpm++, ddim (all), heun, euler (sit, usit): dcae.diffusion.processes.sampling's fixed-step solvers with `steps`
  steps (default 50), through adapters that translate each family's time and output conventions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dcae.diffusion.c2i.released.dpm_solver import DPMSolver
from dcae.diffusion.c2i.released.models import NULL_CLASS, ReleasedDiffusion, combine_cfg
from dcae.diffusion.conditioning import Labels, with_null
from dcae.diffusion.processes.common import MODEL_TIME_SCALE
from dcae.diffusion.processes.ddpm import GaussianDiffusion
from dcae.diffusion.processes.flow import FlowMatching
from dcae.diffusion.processes.sampling import sample
from dcae.diffusion.solvers import DDPM_MODEL_SOLVERS, FLOW_MODEL_SOLVERS, ODE_SOLVERS, OUR_SOLVERS
from dcae.errors import UserError

OUR_DEFAULT_STEPS = 50
ODE_ATOL, ODE_RTOL = 1e-6, 1e-3


def samplers_for(model: ReleasedDiffusion) -> tuple[str, ...]:
    spec = model.release.spec
    if spec.prediction == "velocity":
        return ODE_SOLVERS + tuple(s for s in OUR_SOLVERS if s in FLOW_MODEL_SOLVERS)
    return ("ddpm" if spec.learn_sigma else "dpm-solver", *(s for s in OUR_SOLVERS if s in DDPM_MODEL_SOLVERS))


def default_steps(model: ReleasedDiffusion, sampler: str) -> int:
    return OUR_DEFAULT_STEPS if sampler in OUR_SOLVERS else model.release.spec.steps


def our_conventions(model: ReleasedDiffusion):
    """(network adapter, process) that put a released model into dcae.diffusion.processes.sampling's conventions
    (time on 0..1000 with 1000 = noise; flow: t = 1 is noise and v = noise - data)."""
    net, spec = model.diffusion_model, model.release.spec
    if spec.prediction == "velocity":  # SiT: t = 0 is noise, v = data - noise
        return (lambda x, t, c: -net(x, 1 - t / MODEL_TIME_SCALE, c)), FlowMatching()
    if spec.learn_sigma:  # DiT: linear betas, the integer step index
        return net, GaussianDiffusion(1000, "linear", learn_sigma=True)
    # UViT: scaled-linear betas; DPM-Solver's discrete time (k + 1) / 1000 of step k, times 1000
    return (lambda x, t, c: net(x, t + 1, c)), GaussianDiffusion(1000, "scaled_linear")


class GuidedNet:
    """(x, t) -> network output on the state's rows, with DC-Gen's guidance when cfg_scale != 1.
    `trace`, if a list, receives (t, net input, net output) of every evaluation (for checks)."""

    def __init__(self, net: Callable, y: torch.Tensor, cfg_scale: float, trace: list | None = None) -> None:
        self.net, self.scale, self.trace = net, cfg_scale, trace
        self.cfg = cfg_scale != 1.0
        self.cond = with_null(Labels(y, NULL_CLASS)) if self.cfg else Labels(y, NULL_CLASS)
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        cond = self.cond.to(x.device)
        if self.cfg:
            half = x[: len(x) // 2]
            x = torch.cat([half, half])
        out = self.net(x, t, cond)
        if self.trace is not None:
            self.trace.append((t[0].item(), x, out))
        return combine_cfg(out, x.shape[1], self.scale) if self.cfg else out


# ----------------------------------------------------------------------------- DDPM (DiT)
def respaced_timesteps(num_steps: int, num_train_steps: int = 1000) -> list[int]:
    """ADM's `space_timesteps` for one section: `num_steps` evenly spaced indices from 0 to T - 1, rounded."""
    if not 1 <= num_steps <= num_train_steps:
        raise UserError(f"DDPM steps must be in 1..{num_train_steps}, got {num_steps}")
    if num_steps == 1:
        return [0]
    stride = (num_train_steps - 1) / (num_steps - 1)
    return [round(i * stride) for i in range(num_steps)]


class RespacedDDPM:
    """Linear betas 1e-4..0.02 over 1000 steps, respaced; float64 tables cast to float32 when used (as ADM)."""

    def __init__(self, num_steps: int) -> None:
        base = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        acp_full = torch.cumprod(1 - base, dim=0)
        self.timestep_map = respaced_timesteps(num_steps)
        acp_kept = acp_full[self.timestep_map]
        betas = 1 - acp_kept / torch.cat([torch.ones(1, dtype=torch.float64), acp_kept[:-1]])
        acp = torch.cumprod(1 - betas, dim=0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.sqrt_recip_acp = torch.sqrt(1.0 / acp)
        self.sqrt_recipm1_acp = torch.sqrt(1.0 / acp - 1)
        post_var = betas * (1 - acp_prev) / (1 - acp)
        self.post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]) if len(betas) > 1 else post_var)
        self.log_betas = torch.log(betas)
        self.coef1 = betas * torch.sqrt(acp_prev) / (1 - acp)
        self.coef2 = (1 - acp_prev) * torch.sqrt(1 - betas) / (1 - acp)

    def step(self, out: torch.Tensor, x: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        eps, v = out[:, :c], out[:, c:]
        f = lambda table: table[i].float()  # noqa: E731
        x0 = f(self.sqrt_recip_acp) * x - f(self.sqrt_recipm1_acp) * eps
        mean = f(self.coef1) * x0 + f(self.coef2) * x
        if i == 0:
            return mean  # the last step adds no noise (ADM multiplies its draw by zero)
        frac = (v + 1) / 2
        log_var = frac * f(self.log_betas) + (1 - frac) * f(self.post_log_var)
        return mean + torch.exp(0.5 * log_var) * noise


def sample_ddpm(fn: GuidedNet, x: torch.Tensor, steps: int, noise_fn: Callable[[int], torch.Tensor]):
    """noise_fn(k) is the standard-normal draw of the k-th step (k = 0 first)."""
    ddpm = RespacedDDPM(steps)
    for k, i in enumerate(reversed(range(steps))):
        t = torch.full((x.shape[0],), ddpm.timestep_map[i], dtype=torch.long, device=x.device)
        x = ddpm.step(fn(x, t).float(), x, i, noise_fn(k))
    return x


# ----------------------------------------------------------------------------- flow ODE (SiT, USiT)
def sample_flow(fn: GuidedNet, x: torch.Tensor, steps: int, method: str) -> torch.Tensor:
    """SiT's ODE sampler: dx/dt = v(x, t) from t = 0 (noise) to 1 (data) with torchdiffeq."""
    from torchdiffeq import odeint

    if steps < 2:
        raise UserError(f"the ODE samplers need at least 2 grid points (--steps), got {steps}")

    def drift(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return fn(state, torch.ones(state.size(0), device=state.device) * t)

    grid = torch.linspace(0.0, 1.0, steps, device=x.device)
    # atol / rtol as one-element lists, exactly as SiT passes them
    return odeint(drift, x, grid, method=method, atol=[ODE_ATOL], rtol=[ODE_RTOL])[-1]


# ----------------------------------------------------------------------------- entry point
@torch.no_grad()
def generate(
    model: ReleasedDiffusion,
    labels: torch.Tensor,
    noise: torch.Tensor,
    cfg_scale: float | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    step_noise: Callable[[int], torch.Tensor] | None = None,
    trace: list | None = None,
) -> tuple[torch.Tensor, int]:
    """Latents (scaled, as the autoencoder's latents times its scaling factor) for class `labels` from
    `noise` (B x c x h x w; c may be a leading subset of the channels for adaptive-channel models).
    Returns (latents, number of network evaluations). DDPM draws its per-step noise from `generator`
    (or takes it from `step_noise(k)`, with the state's full batch: 2B rows with guidance)."""
    release = model.release
    cfg_scale = release.cfg_scale if cfg_scale is None else float(cfg_scale)
    sampler = sampler or release.spec.sampler
    steps = steps or default_steps(model, sampler)
    allowed = samplers_for(model)
    if sampler not in allowed:
        raise UserError(f"sampler {sampler!r} does not fit {release.name} ({release.family}); use {', '.join(allowed)}")
    check_inputs(model, labels, noise)
    if sampler in OUR_SOLVERS:
        return _sample_ours(model, labels, noise, cfg_scale, sampler, steps, generator)
    fn = GuidedNet(model.diffusion_model, labels, cfg_scale, trace)
    x = torch.cat([noise, noise]) if fn.cfg else noise
    if sampler == "ddpm":
        if step_noise is None:
            step_noise = lambda k: torch.randn(x.shape, generator=generator, device=x.device)  # noqa: E731
        x = sample_ddpm(fn, x, steps, step_noise)
    elif sampler == "dpm-solver":
        x = DPMSolver(fn).sample(x, steps=steps)
    else:
        x = sample_flow(fn, x, steps, sampler)
    return x[: len(noise)], fn.nfe


def _sample_ours(model, labels, noise, cfg_scale: float, sampler: str, steps: int, generator) -> tuple:
    adapter, process = our_conventions(model)
    nfe = 0

    def counted(x, t, c):
        nonlocal nfe
        nfe += 1
        return adapter(x, t, c)

    x = sample(counted, process, noise, Labels(labels, NULL_CLASS), steps=steps, solver=sampler,
               cfg_scale=cfg_scale, generator=generator)  # fmt: skip
    return x, nfe


def check_inputs(model: ReleasedDiffusion, labels: torch.Tensor, noise: torch.Tensor) -> None:
    """Class labels in 0..999 and a latent shape the model takes, with errors that name the value."""
    bad = [int(v) for v in labels.reshape(-1).tolist() if not 0 <= int(v) < model.num_classes]
    if bad:
        raise UserError(f"class {bad[0]} is out of range: the model has {model.num_classes} classes (0..999)")
    c, h, w = model.release.latent_shape if noise.ndim != 4 else noise.shape[1:]
    full = model.in_channels
    ok_c = c == full or (model.release.spec.adaptive_channel and 1 <= c <= full)
    if not ok_c:
        takes = f"1..{full} (a leading subset)" if model.release.spec.adaptive_channel else str(full)
        raise UserError(f"{model.release.name} generates {takes} latent channels, not {c}")
    size = model.diffusion_model.input_size
    if (h, w) != (size, size) or len(noise) != len(labels):
        raise UserError(f"noise of shape {tuple(noise.shape)} does not fit {len(labels)} labels and {size}x{size} "
                        "latents")  # fmt: skip
    if not math.isfinite(float(noise.abs().max())):
        raise UserError("the initial noise contains NaN or Inf")
