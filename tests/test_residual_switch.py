"""Residual autoencoding as a switch: with its shortcuts off a DC-AE is the same network (same learned
layers, state-dict keys and parameter count) and only the parameter-free shortcuts are gone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from diffusers.models.autoencoders.autoencoder_dc import DCDownBlock2d, DCUpBlock2d
from test_train_helpers import TINY_MODEL, tiny_config, write_photos

from dcae import DCAE
from dcae.errors import UserError
from dcae.models.config import SHORTCUTS, DCAEConfig, get_config, list_models
from dcae.models.layers import (
    ChannelDuplicatingPixelShuffle,
    PixelUnshuffleChannelAveraging,
    PlainBlock,
    ResidualBlock,
    downsample_block,
    upsample_block,
)

TINY = DCAEConfig.from_dict(TINY_MODEL)
# Where each switch's shortcut sits: the stages' last op (encoder) / first op (decoder), and the bottleneck.
WHERE = {
    "encoder_downsample_shortcut": ("encoder.stages.",),
    "decoder_upsample_shortcut": ("decoder.stages.",),
    "encoder_out_shortcut": ("encoder.project_out",),
    "decoder_in_shortcut": ("decoder.project_in",),
}


def _randomised(cfg: DCAEConfig, seed: int = 0) -> DCAE:
    """A model whose norms are not at their identity init, in eval mode (BatchNorm uses its statistics)."""
    torch.manual_seed(seed)
    model = DCAE(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if m.__class__.__name__ in ("RMSNorm2d", "BatchNorm2d"):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _plain_blocks(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, PlainBlock)]


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _run(model: DCAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and reconstruction through the eager modules."""
    with torch.no_grad():
        z = model.encoder(x)
        return z, model.decoder(z)


# ----------------------------------------------------------------------------- same network
@pytest.mark.parametrize("switch", [*SHORTCUTS, "all"])
def test_plain_has_the_same_keys_shapes_and_parameter_count(switch: str) -> None:
    cfg = TINY.without_residual() if switch == "all" else dataclasses.replace(TINY, **{switch: False})
    residual, plain = DCAE(TINY), DCAE(cfg)
    assert _shapes(plain) == _shapes(residual)
    assert _count(plain) == _count(residual)
    # the removed shortcuts are exactly where this switch acts, and nowhere else
    expected = tuple(p for s in (SHORTCUTS if switch == "all" else [switch]) for p in WHERE[s])
    blocks = _plain_blocks(plain)
    assert blocks and all(name.startswith(expected) for name in blocks)
    assert not _plain_blocks(residual)


@pytest.mark.parametrize("name", ["dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.0", "dc-ae-f64c128-in-1.0"])
def test_released_shapes_have_a_plain_twin_of_the_same_size(name: str) -> None:
    with torch.device("meta"):
        residual, plain = DCAE(get_config(name)), DCAE(get_config(name).without_residual())
    assert _shapes(plain) == _shapes(residual) and _count(plain) == _count(residual)


# ----------------------------------------------------------------------------- only the shortcuts differ
@pytest.mark.parametrize("switch", SHORTCUTS)
def test_each_switch_removes_only_its_shortcut(switch: str) -> None:
    """Same weights: the plain model's output differs, and putting the parameter-free shortcut back into each
    PlainBlock (as a ResidualBlock) gives the residual model's output exactly."""
    residual = _randomised(TINY)
    plain = DCAE(dataclasses.replace(TINY, **{switch: False})).eval()
    plain.load_state_dict(residual.state_dict(), strict=True)
    x = _images()
    z_res, y_res = _run(residual, x)
    z_plain, y_plain = _run(plain, x)
    if switch.startswith("encoder"):
        assert not torch.allclose(z_plain, z_res, atol=1e-3)
    else:  # the encoder is untouched
        assert torch.equal(z_plain, z_res)
    assert not torch.allclose(y_plain, y_res, atol=1e-3)

    for name in _plain_blocks(plain):
        parent, _, child = name.rpartition(".")
        owner = plain.get_submodule(parent)
        setattr(owner, child, ResidualBlock(getattr(owner, child).main, residual.get_submodule(name).shortcut))
    z_back, y_back = _run(plain, x)
    assert torch.equal(z_back, z_res) and torch.equal(y_back, y_res)


