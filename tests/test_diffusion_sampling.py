"""Objectives and solvers. Solver accuracy is checked on Gaussian data, where the exact velocity / noise
prediction is known in closed form and the probability-flow ODE maps noise z to mu + s * z exactly."""

from __future__ import annotations

import math

import pytest
import torch

from dcae.diffusion.conditioning import Labels, drop
from dcae.diffusion.nets import DiT
from dcae.diffusion.processes.ddpm import GaussianDiffusion
from dcae.diffusion.processes.flow import FlowMatching
from dcae.diffusion.processes.sampling import Denoiser, guided_output, sample
from dcae.errors import UserError

MU, S = 1.5, 0.3  # data ~ N(MU, S^2) in every coordinate


def exact_velocity(x: torch.Tensor, t_model: torch.Tensor, y=None) -> torch.Tensor:
    """E[noise - x0 | x_t] for x_t = (1-t) x0 + t noise and Gaussian x0."""
    t = (t_model / 1000).double().view(-1, 1, 1, 1)
    var = (1 - t) ** 2 * S**2 + t**2
    return (t - (1 - t) * S**2) / var * (x - (1 - t) * MU) - MU


def exact_eps(process: GaussianDiffusion):
    def model(x: torch.Tensor, t_model: torch.Tensor, y=None) -> torch.Tensor:
        a, s = process.alpha_sigma(float(t_model[0]))
        return s / (a * a * S * S + s * s) * (x - a * MU)

    return model


@pytest.fixture(scope="module")
def noise():
    return torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def flow_error(noise, solver: str, steps: int) -> float:
    out = sample(exact_velocity, FlowMatching(), noise, steps=steps, solver=solver)
    return (out.double() - (MU + S * noise)).abs().max().item()


def test_flow_euler_first_order_heun_second_order(noise):
    euler = {n: flow_error(noise, "euler", n) for n in (10, 20, 40)}
    heun = {n: flow_error(noise, "heun", n) for n in (10, 20, 40)}
    # Doubling the steps halves Euler's error and quarters Heun's.
    assert 1.7 < euler[10] / euler[20] < 2.3 and 1.7 < euler[20] / euler[40] < 2.3, euler
    assert heun[10] / heun[20] > 3.0 and heun[20] / heun[40] > 3.0, heun
    # At equal network evaluations (Heun costs 2 per step) Heun is still far more accurate.
    assert heun[20] < euler[40] / 10
    assert heun[40] < 2e-3


def test_flow_samples_have_the_data_distribution(noise):
    out = sample(exact_velocity, FlowMatching(), noise, steps=30, solver="heun")
    assert abs(out.mean().item() - MU) < 0.02
    assert abs(out.std().item() - S) < 0.01


def test_flow_ddim_equals_euler(noise):
    a = sample(exact_velocity, FlowMatching(), noise, steps=7, solver="euler")
    b = sample(exact_velocity, FlowMatching(), noise, steps=7, solver="ddim")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flow_dpm_solver_beats_euler(noise):
    for n in (10, 20):
        assert flow_error(noise, "dpm++", n) < flow_error(noise, "euler", n) / 3


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_ddpm_dpm_solver_beats_ddim_and_converges(noise, schedule):
    process = GaussianDiffusion(beta_schedule=schedule)
    a_T, s_T = process.alpha_sigma(999)
    exact = MU + S * (noise - a_T * MU) / math.sqrt(a_T**2 * S**2 + s_T**2)

    def err(solver, n):
        return (sample(exact_eps(process), process, noise, steps=n, solver=solver).double() - exact).abs().max().item()

    assert err("dpm++", 50) < err("ddim", 50)
    # Both approach the exact map (up to the discrete chain's own O(1/T) gap to the continuous ODE).
    assert err("dpm++", 1000) < 0.02 and err("ddim", 1000) < 0.02


def test_ddpm_ancestral_sampler_has_the_data_distribution(noise):
    process = GaussianDiffusion()
    out = sample(
        exact_eps(process), process, noise, steps=100, solver="ddpm", generator=torch.Generator().manual_seed(1)
    )
    assert abs(out.mean().item() - MU) < 0.03
    assert abs(out.std().item() - S) < 0.03


def test_ddpm_times_and_schedules():
    process = GaussianDiffusion()
    assert process.sampling_times(4) == [999.0, 749.0, 499.0, 249.0, -1.0]
    assert process.sampling_times(1000)[-2:] == [0.0, -1.0]
    assert process.alpha_sigma(-1) == (1.0, 0.0)
    a, s = process.alpha_sigma(999)
    assert abs(a * a + s * s - 1) < 1e-12 and a < 0.01  # variance preserving, nearly pure noise at the end
    with pytest.raises(ValueError):
        GaussianDiffusion(beta_schedule="cosine-ish")


def test_solver_errors():
    with pytest.raises(UserError):
        sample(exact_eps(GaussianDiffusion()), GaussianDiffusion(), torch.zeros(1, 1, 1, 1), solver="heun")
    with pytest.raises(UserError):
        sample(exact_velocity, FlowMatching(), torch.zeros(1, 1, 1, 1), solver="ddpm")
    with pytest.raises(UserError):
        sample(exact_velocity, FlowMatching(), torch.zeros(1, 1, 1, 1), solver="rk45")


