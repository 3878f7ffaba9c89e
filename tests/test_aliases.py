"""Every released autoencoder loads under every name it is published with (reference zoo names, both Hub
homes), and `dcae models` shows those names."""

from __future__ import annotations

import json

import pytest
import torch
from test_models_parity import narrow

from dcae import DCAE, get_config, list_models
from dcae.cli import main
from dcae.errors import UserError
from dcae.models.config import find_by_hub_id, model_aliases
from dcae.models.weights import _config_from_json

# name as published -> (registered name, its Hub repos), from the reference zoo (DC-Gen) and the Hub.
PUBLISHED = {
    "dc-ae-f32c128-1.5": ("dc-ae-1.5-f32c128", "dc-ai/dc-ae-f32c128-1.5"),
    "dc-ae-f64c128-1.5": ("dc-ae-1.5-f64c128", "dc-ai/dc-ae-f64c128-1.5"),
    "dc-ae-1.5-f64c128": ("dc-ae-1.5-f64c128", "dc-ai/dc-ae-f64c128-1.5"),
    "dc-ae-lite-f32c32": ("dc-ae-lite-f32c32-sana-1.1", "dc-ai/dc-ae-lite-f32c32"),
    "dc-ae-lite-f32c32-sana-1.1": ("dc-ae-lite-f32c32-sana-1.1", "mit-han-lab/dc-ae-lite-f32c32-sana-1.1"),
    "dc-ae-f32c32-in-1.0-256px": ("dc-ae-f32c32-in-1.0-256px", "mit-han-lab/dc-ae-f32c32-in-1.0-256px"),
}


@pytest.mark.parametrize("published", list(PUBLISHED))
def test_published_names_resolve(published: str) -> None:
    name, hub = PUBLISHED[published]
    cfg = get_config(published)
    assert cfg.name == name and cfg.hub_id == hub
    assert find_by_hub_id(hub).name == name
    if cfg.hub_id_diffusers is not None:
        assert cfg.hub_id_diffusers == f"{hub}-diffusers" and find_by_hub_id(f"{hub}-diffusers").name == name
    # the short form without "dc-ae-" works as for registered names
    assert get_config(published.removeprefix("dc-ae-")).name == name


def test_aliases_keep_the_registered_structure() -> None:
    lite, alias = get_config("dc-ae-lite-f32c32-sana-1.1"), get_config("dc-ae-lite-f32c32")
    assert {**lite.to_dict(), "hub_id": None, "hub_id_diffusers": None} == {
        **alias.to_dict(),
        "hub_id": None,
        "hub_id_diffusers": None,
    }
    assert model_aliases("dc-ae-1.5-f64c128") == ["dc-ae-f64c128-1.5"]
    assert set(model_aliases("dc-ae-lite-f32c32-sana-1.1")) == {"dc-ae-lite-f32c32"}


def test_256px_model_has_the_f32c32_in_architecture() -> None:
    a, b = get_config("dc-ae-f32c32-in-1.0-256px").to_dict(), get_config("dc-ae-f32c32-in-1.0").to_dict()
    different = {k for k in a if a[k] != b[k]}
    assert different == {"name", "hub_id", "hub_id_diffusers", "scaling_factor"}


@pytest.mark.parametrize("model_name", ["dc-ae-f64c128-1.5", "dc-ae-f32c128-1.5"])
def test_reference_checkpoint_config_json_is_understood(tmp_path, model_name: str) -> None:
    """The 1.5 checkpoints' config.json holds the reference zoo's name, which used to be unknown."""
    (tmp_path / "config.json").write_text(json.dumps({"model_name": model_name}))
    cfg = _config_from_json(tmp_path)
    assert cfg.name == PUBLISHED[model_name][0] and cfg.latent_channels == 128 and cfg.decoder_sliceable_in


@pytest.mark.parametrize("published", list(PUBLISHED))
def test_each_name_downloads_from_its_own_home(published: str, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=f"huggingface-cli download {PUBLISHED[published][1]}"):
        DCAE.from_pretrained(published)


def test_alias_loads_from_its_cached_hub_repo(monkeypatch, tmp_path) -> None:
    """`dc-ae-lite-f32c32` is looked up as dc-ai/dc-ae-lite-f32c32 in the Hugging Face cache (real lookup)."""
    import huggingface_hub.constants as c

    torch.manual_seed(0)
    model = DCAE.from_config(narrow("dc-ae-lite-f32c32-sana-1.1")).eval()
    repo = tmp_path / "hub" / "models--dc-ai--dc-ae-lite-f32c32"
    model.save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded = DCAE.from_pretrained("dc-ae-lite-f32c32")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_models_command_lists_aliases(capsys) -> None:
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out) if "aliases" in r}
    assert set(list_models()) <= set(rows)
    assert rows["dc-ae-1.5-f64c128"]["aliases"] == ["dc-ae-f64c128-1.5"]
    assert rows["dc-ae-1.5-f64c128"]["hub_id"] == "dc-ai/dc-ae-f64c128-1.5"
    assert rows["dc-ae-lite-f32c32-sana-1.1"]["aliases"] == ["dc-ae-lite-f32c32"]
    assert rows["dc-ae-f32c32-in-1.0"]["aliases"] == []
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "aliases" in table.splitlines()[0] and "dc-ae-f32c128-1.5" in table