def test_residual_stage_output_is_plain_output_plus_shortcut() -> None:
    """For one downsample and one upsample block: residual(x) = plain(x) + shortcut(x), same weights."""
    torch.manual_seed(0)
    down, down_plain = downsample_block("pixel_unshuffle", 16, 32), downsample_block("pixel_unshuffle", 16, 32, False)
    up, up_plain = upsample_block("pixel_shuffle", 32, 16), upsample_block("pixel_shuffle", 32, 16, False)
    down_plain.load_state_dict(down.state_dict())
    up_plain.load_state_dict(up.state_dict())
    x, z = torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        assert torch.allclose(down(x), down_plain(x) + PixelUnshuffleChannelAveraging(16, 32, 2)(x), atol=1e-6)
        assert torch.allclose(up(z), up_plain(z) + ChannelDuplicatingPixelShuffle(32, 16, 2)(z), atol=1e-6)


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("kind", ["down:pixel_unshuffle", "down:conv", "up:pixel_shuffle", "up:interpolate"])
def test_resample_block_matches_diffusers(kind: str, shortcut: bool) -> None:
    """diffusers' DCDownBlock2d / DCUpBlock2d have the same shortcut switch: with the same conv weights,
    the same output."""
    direction, kind = kind.split(":")
    if direction == "down":
        ours = downsample_block(kind, 16, 32, shortcut)
        theirs = DCDownBlock2d(16, 32, downsample=kind == "pixel_unshuffle", shortcut=shortcut)
        x = torch.randn(2, 16, 8, 8)
    else:
        ours = upsample_block(kind, 32, 16, shortcut)
        theirs = DCUpBlock2d(32, 16, interpolate=kind == "interpolate", shortcut=shortcut)
        x = torch.randn(2, 32, 4, 4)
    conv = next(m for m in ours.modules() if isinstance(m, nn.Conv2d))
    theirs.conv.load_state_dict(conv.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_plain_model_through_the_public_api() -> None:
    """encode/decode (eval, no grad: the fast path) agree with the eager modules for a plain model."""
    model = _randomised(TINY.without_residual())
    x = _images(1)
    z, y = _run(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.decode(z), y, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- configs
def test_released_configs_keep_their_shortcuts() -> None:
    for name in list_models():
        cfg = get_config(name)
        assert cfg.encoder_downsample_shortcut and cfg.decoder_upsample_shortcut, name
        # DC-AE 1.5 was released without the bottleneck shortcuts; every other release has them
        bottleneck = not name.startswith("dc-ae-1.5")
        assert cfg.encoder_out_shortcut == cfg.decoder_in_shortcut == bottleneck, name


def test_without_residual_and_the_residual_shorthand(tmp_path) -> None:
    plain = get_config("dc-ae-f32c32-in-1.0").without_residual()
    assert not any(getattr(plain, s) for s in SHORTCUTS)
    assert plain.name == "dc-ae-f32c32-in-1.0-plain" and plain.hub_id is plain.hub_id_diffusers is None
    assert plain.without_residual() == plain
    path = tmp_path / "plain.yaml"
    path.write_text("base: dc-ae-f32c32-in-1.0\nresidual: false\n")
    assert DCAEConfig.from_file(path).to_dict() == {**plain.to_dict(), "name": "dc-ae-f32c32-in-1.0"}
    assert DCAEConfig.from_dict({**TINY_MODEL, "residual": False}).to_dict() == {
        **TINY.without_residual().to_dict(),
        "name": TINY.name,
    }
    assert DCAEConfig.from_dict({**TINY_MODEL, "residual": True}) == TINY
    with pytest.raises(ValueError, match="residual: false contradicts encoder_out_shortcut: true"):
        DCAEConfig.from_dict({**TINY_MODEL, "residual": False, "encoder_out_shortcut": True})
    with pytest.raises(ValueError, match="residual must be true or false"):
        DCAEConfig.from_dict({**TINY_MODEL, "residual": "no"})


def test_switches_are_validated() -> None:
    with pytest.raises(ValueError, match="decoder_upsample_shortcut must be true or false"):
        dataclasses.replace(TINY, decoder_upsample_shortcut="false")
    # 4 x 8 channels cannot average down to 48: refused by name with the shortcut on, built without it
    odd = dict(TINY_MODEL, encoder_widths=[8, 48], decoder_widths=[8, 48], encoder_depths=[1, 1])
    odd.update(decoder_depths=[1, 1], encoder_block_types="ResBlock", decoder_block_types="ResBlock")
    odd.update(decoder_norms="trms2d", decoder_acts="silu")
    with pytest.raises(ValueError, match=r"encoder_downsample_shortcut needs 4 x encoder_widths\[0\] \(32\)"):
        DCAEConfig.from_dict(odd)
    with pytest.raises(ValueError, match="decoder_upsample_shortcut needs"):
        DCAEConfig.from_dict({**odd, "encoder_downsample_shortcut": False})
    model = DCAE(DCAEConfig.from_dict({**odd, "residual": False}))
    assert model.decoder(model.encoder(torch.zeros(1, 3, 4, 4))).shape == (1, 3, 4, 4)


# ----------------------------------------------------------------------------- saving and loading
def test_original_format_round_trips_the_switches(tmp_path) -> None:
    for i, switch in enumerate(SHORTCUTS):
        model = _randomised(dataclasses.replace(TINY, **{switch: False}), seed=i)
        model.save_pretrained(tmp_path / switch)
        loaded = DCAE.from_pretrained(tmp_path / switch)
        assert loaded.config == model.config and not getattr(loaded.config, switch)
        x = _images(1)
        assert all(torch.equal(a, b) for a, b in zip(_run(loaded, x), _run(model, x)))


@pytest.mark.parametrize("switch", ["encoder_downsample_shortcut", "decoder_upsample_shortcut"])
def test_diffusers_format_refuses_stage_shortcuts_off_by_name(switch: str, tmp_path) -> None:
    model = DCAE(dataclasses.replace(TINY, **{switch: False}))
    with pytest.raises(UserError, match=f"{switch} = False: diffusers' AutoencoderDC always has the stage"):
        model.save_pretrained(tmp_path / "out", format="diffusers")
    assert not (tmp_path / "out").exists()


def test_plain_bottleneck_matches_diffusers_without_its_shortcuts(tmp_path) -> None:
    """Bottleneck shortcuts off (diffusers can express that): diffusers' own AutoencoderDC loads what we
    save and computes the same latents and images; loading it back gives the same model."""
    from diffusers import AutoencoderDC

    cfg = dataclasses.replace(TINY, encoder_out_shortcut=False, decoder_in_shortcut=False)
    model = _randomised(cfg)
    model.save_pretrained(tmp_path / "d", format="diffusers")
    theirs = AutoencoderDC.from_pretrained(tmp_path / "d").eval()
    assert not theirs.config.encoder_out_shortcut and not theirs.config.decoder_in_shortcut
    x = _images(1)
    z, y = _run(model, x)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x).latent, z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.decode(z).sample, y, rtol=1e-4, atol=1e-4)
    loaded = DCAE.from_pretrained(tmp_path / "d")
    assert not loaded.config.encoder_out_shortcut and not loaded.config.decoder_in_shortcut
    assert all(torch.equal(a, b) for a, b in zip(_run(loaded.eval(), x), (z, y)))