# -- classifier-free guidance ------------------------------------------------------------------------


def small_dit(**kw) -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5, **kw)
    with torch.no_grad():  # leave the adaLN-zero init so the output depends on the label
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    model = small_dit()
    x, t, y = torch.randn(3, 4, 4, 4), torch.tensor([10.0, 500.0, 900.0]), torch.tensor([0, 3, 4])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 5))
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided_output(model, x, t, Labels(y, 5), 1.0), cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided_output(model, x, t, Labels(y, 5), 0.0), uncond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        guided_output(model, x, t, Labels(y, 5), 4.0), uncond + 4 * (cond - uncond), atol=1e-4, rtol=1e-4
    )


def test_cfg_leaves_learned_variance_conditional():
    model = small_dit(learn_sigma=True)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([10.0, 500.0]), torch.tensor([0, 3])
    out = guided_output(model, x, t, Labels(y, 5), 3.0)
    torch.testing.assert_close(out[:, 4:], model(x, t, y)[:, 4:], atol=1e-5, rtol=1e-5)


def test_guidance_interval():
    model = small_dit()
    x, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 3])
    d = Denoiser(model, FlowMatching(), Labels(y, 5), cfg_scale=3.0, guidance_interval=(0.2, 0.6))
    t = torch.full((2,), 900.0)
    torch.testing.assert_close(d(x, 0.9), model(x, t, y))  # outside the interval: conditional only
    t = torch.full((2,), 400.0)
    torch.testing.assert_close(d(x, 0.4), guided_output(model, x, t, Labels(y, 5), 3.0))


def test_sampling_with_guidance_is_seeded_and_finite():
    model = small_dit()
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 2])
    a = sample(model, FlowMatching(), noise, Labels(y, 5), steps=4, solver="heun", cfg_scale=2.0)
    b = sample(model, FlowMatching(), noise, Labels(y, 5), steps=4, solver="heun", cfg_scale=2.0)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    c = sample(model, FlowMatching(), noise, Labels(y, 5), steps=4, solver="heun", cfg_scale=1.0)
    assert not torch.allclose(a, c)


# -- objectives --------------------------------------------------------------------------------------


def test_label_dropout_rate_and_null_class():
    y = torch.arange(10).repeat(1000)
    dropped = Labels(y, 10).drop(0.1, generator=torch.Generator().manual_seed(0)).y
    frac = (dropped == 10).float().mean().item()
    assert 0.09 < frac < 0.11
    kept = dropped != 10
    assert torch.equal(dropped[kept], y[kept])
    assert drop(None, 0.1) is None
    with pytest.raises(ValueError):
        Labels(y, 0)  # no null class


def test_flow_interpolation_and_t_sampling():
    x0, noise = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    xt, v = FlowMatching.interpolate(x0, noise, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[-1], noise[-1])
    torch.testing.assert_close(v, noise - x0)
    x0_hat, eps_hat = FlowMatching.to_x0_eps(v, xt, t.view(-1, 1, 1, 1))
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
    g = torch.Generator().manual_seed(0)
    ln = FlowMatching(t_sampling="logit_normal").sample_t(20000, torch.device("cpu"), g)
    un = FlowMatching(t_sampling="uniform").sample_t(20000, torch.device("cpu"), g)
    assert ln.min() > 0 and ln.max() < 1 and un.min() >= 0 and un.max() < 1
    # logit-normal concentrates on the middle: fewer samples in the outer tenths than uniform
    assert ((ln < 0.1) | (ln > 0.9)).float().mean() < 0.5 * ((un < 0.1) | (un > 0.9)).float().mean()


@pytest.mark.parametrize("process", [FlowMatching(cond_dropout=0.1), GaussianDiffusion(learn_sigma=True)])
def test_training_loss_decreases_on_toy_latents(process):
    """A tiny DiT fits 4 fixed 'latent images' (one per class): the loss on a fixed evaluation batch (same
    noise and times before and after) must drop by more than half."""
    torch.manual_seed(0)
    model = DiT(
        input_size=4,
        patch_size=1,
        in_channels=4,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=4,
        learn_sigma=isinstance(process, GaussianDiffusion),
    )
    data, labels = torch.randn(4, 4, 4, 4), torch.arange(4)

    def eval_loss() -> float:
        idx = torch.arange(4).repeat(64)
        with torch.no_grad():
            return (
                process.loss(model, data[idx], Labels(labels[idx], 4), torch.Generator().manual_seed(123)).mean().item()
            )

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        idx = torch.randint(0, 4, (16,), generator=gen)
        loss = process.loss(model, data[idx], Labels(labels[idx], 4), generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before


def test_ddpm_loss_checks_output_channels():
    process = GaussianDiffusion(learn_sigma=True)
    with pytest.raises(ValueError, match="learn_sigma"):
        process.loss(lambda x, t, y: x, torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="learn_sigma"):
        FlowMatching().loss(lambda x, t, y: torch.cat([x, x], 1), torch.randn(2, 4, 4, 4))
