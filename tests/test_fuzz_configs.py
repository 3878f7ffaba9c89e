"""Fuzzing the config readers: the autoencoder trainer's and the diffusion trainer's YAML configs (text
damaged, or fields changed in value and type) and autoencoder model configs (YAML and JSON). Each load gives
a config or one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fuzz_helpers import FUZZ, mutated_bytes, mutated_json, result_or_one_line
from hypothesis import given
from hypothesis import strategies as st

from dcae.models.config import DCAEConfig, get_config

REPO = Path(__file__).resolve().parents[1]
TRAIN = {
    "autoencoder": REPO / "configs" / "train_tiny.yaml",
    "diffusion": REPO / "configs" / "diffusion_cpu_small.yaml",
}


def _loader(kind: str):
    if kind == "autoencoder":
        from dcae.train.config import load_config

        return lambda path: load_config(path)
    from dcae.diffusion.train.config import load_config

    return lambda path: load_config(path)


@FUZZ
@given(data=st.data())
def test_training_config_fields_damaged(tmp_path, data):
    kind = data.draw(st.sampled_from(sorted(TRAIN)), label="trainer")
    config = yaml.safe_load(TRAIN[kind].read_text())
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data.draw(mutated_json(config))))
    result_or_one_line(lambda: _loader(kind)(path), path)


@FUZZ
@given(data=st.data())
def test_training_config_text_damaged(tmp_path, data):
    kind = data.draw(st.sampled_from(sorted(TRAIN)), label="trainer")
    path = tmp_path / "run.yaml"
    path.write_bytes(data.draw(mutated_bytes(TRAIN[kind].read_bytes())))
    result_or_one_line(lambda: _loader(kind)(path), path)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@FUZZ
@given(data=st.data())
def test_model_config_damaged(tmp_path, suffix, data):
    d = get_config("dc-ae-f32c32-sana-1.1").to_dict()
    if data.draw(st.booleans(), label="as a base"):
        d = {"base": "dc-ae-f32c32-sana-1.1", "latent_channels": 32}
    damaged = data.draw(mutated_json(d))
    path = tmp_path / f"model{suffix}"
    path.write_text(json.dumps(damaged) if suffix == ".json" else yaml.safe_dump(damaged))
    result_or_one_line(lambda: DCAEConfig.from_file(path), path)
