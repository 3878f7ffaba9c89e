"""DC-AE 1.5's augmented diffusion training: the subset sampler against its configuration, the adaptive networks
against their definition (a leading subset = the missing channels zeroed; all channels = the plain network),
the released DC-AE 1.5 layout round trip, exact resume, and `dcae sample --channels` on a structured decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_diffusion_train import assert_same_state, config, states
from test_golden_released import Golden, golden_dir
from test_released_cli import tiny_autoencoder
from test_sana import _inputs

from dcae.cli import main as cli
from dcae.diffusion.c2i.latents import extract_latents
from dcae.diffusion.c2i.released.convert import from_released, released_state_dict, save_released
from dcae.diffusion.c2i.released.models import load_released
from dcae.diffusion.conditioning import Labels
from dcae.diffusion.nets import create_diffusion_model
from dcae.diffusion.processes.flow import FlowMatching
from dcae.diffusion.train.augmented import AugmentedLoss, draw_channels
from dcae.diffusion.train.checkpoint import load_checkpoint
from dcae.diffusion.train.config import AugmentedConfig
from dcae.diffusion.train.loop import _step_seed, train
from dcae.errors import UserError
from dcae.models import DCAE

SMALL = {"depth": 2, "hidden_size": 32, "num_heads": 2}


# ----------------------------------------------------------------------------- the subset sampler
def test_subset_draws_follow_the_configured_set():
    """Uniform over `channels`: chi-square at the 0.1% level over 6,000 micro-batch seeds of the loop, and the
    whole latent appended exactly when include_full."""
    from scipy import stats

    cfg = AugmentedConfig(channels=[4, 8, 12, 20], subsets=2, include_full=True)
    seeds = [_step_seed(s, step, slot) for s in (0, 7) for step in range(1500) for slot in range(2)]
    draws = [draw_channels(cfg, 32, seed) for seed in seeds]
    assert all(len(d) == 3 and d[-1] == 32 for d in draws)
    counts = np.array([sum(d[:2].count(c) for d in draws) for c in cfg.channels])
    expected = np.full(len(counts), counts.sum() / len(counts))
    assert stats.chisquare(counts, expected).statistic < stats.chi2.ppf(0.999, len(counts) - 1)
    # the two draws of a micro-batch are independent: the pairs are uniform over the 16 combinations
    pairs = np.zeros((4, 4))
    for d in draws:
        pairs[cfg.channels.index(d[0]), cfg.channels.index(d[1])] += 1
    assert stats.chisquare(pairs.ravel()).statistic < stats.chi2.ppf(0.999, 15)
    # a biased draw fails the same test: the bound is not vacuous
    biased = counts + np.array([0, 0, 0, counts.sum() // 10])
    assert stats.chisquare(biased, np.full(4, biased.sum() / 4)).statistic > stats.chi2.ppf(0.999, 3)
    assert draw_channels(AugmentedConfig([4], 3, False), 32, 5) == [4, 4, 4]
    assert draw_channels(cfg, 32, 11) == draw_channels(cfg, 32, 11)  # a function of the seed


def test_augmented_loss_is_the_mean_over_the_drawn_subsets():
    """The loss calls the network once per drawn width, and equals the mean of the process's own losses."""
    model = create_diffusion_model("DiT-S/1", 8, 2, num_classes=3, adaptive_channel=True, **SMALL)
    seen = []

    def net(x, t, c):
        seen.append(x.shape[1])
        return model(x, t, c)

    cfg, process = AugmentedConfig([2, 5], subsets=2), FlowMatching()
    x, cond = torch.randn(4, 8, 2, 2), Labels(torch.tensor([0, 1, 2, 0]), 3)
    gen = torch.Generator().manual_seed(123)
    loss = AugmentedLoss(process, cfg).loss(net, x, cond, generator=gen)
    widths = draw_channels(cfg, 8, 123)
    assert seen == widths
    gen.manual_seed(123)
    parts = [process.loss(model, x[:, :c], cond, generator=gen) for c in widths]
    assert torch.equal(loss, sum(parts) / len(parts))


# ----------------------------------------------------------------------------- the adaptive networks
def _nets(patch: int, adaptive: bool):
    torch.manual_seed(0)
    kw = {"adaptive_channel": adaptive}
    yield "DiT", create_diffusion_model(f"DiT-S/{patch}", 8, 4, num_classes=3, **SMALL, **kw), Labels(
        torch.tensor([0, 2]), 3)  # fmt: skip
    torch.manual_seed(0)
    yield "UViT", create_diffusion_model(f"UViT-S/{patch}", 8, 4, num_classes=3, **SMALL, **kw), Labels(
        torch.tensor([0, 2]), 3)  # fmt: skip
    torch.manual_seed(0)
    sana = create_diffusion_model(f"SANA-tiny/{patch}", 8, 4, caption_channels=16, max_tokens=7, **kw)
    yield "SANA", sana, _inputs(2, 8, 4, 4, 16)[2]


