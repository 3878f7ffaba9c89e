"""Phase 3's GAN for real: the discriminator trains, the GAN term reaches the decoder head, `disc_start` gates
both, `gan_warmup` ramps the generator's weight; hinge loss and adaptive weight against hand-computed values.

The trainer tests run the real `train(cfg, phases=[3], init=...)` on a tiny model (32 px, CPU) from one saved
starting model, with a checkpoint after every step: the checkpoints hold the head and the discriminator per step.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_train_helpers import TINY_MODEL, tiny_config
from torch import nn

from dcae.models import DCAE, DCAEConfig
from dcae.runtime import checkpoint as state
from dcae.runtime.log import read_log
from dcae.train.config import ConfigError, LossConfig, load_config
from dcae.train.losses import AutoencoderLoss, PatchDiscriminator, adaptive_gan_weight, hinge_d_loss

PHOTOS = "skimage:astronaut,chelsea,coffee"
HEAD = "decoder.project_out."
STEPS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- real phase-3 runs
@pytest.fixture(scope="module")
def phase3(tmp_path_factory):
    """run(name, **loss) -> the run folder of phase 3 (4 steps) with these loss settings; each run once."""
    from dcae.train.trainer import train

    root = tmp_path_factory.mktemp("gan")
    torch.manual_seed(0)
    DCAE(DCAEConfig(**TINY_MODEL)).save_pretrained(root / "init", format="original")
    done: dict[str, Path] = {}

    def run(name: str, **loss) -> Path:
        if name not in done:
            cfg = tiny_config(root / name, [PHOTOS], ema_decay=0.0)
            cfg["data"]["holdout"] = 0
            cfg["val"].update(max_images=0, grid_images=0)
            cfg["checkpoint"]["keep_last"] = STEPS
            cfg["phase3"].update(steps=STEPS, optim={"lr": 1e-3})
            cfg["phase3"]["loss"].update(loss)
            train(load_config(cfg), phases=[3], init=str(root / "init"))
            done[name] = root / name
        return done[name]

    return run


def _checkpoint(run: Path, step: int) -> dict:
    return state.load_checkpoint(run / "phase3" / "checkpoints" / f"step_{step:08d}.pt")


def _head(ck: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ck["model"].items() if k.startswith(HEAD)}


def _initial_disc(ck: dict) -> dict[str, torch.Tensor]:
    """The discriminator as the trainer builds it, before any step (seeded with seed + 1)."""
    cfg = load_config(ck["config"])
    d = cfg.phase3.disc
    torch.manual_seed(cfg.seed + 1)
    return PatchDiscriminator(3, d.channels, d.layers, d.norm).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def _moved(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])}


def test_discriminator_trains_in_phase3(phase3):
    run = phase3("gan", gan_weight=0.5, disc_start=0)
    initial = _initial_disc(_checkpoint(run, 1))
    weights = {k for k in initial if k.endswith("weight")}
    for step in range(1, STEPS + 1):
        disc = _checkpoint(run, step)["disc"]
        moved = _moved(initial, disc)
        assert weights <= moved, f"step {step}: discriminator weights that did not move: {sorted(weights - moved)}"
        initial = disc
    rows = read_log(run / "phase3" / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["d_loss"]) and r["d_loss"] >= 0 for r in rows)


def test_gan_term_reaches_the_decoder_head(phase3):
    gan, again, plain = (
        phase3("gan", gan_weight=0.5),
        phase3("gan-again", gan_weight=0.5),
        phase3("no-gan", gan_weight=0.0),
    )
    last = _checkpoint(gan, STEPS)
    # the same settings twice: bit-identical head and discriminator, so a difference below is not noise
    assert _same(_head(last), _head(_checkpoint(again, STEPS)))
    assert _same(last["disc"], _checkpoint(again, STEPS)["disc"])
    # gan_weight 0: no discriminator at all, and another head
    no_gan = _checkpoint(plain, STEPS)
    assert no_gan["disc"] is None
    diff = {k: (last["model"][k] - no_gan["model"][k]).abs().max().item() for k in _head(last)}
    assert max(diff.values()) > 1e-5, diff
    # ... and only the head: everything else is frozen in both
    assert _moved(last["model"], no_gan["model"]) <= set(_head(last))
    assert "gan_weight" in read_log(gan / "phase3" / "log.csv")[0]
    assert "gan_weight" not in read_log(plain / "phase3" / "log.csv")[0]


def test_disc_start_gates_discriminator_and_gan_term(phase3):
    # disc_start=2: steps 0 and 1 without GAN (checkpoints 1 and 2), steps 2 and 3 with it (checkpoints 3, 4);
    # gan_warmup=2 ramps the weight 1/2, 1 (not adaptive here, so the logged weight is exactly 0.5 * ramp)
    gated = phase3("gated", gan_weight=0.5, disc_start=2, gan_warmup=2, gan_adaptive=False)
    plain = phase3("no-gan", gan_weight=0.0)
    initial = _initial_disc(_checkpoint(gated, 1))
    for step in (1, 2):
        ck = _checkpoint(gated, step)
        assert _same(ck["disc"], initial), f"discriminator changed before disc_start (checkpoint {step})"
        assert _same(_head(ck), _head(_checkpoint(plain, step))), f"GAN term before disc_start ({step})"
    for step in (3, 4):
        ck = _checkpoint(gated, step)
        assert _moved(_checkpoint(gated, step - 1)["disc"], ck["disc"]), f"discriminator idle at {step}"
        assert not _same(_head(ck), _head(_checkpoint(plain, step))), f"no GAN term at checkpoint {step}"
    rows = read_log(gated / "phase3" / "log.csv")
    assert ["d_loss" in r for r in rows] == [False, False, True, True]
    assert [r.get("gan_weight") for r in rows] == [None, None, pytest.approx(0.25), pytest.approx(0.5)]


def test_gan_warmup_config():
    assert LossConfig().gan_warmup == 0
    assert load_config(None, ["phase3.loss.gan_warmup=100"]).phase3.loss.gan_warmup == 100
    for bad in ("phase3.loss.gan_warmup=-1", "phase3.loss.disc_start=-5"):
        with pytest.raises(ConfigError, match=r"phase3\.loss\.(disc_start|gan_warmup) must be at least 0, got -"):
            load_config(None, [bad])


# ----------------------------------------------------------------------------- the loss, by hand
def _head_output(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A stand-in decoder whose last layer is the per-channel scale `w` (3,)."""
    return x * w.view(1, 3, 1, 1)


