"""Discrete-time DDPM with epsilon prediction (Ho et al. 2020), optionally with the learned variance of
improved DDPM (Nichol & Dhariwal 2021) as used by DiT: loss = MSE(eps) + VLB term on the variance.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for t = 0..T-1; the model sees t itself as its timestep.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dcae.diffusion.conditioning import Condition, drop
from dcae.diffusion.processes.common import expand_as, mean_flat, randn


def make_betas(schedule: str, num_steps: int = 1000) -> torch.Tensor:
    """'linear' (DDPM / DiT, scaled so that any T covers the same range) or 'scaled_linear' (LDM / U-ViT)."""
    if schedule == "linear":
        scale = 1000.0 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(0.00085**0.5, 0.012**0.5, num_steps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {schedule!r} (use 'linear' or 'scaled_linear')")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of x under a Gaussian discretized to 256 bins on [-1, 1] (the t = 0 term of the VLB)."""

    def cdf(v: torch.Tensor) -> torch.Tensor:  # tanh approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    prediction = "eps"

    def __init__(
        self,
        num_steps: int = 1000,
        beta_schedule: str = "linear",
        learn_sigma: bool = False,
        cond_dropout: float = 0.1,
    ) -> None:
        self.num_steps, self.learn_sigma, self.cond_dropout = num_steps, learn_sigma, cond_dropout
        self.betas = make_betas(beta_schedule, num_steps)  # float64 tables, cast when indexed
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, posterior_variance).
        self.posterior_variance = self.betas * (1 - acp_prev) / (1 - self.alphas_cumprod)
        # The variance is 0 at t = 0: clip the log to the t = 1 value, as improved DDPM does.
        self.posterior_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.coef1 = self.betas * acp_prev.sqrt() / (1 - self.alphas_cumprod)
        self.coef2 = (1 - acp_prev) * alphas.sqrt() / (1 - self.alphas_cumprod)

    def _at(self, table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return expand_as(table.to(t.device)[t].to(x.dtype), x)

    # -- training --------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        acp = self._at(self.alphas_cumprod, t, x0)
        return acp.sqrt() * x0 + (1 - acp).sqrt() * noise

    def loss(
        self,
        model: Callable,
        x0: torch.Tensor,
        cond: Condition | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-sample loss (shape B): eps-MSE, plus the VLB term when the model learns its variance."""
        x0 = x0.float()
        t = torch.randint(0, self.num_steps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = randn(x0.shape, x0, generator)
        xt = self.q_sample(x0, t, noise)
        cond = drop(cond, self.cond_dropout, generator)
        out = model(xt, t.float(), cond).float()
        C = x0.shape[1]
        if out.shape[1] != (2 * C if self.learn_sigma else C):
            raise ValueError(
                f"model outputs {out.shape[1]} channels; learn_sigma={self.learn_sigma} needs "
                f"{2 * C if self.learn_sigma else C}"
            )
        eps = out[:, :C]
        loss = mean_flat((eps - noise) ** 2)
        if self.learn_sigma:
            # The VLB trains only the variance: the mean comes from a detached eps (improved DDPM, Sec. 3.1).
            loss = loss + self._vb(eps.detach(), out[:, C:], x0, xt, t)
        return loss

    def _model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Interpolate in log space between the posterior variance and beta_t: v in [-1, 1]."""
        min_log = self._at(self.posterior_log_variance, t, v)
        max_log = self._at(torch.log(self.betas), t, v)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def _vb(self, eps: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        acp = self._at(self.alphas_cumprod, t, xt)
        pred_x0 = (xt - (1 - acp).sqrt() * eps) / acp.sqrt()
        c1, c2 = self._at(self.coef1, t, xt), self._at(self.coef2, t, xt)
        true_mean, true_logvar = c1 * x0 + c2 * xt, self._at(self.posterior_log_variance, t, xt)
        model_mean, model_logvar = c1 * pred_x0 + c2 * xt, self._model_log_variance(v, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -- sampling interface (see sampling.py) ------------------------------------------------------
    def sampling_times(self, num_steps: int, shift: float = 1.0) -> list[float]:
        """num_steps integer timesteps T-1, T-1-T/n, ... ("trailing" spacing: it starts at the last training
        step, Lin et al. 2024), then -1: the clean end point where alpha = 1, sigma = 0. Stopping short of t = 0
        keeps the log-SNR steps even, which multistep solvers need."""
        if not 1 <= num_steps <= self.num_steps:
            raise ValueError(f"steps must be in 1..{self.num_steps}, got {num_steps}")
        ts = torch.arange(self.num_steps, 0, -self.num_steps / num_steps, dtype=torch.float64).round() - 1
        return [*ts.tolist(), -1.0]

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        if t < 0:
            return 1.0, 0.0
        acp = float(self.alphas_cumprod[int(t)])
        return math.sqrt(acp), math.sqrt(1 - acp)

    @staticmethod
    def model_time(t: float) -> float:
        return t

    def normalized_time(self, t: float) -> float:
        return max(t, 0.0) / (self.num_steps - 1)

    def to_x0_eps(self, out: torch.Tensor, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.alpha_sigma(t)
        eps = out[:, : x.shape[1]]
        return (x - sigma * eps) / alpha, eps

    def ancestral_step(
        self, out: torch.Tensor, x: torch.Tensor, t: float, t_next: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One step of the DDPM sampler from t to t_next < t on a respaced schedule (DiT's 250-step sampler):
        x_next ~ N(posterior mean, variance); the variance is learned when the model learns sigma."""
        a_t = float(self.alphas_cumprod[int(t)])
        a_next = 1.0 if t_next < 0 else float(self.alphas_cumprod[int(t_next)])
        x0, _ = self.to_x0_eps(out, x, t)
        beta = 1 - a_t / a_next  # the beta of the respaced chain
        c1 = beta * math.sqrt(a_next) / (1 - a_t)
        c2 = (1 - a_next) * math.sqrt(a_t / a_next) / (1 - a_t)
        mean = c1 * x0 + c2 * x
        if t_next < 0:
            return mean  # the last step adds no noise
        post_var = beta * (1 - a_next) / (1 - a_t)
        if self.learn_sigma:
            frac = (out[:, x.shape[1] :] + 1) / 2
            log_var = frac * math.log(beta) + (1 - frac) * math.log(post_var)
        else:
            log_var = torch.full_like(x, math.log(post_var))
        return mean + torch.exp(0.5 * log_var) * randn(x.shape, x, generator)