# ----------------------------------------------------------------------------- training
def test_training_a_plain_autoencoder(tmp_path) -> None:
    """`model.config.residual=false` as a dcae train override: one phase-1 step, exported without shortcuts."""
    from dcae.train.config import ConfigError, load_config
    from dcae.train.trainer import train

    photos = write_photos(tmp_path / "photos", n=4)
    raw = tiny_config(tmp_path / "run", [str(photos)])
    raw["phase1"]["steps"] = 1
    cfg = load_config(raw, ["model.config.residual=false"])
    assert all(cfg.model.config[s] is False for s in SHORTCUTS) and "residual" not in cfg.model.config
    result = train(cfg, phases=[1])
    exported = DCAE.from_pretrained(result["model"])
    assert not any(getattr(exported.config, s) for s in SHORTCUTS)
    assert _shapes(exported) == _shapes(DCAE(TINY))
    with pytest.raises(ConfigError, match="model.config: residual: false contradicts"):
        load_config(raw, ["model.config.residual=false", "model.config.decoder_in_shortcut=true"])


def test_plain_model_on_the_fast_path_and_in_exact_tiles() -> None:
    """The fast path runs a plain model's blocks with its own kernels, and exact tiling walks their receptive
    fields (a PlainBlock is its learned branch): both equal the eager, untiled model."""
    import sys
    from fractions import Fraction
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_models_parity import narrow, randomize_norms
    from test_tiling import images, rel_err

    from dcae.models import fast
    from dcae.models.tiling import receptive_walk

    torch.manual_seed(0)
    model = DCAE.from_config(narrow("dc-ae-f32c32-in-1.0", 8).without_residual()).eval()
    randomize_norms(model)
    plain = [m for m in model.modules() if isinstance(m, PlainBlock)]
    assert plain and all(receptive_walk(m, Fraction(1))[0] >= 0 for m in plain)  # NotLocal if unknown to the tiler
    assert all(type(m) in fast.FastPath()._handlers for m in plain)
    x = images(320, 224)
    with torch.inference_mode():
        model.disable_fast_path()
        z0, y0 = model.encode(x), model.decode(model.encode(x))
        model.enable_fast_path()
        z1, y1 = model.encode(x), model.decode(z0)
        assert rel_err(z1, z0) < 1e-5 and rel_err(y1, y0) < 1e-5
        model.enable_tiling(tile_size=128)
        z2, y2 = model.encode(x), model.decode(z0)
    assert rel_err(z2, z0) < 1e-5 and rel_err(y2, y0) < 1e-5