def _randomize(net: torch.nn.Module) -> None:
    """Zero-initialised heads (adaLN-zero) would make every comparison 0 == 0."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("patch", [1, 2])
def test_leading_subset_equals_the_latent_with_the_rest_zeroed(patch):
    """DC-AE 1.5's definition: the network on latent[:, :c] is the network on the latent with channels c..C
    zeroed, its output cut to the first c channels (also for patch 2, where the head's rows interleave)."""
    x, t = torch.randn(2, 8, 4, 4), torch.tensor([100.0, 700.0])
    for name, net, cond in _nets(patch, adaptive=True):
        _randomize(net)
        for c in (1, 3, 5):
            sub = net(x[:, :c], t, cond)
            padded = net(F.pad(x[:, :c], (0, 0, 0, 0, 0, 8 - c)), t, cond)[:, :c]
            assert sub.shape == (2, c, 4, 4)
            torch.testing.assert_close(sub, padded, rtol=1e-5, atol=1e-5, msg=f"{name} c={c}")
        with pytest.raises(ValueError, match="8 latent channels or fewer"):
            net(torch.randn(2, 9, 4, 4), t, cond)


def test_adaptive_network_at_full_width_is_the_plain_network():
    x, t = torch.randn(2, 8, 4, 4), torch.tensor([100.0, 700.0])
    for (name, plain, cond), (_, adaptive, _) in zip(_nets(2, False), _nets(2, True)):
        _randomize(plain)
        adaptive.load_state_dict(plain.state_dict())  # no extra parameters
        assert torch.equal(plain(x, t, cond), adaptive(x, t, cond)), name
        with pytest.raises(ValueError, match="takes 8 latent channels, got 4"):
            plain(x[:, :4], t, cond)


# ----------------------------------------------------------------------------- training, resume, sampling
@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    """16 random images in two class folders -> latents of a structured (DC-AE 1.5) f4c8 autoencoder."""
    root = tmp_path_factory.mktemp("structured")
    ae_dir = tiny_autoencoder(8, root / "ae")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "data" / c / f"{i}.png")
    extract_latents(DCAE.from_pretrained(ae_dir), root / "data", root / "latents", model_name=str(ae_dir),
                    resolution=16, num_workers=0, progress=False)  # fmt: skip
    return root / "latents"


AUG = {"augmented.channels": "[2, 4, 6]", "augmented.subsets": 1, "model.name": "UViT-S/1"}


def test_augmented_training_resumes_exactly(structured, tmp_path):
    train(config(structured, tmp_path / "full", **AUG), progress=False)
    train(config(structured, tmp_path / "split", **AUG, max_steps=3), progress=False)
    train(config(structured, tmp_path / "split", **AUG), progress=False)
    assert_same_state(states(tmp_path / "full"), states(tmp_path / "split"))
    model, _, meta = load_checkpoint(tmp_path / "full")
    assert model.adaptive_channel and meta["model_args"]["overrides"]["adaptive_channel"] is True
    # without augmented training the same run ends elsewhere: the subsets take part in the gradient
    train(config(structured, tmp_path / "plain", **{"model.name": "UViT-S/1"}), progress=False)
    with pytest.raises(AssertionError):
        assert_same_state(states(tmp_path / "full"), states(tmp_path / "plain"))
    with pytest.raises(UserError, match=r"augmented.channels \[9\] do not fit the cache's 8 latent channels"):
        train(config(structured, tmp_path / "bad", **{**AUG, "augmented.channels": "[9]"}), progress=False)


def test_trained_model_round_trips_through_the_released_layout(structured, tmp_path):
    """Ours -> released DC-AE 1.5 folder -> load_released (strict keys and shapes) -> ours: the same weights and
    bit-identical outputs at every width."""
    train(config(structured, tmp_path / "run", **AUG), progress=False)
    ours, _, _ = load_checkpoint(tmp_path / "run")
    folder = save_released(ours, tmp_path / "released")
    released = load_released(folder)
    back = from_released(released)
    x, t, y = torch.randn(2, 8, 4, 4), torch.tensor([10.0, 900.0]), torch.tensor([0, 1])
    for c in (8, 2, 5):
        out = ours(x[:, :c], t, Labels(y, 2))
        assert torch.equal(released(x[:, :c], t, y), out)
        assert torch.equal(back(x[:, :c], t, Labels(y, 2)), out)
    assert released_state_dict(back).keys() == released.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.skipif(not (golden_dir() / "usit_dcae15.safetensors").is_file(), reason="golden files not found")
