"""Fuzzing the checkpoint readers: autoencoder folders in the original and the diffusers format (config.json
and weights damaged), single weight files, diffusion training checkpoints and autoencoder training
checkpoints (bytes and recorded fields damaged). Each load gives a model or one line naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fuzz_helpers import FUZZ, join_safetensors, mutated_bytes, mutated_json, result_or_one_line, split_safetensors
from hypothesis import given
from hypothesis import strategies as st
from test_diffusion_latents import tiny_autoencoder
from test_legacy_checkpoints import LEGACY

from dcae.models import DCAE
from dcae.runtime.checkpoint import load_checkpoint as load_training_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WEIGHTS = {"original": "model.safetensors", "diffusers": "diffusion_pytorch_model.safetensors"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = tiny_autoencoder()
    for fmt in WEIGHTS:
        model.save_pretrained(root / fmt, format=fmt)
    torch.save(model.state_dict(), root / "weights.pt")
    return root


def _check_model(model) -> None:
    if model is not None:
        assert isinstance(model, DCAE)


@FUZZ
@given(data=st.data())
def test_autoencoder_folder_damaged(model_dirs, tmp_path_factory, data):
    fmt = data.draw(st.sampled_from(sorted(WEIGHTS)), label="format")
    folder = tmp_path_factory.mktemp("m") / fmt
    shutil.copytree(model_dirs / fmt, folder)
    part = data.draw(st.sampled_from(["config", "weights bytes", "weights header"]), label="what")
    weights = folder / WEIGHTS[fmt]
    if part == "config":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(data.draw(mutated_json(config))))
    elif part == "weights bytes":
        weights.write_bytes(data.draw(mutated_bytes(weights.read_bytes())))
    else:
        header, body = split_safetensors(weights.read_bytes())
        weights.write_bytes(join_safetensors(data.draw(mutated_json(header)), body))
    _check_model(result_or_one_line(lambda: DCAE.from_pretrained(folder), folder, ("config.json", WEIGHTS[fmt])))


@FUZZ
@given(data=st.data())
def test_single_weight_file_damaged(model_dirs, tmp_path, data):
    src = data.draw(st.sampled_from([model_dirs / "original" / "model.safetensors", model_dirs / "weights.pt"]))
    path = tmp_path / src.name
    path.write_bytes(data.draw(mutated_bytes(src.read_bytes())))
    _check_model(result_or_one_line(lambda: DCAE.from_pretrained(path), path))


def _legacy_diffusion_checkpoint():
    return LEGACY / "diffusion" / "checkpoints" / "step_0000001.pt"


@FUZZ
@given(data=st.data())
def test_diffusion_checkpoint_damaged(tmp_path, data):
    """Bytes damaged, or the recorded model arguments, config and latents metadata changed in value or type."""
    from dcae.diffusion.train.checkpoint import load_checkpoint

    path = tmp_path / "step_0000001.pt"
    src = _legacy_diffusion_checkpoint()
    if data.draw(st.booleans(), label="fields"):
        state = torch.load(src, weights_only=True)
        plain = {k: state[k] for k in ("model_args", "config", "latents", "step")}
        damaged = data.draw(mutated_json(plain))
        torch.save({**{k: v for k, v in state.items() if k not in plain}, **damaged}, path)
    else:
        path.write_bytes(data.draw(mutated_bytes(src.read_bytes())))
    result_or_one_line(lambda: load_checkpoint(path), path)


@FUZZ
@given(data=st.data())
def test_training_checkpoint_bytes_damaged(tmp_path, data):
    src = LEGACY / "ae" / "phase1" / "checkpoints" / "step_00000001.pt"
    path = tmp_path / src.name
    path.write_bytes(data.draw(mutated_bytes(src.read_bytes())))
    result_or_one_line(lambda: load_training_checkpoint(path), path)
