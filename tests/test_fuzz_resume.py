"""Fuzzing resume: training checkpoints whose recorded fields (step, data position, counters, RNG state,
weights, optimizer, EMA) are changed in value or type, removed or added, resumed by the autoencoder and the
diffusion trainer. A resume continues, or stops with one line naming the checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch
from fuzz_helpers import EXAMPLES, FUZZ, json_values, result_or_one_line
from hypothesis import given, settings
from hypothesis import strategies as st
from test_legacy_checkpoints import LEGACY, _diffusion_overrides
from test_train_helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FEW = settings(FUZZ, max_examples=max(4, EXAMPLES // 3))  # each example trains a step: fewer of them


@st.composite
def damaged_state(draw, state: dict) -> dict:
    """The checkpoint dict with one to two fields (or a field of a nested dict) replaced, removed or added."""
    state = dict(state)
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(sorted(state)))
        op = draw(st.sampled_from(["replace", "remove", "nested"]))
        if op == "remove":
            state.pop(key)
        elif op == "nested" and isinstance(state[key], dict) and state[key]:
            inner = dict(state[key])
            inner_key = draw(st.sampled_from(sorted(inner, key=str)))
            if draw(st.booleans()):
                inner.pop(inner_key)
            else:
                inner[inner_key] = draw(json_values())
            state[key] = inner
        else:
            state[key] = draw(json_values())
    return state


@FEW
@given(data=st.data())
def test_autoencoder_resume_from_damaged_checkpoint(tmp_path_factory, data):
    from dcae.train.config import load_config
    from dcae.train.trainer import train

    run = tmp_path_factory.mktemp("ae") / "run"
    shutil.copytree(LEGACY / "ae", run)
    path = run / "phase1" / "checkpoints" / "step_00000001.pt"
    state = torch.load(path, weights_only=True)
    torch.save(data.draw(damaged_state(state)), path)
    cfg = tiny_config(run, [str(run / "photos")])
    cfg["model"]["config"] = state["config"]["model"]["config"]
    cfg["data"]["holdout"] = 0
    cfg["val"]["max_images"] = 0
    cfg["checkpoint"]["every"] = 100
    result_or_one_line(lambda: train(load_config(cfg), phases=[1], resume=True), path)


@FEW
@given(data=st.data())
def test_diffusion_resume_from_damaged_checkpoint(tmp_path_factory, data):
    from dcae.diffusion.train.config import load_config
    from dcae.diffusion.train.loop import train

    out = tmp_path_factory.mktemp("dit") / "run"
    shutil.copytree(LEGACY / "diffusion" / "checkpoints", out / "checkpoints")
    path = out / "checkpoints" / "step_0000001.pt"
    torch.save(data.draw(damaged_state(torch.load(path, weights_only=True))), path)
    cfg = load_config(None, _diffusion_overrides(LEGACY / "diffusion" / "latents", out))
    result_or_one_line(lambda: train(cfg, progress=False), path)
