"""Weight formats: the conversion table both ways, diffusers' own loader and converter, the Hub path,
and every kind of bad weights."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderDC
from safetensors.torch import save_file
from test_models_parity import narrow, randomize_norms

from dcae import DCAE, get_config, list_models
from dcae.errors import UnknownModelError, UserError, WeightsError
from dcae.models import weights
from dcae.models.convert import diffusers_to_original, original_to_diffusers, to_diffusers_config


@pytest.fixture(scope="module")
def sana() -> DCAE:
    torch.manual_seed(0)
    model = DCAE.from_config(narrow("dc-ae-f32c32-sana-1.0")).eval()
    randomize_norms(model)
    return model


@pytest.fixture(scope="module")
def in10() -> DCAE:
    torch.manual_seed(0)
    model = DCAE.from_config(narrow("dc-ae-f32c32-in-1.0")).eval()
    randomize_norms(model)
    return model


def same_outputs(a, b, x) -> None:
    with torch.no_grad():
        za = a.encode(x)
        zb = b.encode(x) if isinstance(b, DCAE) else b.encode(x).latent
        ya = a.decode(za)
        yb = b.decode(za) if isinstance(b, DCAE) else b.decode(za).sample
    torch.testing.assert_close(za, zb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_table_round_trip_and_diffusers_key_set(name: str) -> None:
    """original -> diffusers gives exactly AutoencoderDC's keys and shapes, and converts back unchanged."""
    with torch.device("meta"):
        model = DCAE.from_config(name)
        twin = AutoencoderDC(**{k: v for k, v in to_diffusers_config(model.config).items() if k[0] != "_"})
    sd = model.state_dict()
    converted = original_to_diffusers(sd)
    expected = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    back = diffusers_to_original(converted, sd.keys())
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("name", ["dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.0", "dc-ae-f64c128-mix-1.0"])
def test_table_agrees_with_diffusers_single_file_converter(name: str) -> None:
    """diffusers' own converter of original checkpoints is an independent reading of the original keys."""
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    torch.manual_seed(0)
    sd = DCAE.from_config(narrow(name)).state_dict()
    theirs = convert_autoencoder_dc_checkpoint_to_diffusers(dict(sd))
    ours = original_to_diffusers(sd)
    assert set(theirs) == set(ours)
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k


def test_save_diffusers_format_loads_in_diffusers_strictly(sana, tmp_path) -> None:
    sana.save_pretrained(tmp_path / "d", format="diffusers")
    twin, info = AutoencoderDC.from_pretrained(tmp_path / "d", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    same_outputs(sana, twin.eval(), torch.rand(1, 3, 64, 64) * 2 - 1)


def test_diffusers_saved_weights_load_into_ours(in10, tmp_path) -> None:
    twin = AutoencoderDC(**{k: v for k, v in to_diffusers_config(in10.config).items() if k[0] != "_"})
    twin.load_state_dict(original_to_diffusers(in10.state_dict()))
    twin.save_pretrained(tmp_path / "d")
    twin.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    for folder in ("d", "sharded"):
        loaded = DCAE.from_pretrained(tmp_path / folder)
        same_outputs(loaded, twin.eval(), x)
        assert loaded.config.decoder_norms == in10.config.decoder_norms


def test_original_format_round_trip_and_convert_command(sana, tmp_path) -> None:
    from dcae.cli import main

    sana.save_pretrained(tmp_path / "orig")
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert cfg["model_name"] == sana.config.name
    assert main(["convert", str(tmp_path / "orig"), str(tmp_path / "d"), "--format", "diffusers"]) == 0
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "o2"), "--format", "original"]) == 0
    loaded = DCAE.from_pretrained(tmp_path / "o2")
    for k, v in sana.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a single weight file next to its config.json
    same_outputs(DCAE.from_pretrained(tmp_path / "orig" / "model.safetensors"), sana, torch.rand(1, 3, 64, 64))