def test_released_dcae15_loads_as_our_trainable_network():
    """The original code's DC-AE 1.5 USiT (golden, tiny) in our layout gives the original's outputs, at all 128
    channels and at its 16- and 64-channel subsets."""
    g = Golden("usit_dcae15")
    ours = from_released(g.model).eval()
    t = g.t
    cond = Labels(t["golden.fwd.y"], ours.num_classes)
    with torch.no_grad():
        for key in ("golden.fwd", "golden.fwd_c16", "golden.fwd_c64"):
            out = ours(t[f"{key}.x"], t["golden.fwd.t"], cond)
            assert torch.equal(out, g.model(t[f"{key}.x"], t["golden.fwd.t"], t["golden.fwd.y"]))
            ref = t[f"{key}.out"]
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_sample_at_a_subset_width_decodes_only_those_channels(structured, tmp_path, capsys, monkeypatch):
    train(config(structured, tmp_path / "run", **AUG), progress=False)
    decoded = []
    original = DCAE.decode

    def spy(self, z, *args, **kwargs):  # records what the CLI decodes; the real decoder runs
        out = original(self, z, *args, **kwargs)
        decoded.append((z.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(DCAE, "decode", spy)
    base = ["sample", "--ckpt", str(tmp_path / "run"), "-n", "2", "--steps", "2", "--grid", "0", "--seed", "3"]
    assert cli([*base, "-o", str(tmp_path / "c4"), "--channels", "4"]) == 0
    plan = json.loads((tmp_path / "c4" / "plan.json").read_text())
    assert plan["settings"]["latent_shape"] == [4, 4, 4]
    assert len(list((tmp_path / "c4" / "images").glob("*.png"))) == 2
    # The structured decoder got 4 channels and decoded them as the latent with channels 4..7 zeroed would be.
    ((z, images),) = decoded
    assert z.shape == (2, 4, 4, 4)
    ae = DCAE.from_pretrained(structured.parent / "ae").eval()
    with torch.no_grad():
        torch.testing.assert_close(original(ae, F.pad(z, (0, 0, 0, 0, 0, 4))), images, rtol=1e-5, atol=1e-5)
    assert cli([*base, "-o", str(tmp_path / "c9"), "--channels", "9"]) == 2
    assert "generates 1..8 latent channels" in capsys.readouterr().err
    train(config(structured, tmp_path / "plain", **{"model.name": "UViT-S/1"}), progress=False)
    plain = ["sample", "--ckpt", str(tmp_path / "plain"), "-n", "1", "--steps", "2", "-o", str(tmp_path / "p")]
    assert cli([*plain, "--channels", "4"]) == 2
    assert "was not trained with augmented training" in capsys.readouterr().err


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    """Coloured squares with captions -> a `dcae t2i cache` of a structured (DC-AE 1.5) f4c8 autoencoder."""
    from test_t2i import COLORS, _cli

    from dcae.diffusion.t2i.encoders import all_minilm_l6_v2

    root = tmp_path_factory.mktemp("t2i")
    (root / "data").mkdir()
    for i, (name, c) in enumerate(COLORS.items()):
        Image.fromarray(np.full((16, 16, 3), c, np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(f"a {name} square")
    ae_dir = tiny_autoencoder(8, root / "ae")
    rc, err = _cli("t2i", "cache", "--data", root / "data", "--model", ae_dir, "--text-encoder", all_minilm_l6_v2(),
                   "-o", root / "cache", "--resolution", 16, "--max-tokens", 8)  # fmt: skip
    assert rc == 0, err
    return root / "cache"


def test_text_to_image_augmented_training_and_sampling(text_cache, tmp_path, monkeypatch):
    """`dcae t2i train` with augmented.channels: SANA with adaptive channels, exact resume; `dcae t2i sample
    --channels 4` generates 4 channels, which the structured decoder decodes."""
    from test_t2i import _cli, _overrides

    from dcae.diffusion.train.config import load_config

    aug = {"augmented.channels": "[2, 4]", "max_steps": 4, "checkpoint.every": 2}
    train(load_config(None, _overrides(text_cache, tmp_path / "full", **aug)), progress=False)
    train(load_config(None, _overrides(text_cache, tmp_path / "split", **{**aug, "max_steps": 2})), progress=False)
    train(load_config(None, _overrides(text_cache, tmp_path / "split", **aug)), progress=False)
    a, b = (torch.load(sorted((tmp_path / d / "checkpoints").glob("*.pt"))[-1], weights_only=True)
            for d in ("full", "split"))  # fmt: skip
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    model, _, _ = load_checkpoint(tmp_path / "full")
    assert model.adaptive_channel

    decoded = []
    original = DCAE.decode
    monkeypatch.setattr(DCAE, "decode", lambda self, z, *a, **k: decoded.append(z.shape) or original(self, z, *a, **k))
    rc, err = _cli("t2i", "sample", "--ckpt", tmp_path / "full", "--prompt", "a red square", "--steps", 2,
                   "--channels", 4, "-o", tmp_path / "s", "--grid", 0)  # fmt: skip
    assert rc == 0, err
    assert decoded and all(s[1] == 4 for s in decoded)
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert plan["settings"]["latent_shape"][0] == 4