@pytest.mark.parametrize(
    "warmup, expected",  # disc_start=3, gan_weight=0.5; steps 2..7 and 50
    [
        (0, [None, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
        (1, [None, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
        (4, [None, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]),
    ],
)
def test_gan_warmup_ramps_the_generator_weight(warmup, expected):
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, channels=4, layers=1).eval()
    disc.requires_grad_(False)
    cfg = LossConfig(perceptual_weight=0.0, gan_weight=0.5, gan_adaptive=False, disc_start=3, gan_warmup=warmup)
    loss = AutoencoderLoss(cfg, disc, None)
    x = torch.rand(2, 3, 16, 16)
    for step, want in zip([2, 3, 4, 5, 6, 7, 50], expected):
        w = torch.tensor([0.5, 1.5, 2.0], requires_grad=True)
        rec = _head_output(x, w)
        total, logs = loss.generator(x, rec, step, w)
        rec_loss = (rec - x).abs().mean()
        if want is None:  # before disc_start: reconstruction only
            assert not loss.gan_active(step) and "gan_weight" not in logs
            assert torch.allclose(total, rec_loss)
            continue
        assert loss.gan_active(step)
        assert logs["gan_weight"].item() == pytest.approx(want)
        g = -disc(rec).mean()
        assert torch.allclose(logs["g_loss"], g)
        assert torch.allclose(total, rec_loss + want * g)
        # the weight is the one used: the gradient at the last layer is grad rec + want * grad g
        grad_rec, grad_g, grad = (torch.autograd.grad(t, w, retain_graph=True)[0] for t in (rec_loss, g, total))
        assert torch.allclose(grad, grad_rec + want * grad_g, atol=1e-6)


def test_hinge_loss_by_hand():
    real = torch.tensor([0.5, 2.0, -1.0])  # relu(1 - r) = 0.5, 0, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.5])  # relu(1 + f) = 0, 1, 2.5 -> mean 7/6
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 7 / 6))
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0  # margins met: no loss
    # gradients: -1/(2n) on real logits under the margin, +1/(2n) on fake logits above -1, 0 elsewhere
    r, f = real.clone().requires_grad_(), fake.clone().requires_grad_()
    hinge_d_loss(r, f).backward()
    assert torch.allclose(r.grad, torch.tensor([-1, 0, -1]) / 6)
    assert torch.allclose(f.grad, torch.tensor([0, 1, 1]) / 6)
    # through AutoencoderLoss.discriminator, with logits = the images themselves
    loss = AutoencoderLoss(LossConfig(gan_weight=0.5), nn.Identity(), None)
    d_loss, logs = loss.discriminator(nn.Identity(), real.view(1, 3, 1, 1), fake.view(1, 3, 1, 1))
    assert d_loss.item() == pytest.approx(1.0)
    assert logs["logits_real"].item() == pytest.approx(0.5) and logs["logits_fake"].item() == pytest.approx(-1 / 6)


def test_adaptive_weight_by_hand():
    w = torch.zeros(2, requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])  # gradients of the two losses: norms 5 and 2
    rec, gan = (a * w).sum(), (b * w).sum()
    ratio = adaptive_gan_weight(rec, gan, w, 1e4)
    assert ratio.item() == pytest.approx(5 / (2 + 1e-4)) and not ratio.requires_grad
    assert adaptive_gan_weight(rec, gan, w, 1.5).item() == pytest.approx(1.5)  # clamped
    assert adaptive_gan_weight(rec, (0 * w).sum(), w, 1e4).item() == pytest.approx(1e4)  # 5 / 1e-4, clamped
    for bad in (float("inf"), float("nan")):  # an overflowed gradient: no GAN term this step
        assert adaptive_gan_weight((torch.tensor([bad, 1.0]) * w).sum(), gan, w, 1e4).item() == 0


