"""Training checkpoints written before the shared training runtime (tests/data/legacy, made by
make_legacy.py with the code of commit 679cd50) still load, sample and resume, and a resumed run ends where
the uninterrupted run of that code ended."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_helpers import tiny_config

LEGACY = Path(__file__).parent / "data" / "legacy"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Resumed with this code, on any CPU, the legacy runs end within float rounding of where they ended then.
ATOL = 1e-5


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=ATOL), f"{what}: {k}"


def test_autoencoder_checkpoint_resumes(tmp_path):
    from dcae.train.config import load_config
    from dcae.train.trainer import train

    run = tmp_path / "ae"
    shutil.copytree(LEGACY / "ae", run)
    ck = torch.load(run / "phase1" / "checkpoints" / "step_00000001.pt", weights_only=True)
    cfg = tiny_config(run, [str(run / "photos")])
    cfg["model"]["config"] = ck["config"]["model"]["config"]
    cfg["data"]["holdout"] = 0
    cfg["val"]["max_images"] = 0
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train(load_config(tmp_path / "cfg.yaml"), phases=[1], resume=True)
    final = torch.load(run / "phase1" / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert final["step"] == 2
    _close(final["model"], load_file(LEGACY / "ae" / "final_raw.safetensors"), "model")
    ema = final["ema"]
    shadow = ema.get("shadow", ema)
    _close({k: shadow[k] for k in load_file(LEGACY / "ae" / "final_ema.safetensors")},
           load_file(LEGACY / "ae" / "final_ema.safetensors"), "ema")  # fmt: skip


def _diffusion_overrides(data: Path, out: Path) -> list[str]:
    return [f"data={data}", f"out_dir={out}", "batch_size=4", "max_steps=2", "log.every=1", "checkpoint.every=1",
            "checkpoint.keep_last=2", "mixed_precision=no", "num_workers=0", "sample.every=0", "sample.decode=false",
            "sample.steps=2", "sample.num=2", "optim.lr=1e-3",
            "model.overrides={depth: 1, hidden_size: 16, num_heads: 2}"]  # fmt: skip


def test_diffusion_checkpoint_loads_and_samples():
    from dcae.diffusion.conditioning import Labels
    from dcae.diffusion.processes.sampling import sample
    from dcae.diffusion.train.checkpoint import load_checkpoint

    model, process, meta = load_checkpoint(LEGACY / "diffusion" / "checkpoints" / "step_0000001.pt")
    assert meta["step"] == 1 and meta["latents"].class_names == ["cat", "dog"]
    noise = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(model, process, noise, Labels(torch.tensor([0, 1]), 2), steps=2, solver="euler", cfg_scale=2.0)
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_diffusion_checkpoint_resumes(tmp_path):
    from dcae.diffusion.train.checkpoint import list_checkpoints
    from dcae.diffusion.train.config import load_config
    from dcae.diffusion.train.loop import train

    out = tmp_path / "run"
    shutil.copytree(LEGACY / "diffusion" / "checkpoints", out / "checkpoints")
    train(load_config(None, _diffusion_overrides(LEGACY / "diffusion" / "latents", out)), progress=False)
    final = torch.load(list_checkpoints(out)[-1], weights_only=True)
    assert final["step"] == 2
    ref = torch.load(LEGACY / "diffusion" / "final.pt", weights_only=True)
    _close(final["model"], ref["model"], "model")
    # The EMA's warm-up is now the runtime's one for every trainer: the k-th update decays by
    # min(decay, (1 + k) / (10 + k)); the diffusion trainer used to take (1 + s) / (10 + s) with s = k - 1.
    # So the resumed step 2 averages the legacy step-1 EMA with decay 3/12 where the old code used 2/11.
    legacy = torch.load(LEGACY / "diffusion" / "checkpoints" / "step_0000001.pt", weights_only=True)["ema"]
    expected = {k: legacy[k].lerp(ref["model"][k], 1 - 3 / 12) for k in legacy}
    _close(final["ema"], expected, "ema")
    old_rule = {k: legacy[k].lerp(ref["model"][k], 1 - 2 / 11) for k in legacy}
    _close(old_rule, ref["ema"], "ema of the old code")
