"""U-ViT's DPM-Solver (Lu et al. 2022) as the released UViT models were evaluated with it.

Discrete VP schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 (the LDM / U-ViT schedule), log
alpha known at t = k/1000 (k = 1..1000) and interpolated piecewise-linearly in between. Data prediction
(x0 = (x - sigma eps) / alpha), singlestep "fast" method of order 3 with a time-uniform grid from T = 1 to
eps = 1/1000: `steps` evaluations in orders [3, ..., 3, 2, 1] (or ending in [.., 1] / [.., 2] when steps % 3
is 1 / 2); each order-k update spans k grid intervals and evaluates the network at its inner grid points.
The network receives continuous t x 1000.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dcae.errors import UserError

NUM_TRAIN_STEPS = 1000


class DiscreteVPSchedule:
    """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of a discrete-time VP chain, continuous in t."""

    def __init__(self, betas: torch.Tensor) -> None:
        log_alphas = 0.5 * torch.log(1 - betas).cumsum(dim=0)
        self.log_alpha_array = log_alphas.reshape(1, -1)
        self.t_array = torch.linspace(0.0, 1.0, len(betas) + 1)[1:].reshape(1, -1)

    @classmethod
    def scaled_linear(cls, num_steps: int = NUM_TRAIN_STEPS) -> DiscreteVPSchedule:
        # float32 betas, as U-ViT builds its schedule (torch.tensor(np_betas).float())
        return cls((torch.linspace(0.00085**0.5, 0.012**0.5, num_steps, dtype=torch.float64) ** 2).float())

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        xp, yp = self.t_array.to(t.device), self.log_alpha_array.to(t.device)
        return interpolate(t.reshape(-1, 1), xp, yp).reshape(-1)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        log_alpha = -0.5 * torch.logaddexp(torch.zeros((1,), dtype=lamb.dtype, device=lamb.device), -2.0 * lamb)
        xp, yp = torch.flip(self.log_alpha_array, [1]), torch.flip(self.t_array, [1])
        xp, yp = xp.to(lamb.device), yp.to(lamb.device)
        return interpolate(log_alpha.reshape(-1, 1), xp, yp).reshape(-1)


def interpolate(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) through the points (xp, yp) (increasing xp), extended linearly beyond the ends;
    x: N x 1, xp and yp: 1 x K. Written as DPM-Solver's `interpolate_fn` so that ties round the same way."""
    n, k = x.shape[0], xp.shape[1]
    all_x = torch.cat([x.unsqueeze(2), xp.unsqueeze(0).repeat((n, 1, 1))], dim=2)
    sorted_all_x, x_indices = torch.sort(all_x, dim=2)
    x_idx = torch.argmin(x_indices, dim=2)
    cand_start_idx = x_idx - 1
    lo, hi = torch.tensor(1, device=x.device), torch.tensor(k - 2, device=x.device)
    start_idx = torch.where(x_idx == 0, lo, torch.where(x_idx == k, hi, cand_start_idx))
    end_idx = torch.where(start_idx == cand_start_idx, start_idx + 2, start_idx + 1)
    start_x = torch.gather(sorted_all_x, dim=2, index=start_idx.unsqueeze(2)).squeeze(2)
    end_x = torch.gather(sorted_all_x, dim=2, index=end_idx.unsqueeze(2)).squeeze(2)
    start_idx2 = torch.where(x_idx == 0, torch.zeros_like(lo), torch.where(x_idx == k, hi, cand_start_idx))
    y_expanded = yp.unsqueeze(0).expand(n, -1, -1)
    start_y = torch.gather(y_expanded, dim=2, index=start_idx2.unsqueeze(2)).squeeze(2)
    end_y = torch.gather(y_expanded, dim=2, index=(start_idx2 + 1).unsqueeze(2)).squeeze(2)
    return start_y + (x - start_x) * (end_y - start_y) / (end_x - start_x)


def singlestep_orders(steps: int) -> list[int]:
    """Orders of the 'fast' method at order 3: as many third-order updates as fit, then a 2 / 1 tail."""
    if steps < 1:
        raise UserError(f"DPM-Solver needs at least 1 step, got {steps}")
    k = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    return [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])


class DPMSolver:
    """Data-prediction DPM-Solver over `eps_fn(x, t_model)` (t_model = continuous t x 1000)."""

    def __init__(self, eps_fn: Callable, schedule: DiscreteVPSchedule | None = None) -> None:
        self.eps_fn, self.ns = eps_fn, schedule or DiscreteVPSchedule.scaled_linear()

    def data_prediction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.eps_fn(x, t * NUM_TRAIN_STEPS)
        alpha, sigma = self.ns.alpha(t), self.ns.sigma(t)
        return (x - _bcast(sigma, x) * eps) / _bcast(alpha, x)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, steps: int = 30, t_end: float = 1.0 / NUM_TRAIN_STEPS, t_start: float = 1.0):
        orders = singlestep_orders(steps)
        grid = torch.linspace(t_start, t_end, steps + 1).to(x.device)
        i = 0
        for order in orders:
            s, t = grid[i], grid[i + order]
            lam = self.ns.lambda_(grid[i : i + order + 1])
            h = lam[-1] - lam[0]
            r = [(lam[j] - lam[0]) / h for j in range(1, order)]
            vec = torch.ones((x.shape[0],), device=x.device)
            x = self.update(x, vec * s, vec * t, order, r)
            i += order
        return x

    def update(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, order: int, r: list) -> torch.Tensor:
        ns = self.ns
        lambda_s, lambda_t = ns.lambda_(s), ns.lambda_(t)
        h = lambda_t - lambda_s
        sigma_s, sigma_t, alpha_t = ns.sigma(s), ns.sigma(t), torch.exp(ns.log_alpha(t))
        phi_1 = torch.expm1(-h)
        model_s = self.data_prediction(x, s)
        if order == 1:
            return _bcast(sigma_t / sigma_s, x) * x - _bcast(alpha_t * phi_1, x) * model_s
        r1 = r[0]
        s1 = ns.inverse_lambda(lambda_s + r1 * h)
        sigma_s1, alpha_s1 = ns.sigma(s1), torch.exp(ns.log_alpha(s1))
        phi_11 = torch.expm1(-r1 * h)
        x_s1 = _bcast(sigma_s1 / sigma_s, x) * x - _bcast(alpha_s1 * phi_11, x) * model_s
        model_s1 = self.data_prediction(x_s1, s1)
        if order == 2:
            return (
                _bcast(sigma_t / sigma_s, x) * x
                - _bcast(alpha_t * phi_1, x) * model_s
                - (0.5 / r1) * _bcast(alpha_t * phi_1, x) * (model_s1 - model_s)
            )
        r2 = r[1]
        s2 = ns.inverse_lambda(lambda_s + r2 * h)
        sigma_s2, alpha_s2 = ns.sigma(s2), torch.exp(ns.log_alpha(s2))
        phi_12 = torch.expm1(-r2 * h)
        phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1.0
        phi_2 = phi_1 / h + 1.0
        x_s2 = (
            _bcast(sigma_s2 / sigma_s, x) * x
            - _bcast(alpha_s2 * phi_12, x) * model_s
            + r2 / r1 * _bcast(alpha_s2 * phi_22, x) * (model_s1 - model_s)
        )
        model_s2 = self.data_prediction(x_s2, s2)
        return (
            _bcast(sigma_t / sigma_s, x) * x
            - _bcast(alpha_t * phi_1, x) * model_s
            + (1.0 / r2) * _bcast(alpha_t * phi_2, x) * (model_s2 - model_s)
        )


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))