def test_generator_uses_the_adaptive_weight():
    # last layer w scales the channels, logits = the reconstruction itself (identity discriminator):
    # (x > 0, w > 1) d L1 / d w_c = l1_weight * mean_c(x) / 3, d g_loss / d w_c = -mean_c(x) / 3
    x = torch.rand(2, 3, 4, 4) + 0.1
    w = torch.tensor([2.0, 3.0, 4.0], requires_grad=True)
    cfg = LossConfig(l1_weight=2.0, perceptual_weight=0.0, gan_weight=0.5, disc_start=0, gan_warmup=2)
    loss = AutoencoderLoss(cfg, nn.Identity(), None)
    total, logs = loss.generator(x, _head_output(x, w), 0, w)
    per_channel = x.mean(dim=(0, 2, 3)) / 3
    expected_ratio = (2.0 * per_channel).norm() / (per_channel.norm() + 1e-4)
    assert logs["gan_weight"].item() == pytest.approx(0.5 * 0.5 * expected_ratio.item(), rel=1e-5)  # ramp 1/2
    assert logs["g_loss"].item() == pytest.approx(-(x * w.view(1, 3, 1, 1)).mean().item(), rel=1e-6)
    assert total.item() == pytest.approx((logs["rec"] + logs["gan_weight"] * logs["g_loss"]).item(), rel=1e-6)
    # the frozen-head fallback (no trainable last layer): the plain weight, ramped
    _, logs = loss.generator(x, _head_output(x, w.detach()), 1, w.detach())
    assert logs["gan_weight"].item() == pytest.approx(0.5)