def test_reference_training_checkpoint(sana, tmp_path) -> None:
    """`torch.load(path)["state_dict"]` with an `ema` entry, as the reference code writes them."""
    (tmp_path / "config.json").write_text(json.dumps({"dcae_config": sana.config.to_dict()}))
    torch.save({"state_dict": sana.state_dict(), "ema": {}}, tmp_path / "ckpt.pt")
    same_outputs(DCAE.from_pretrained(tmp_path / "ckpt.pt"), sana, torch.rand(1, 3, 32, 32))


def test_single_file_config_inference_from_shapes() -> None:
    def infer_config(state_dict):
        return weights.infer_config(state_dict, model_class=DCAE)

    with torch.device("meta"):
        sana = DCAE.from_config("dc-ae-f32c32-sana-1.1").state_dict()
        f64 = DCAE.from_config("dc-ae-f64c128-in-1.0").state_dict()
        lite = DCAE.from_config("dc-ae-lite-f32c32-sana-1.1").state_dict()
    # sana 1.0 and 1.1 share shapes and scaling factor: either is right
    assert infer_config(sana).scaling_factor == pytest.approx(0.41407)
    assert infer_config(lite).name == "dc-ae-lite-f32c32-sana-1.1"
    # in and mix share shapes but not the scaling factor: the user must say which
    with pytest.raises(UserError, match="model_name"):
        infer_config(f64)
    # diffusers keys are understood too
    assert infer_config(original_to_diffusers(lite)).name == "dc-ae-lite-f32c32-sana-1.1"


# ----------------------------------------------------------------------------- bad input
def test_wrong_shapes_missing_and_unexpected_keys_are_named(sana, tmp_path) -> None:
    sana.save_pretrained(tmp_path / "m")
    sd = dict(sana.state_dict())
    sd["decoder.project_in.main.conv.weight"] = torch.zeros(1, 2, 3, 3)
    del sd["encoder.project_in.conv.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(WeightsError) as err:
        DCAE.from_pretrained(tmp_path / "m")
    msg = str(err.value)
    assert "decoder.project_in.main.conv.weight" in msg and "(1, 2, 3, 3)" in msg
    assert "encoder.project_in.conv.bias" in msg and "encoder.extra.weight" in msg
    assert str(tmp_path / "m" / "model.safetensors") in msg


def test_truncated_safetensors_names_the_file(sana, tmp_path) -> None:
    sana.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        DCAE.from_pretrained(tmp_path / "m")


def test_unknown_model_suggests_the_closest_name() -> None:
    with pytest.raises(UnknownModelError, match="dc-ae-f64c128-in-1.0"):
        get_config("dc-ae-f64c128-inn-1.0")
    with pytest.raises(UnknownModelError, match="Known models"):
        DCAE.from_pretrained("no-such-model")


def test_existing_output_is_not_overwritten(sana, tmp_path) -> None:
    sana.save_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="already exists"):
        sana.save_pretrained(tmp_path / "m")
    sana.save_pretrained(tmp_path / "m", overwrite=True)


def test_hub_offline_fails_fast_with_a_clear_message(monkeypatch, tmp_path) -> None:
    import time

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(UserError, match="huggingface-cli download mit-han-lab/dc-ae-f32c32-in-1.0"):
        DCAE.from_pretrained("dc-ae-f32c32-in-1.0")
    assert time.time() - t0 < 10


def test_hub_cache_is_used(sana, monkeypatch, tmp_path) -> None:
    """A repo already in the Hugging Face cache loads offline, through the real huggingface_hub lookup."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = tmp_path / "hub" / "models--someone--tiny-dcae" / "snapshots" / ("0" * 40)
    sana.save_pretrained(snap)
    refs = tmp_path / "hub" / "models--someone--tiny-dcae" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("0" * 40)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded = DCAE.from_pretrained("someone/tiny-dcae")
    same_outputs(loaded, sana, torch.rand(1, 3, 32, 32))
