"""One config vocabulary for both trainers (`dcae train` and `dcae diffusion train` / `dcae t2i train`): the
shared names, the old keys that still load (one warning line each), and the global batch split."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_legacy_checkpoints import LEGACY
from test_train_helpers import tiny_config

from dcae.diffusion.train import config as diffusion_config
from dcae.runtime import batch
from dcae.runtime.config import ConfigError, to_dict
from dcae.train import config as ae_config

# old key -> (a value, the trainer it belongs to)
OLD_VALUES = {
    "out": "runs/elsewhere",
    "log_every": 7,
    "tensorboard": False,
    "ckpt_every": 11,
    "keep_last": 5,
    "optim.ema_decay": 0.5,
    "optim.ema_warmup": False,
    "diffusion.label_dropout": 0.25,
    "model.grad_checkpointing": True,
    "data.num_workers": 3,
}
TRAINERS = {"diffusion": diffusion_config, "autoencoder": ae_config}
CASES = [(kind, old, new) for kind, mod in TRAINERS.items() for old, new in mod.RENAMED.items()]
SHARED = ("out_dir", "seed", "mixed_precision", "grad_accum", "num_workers", "ema_decay", "ema_warmup",
          "checkpoint.every", "checkpoint.keep_last", "log.every", "log.tensorboard",
          "model.gradient_checkpointing")  # fmt: skip


def _nested(key: str, value) -> dict:
    *parents, last = key.split(".")
    out = {last: value}
    for part in reversed(parents):
        out = {part: out}
    return out


def _base(kind: str) -> dict:
    return {"data": "latents"} if kind == "diffusion" else {}


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _found(d: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("dcae: warning:")]


def test_every_old_key_has_a_value_here():
    assert {old for _, old, _ in CASES} == set(OLD_VALUES)


@pytest.mark.parametrize("kind, old, new", CASES)
def test_old_key_in_a_file_loads_into_the_new_field_with_one_warning(tmp_path, capsys, kind, old, new):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**_base(kind), **_nested(old, OLD_VALUES[old])}))
    cfg = TRAINERS[kind].load_config(path)
    assert _get(cfg, new) == OLD_VALUES[old]
    err = capsys.readouterr().err
    assert _warnings(err) == [f"dcae: warning: config key {old!r} is now {new!r} ({path})"]
    assert err.count("\n") == 1  # one line, no Python source line after it
    dumped = to_dict(cfg)  # what config.yaml and checkpoints record: the new names only
    assert _found(dumped, new) and not _found(dumped, old)


@pytest.mark.parametrize("kind, old, new", CASES)
def test_old_key_as_an_override_loads_into_the_new_field_with_one_warning(capsys, kind, old, new):
    base = [f"{k}={v}" for k, v in _base(kind).items()]
    value = OLD_VALUES[old]
    cfg = TRAINERS[kind].load_config(None, [*base, f"{old}={value}", f"{old}={value}"])
    assert _get(cfg, new) == value
    assert _warnings(capsys.readouterr().err) == [f"dcae: warning: config key {old!r} is now {new!r} (override)"]


@pytest.mark.parametrize("kind, old, new", CASES)
def test_old_and_new_key_together_is_an_error_naming_both(tmp_path, kind, old, new):
    value = OLD_VALUES[old]
    path = tmp_path / "run.yaml"
    data = {**_base(kind), **_nested(old, value)}
    data = ae_config.runtime_config.merge(data, _nested(new, value))
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        TRAINERS[kind].load_config(path)
    assert str(path) in str(exc.value) and repr(old) in str(exc.value) and repr(new) in str(exc.value)
    base = [f"{k}={v}" for k, v in _base(kind).items()]
    with pytest.raises(ConfigError) as exc:
        TRAINERS[kind].load_config(None, [*base, f"{new}={value}", f"{old}={value}"])
    assert repr(old) in str(exc.value) and repr(new) in str(exc.value) and "\n" not in str(exc.value)


def test_a_file_may_override_an_old_key_of_its_base_and_overrides_beat_the_file(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("data: latents\nlog_every: 3\noptim: {lr: 0.01, ema_decay: 0.9}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nlog: {every: 4}\n")
    cfg = diffusion_config.load_config(tmp_path / "run.yaml", ["ckpt_every=9", "optim={lr: 0.02, ema_decay: 0.8}"])
    assert (cfg.log.every, cfg.checkpoint.every, cfg.optim.lr, cfg.ema_decay) == (4, 9, 0.02, 0.8)
    assert _warnings(capsys.readouterr().err) == [
        f"dcae: warning: config key 'log_every' is now 'log.every' ({tmp_path / 'base.yaml'})",
        f"dcae: warning: config key 'optim.ema_decay' is now 'ema_decay' ({tmp_path / 'base.yaml'})",
        "dcae: warning: config key 'ckpt_every' is now 'checkpoint.every' (override)",
    ]
    # the shipped configs use the new names only
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        kind = "autoencoder" if path.name.startswith("train_") else "diffusion"
        TRAINERS[kind].load_config(path, [f"{k}={v}" for k, v in _base(kind).items()])
        assert _warnings(capsys.readouterr().err) == [], path.name


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_both_trainers_expose_the_shared_names(kind):
    cfg = TRAINERS[kind].TrainConfig()
    for name in SHARED:
        _get(cfg, name)  # AttributeError if missing
    assert isinstance(cfg.phase1.batch_size if kind == "autoencoder" else cfg.batch_size, int)
    assert isinstance(cfg.checkpoint, ae_config.CheckpointConfig)
    assert isinstance(cfg.log, ae_config.runtime_config.LogConfig)
    if kind == "diffusion":
        assert cfg.diffusion.cond_dropout == 0.1


def test_global_batch_split():
    assert batch.micro_batch(32, 2, 2) == 8 and batch.micro_batch(8, 1, 1) == 8
    assert batch.describe(32, 2, 2) == "batch 32 = 2 processes x 2 accumulation x 8"
    for size, procs, accum in ((10, 2, 2), (3, 1, 2), (2, 4, 1)):
        with pytest.raises(ConfigError) as exc:
            batch.micro_batch(size, procs, accum, "phase2.batch_size")
        message = str(exc.value)
        what = f"{procs} process" + ("es" if procs != 1 else "")
        assert message.startswith(f"phase2.batch_size {size} is not divisible by the {what} x {accum}")
        assert "\n" not in message


def test_autoencoder_refuses_a_global_batch_that_does_not_split_before_any_work(tmp_path):
    from dcae.train.trainer import train

    cfg = tiny_config(tmp_path / "run", [str(tmp_path / "no_photos")], grad_accum=2)
    cfg["phase2"]["batch_size"] = 3
    with pytest.raises(ConfigError, match=r"phase2\.batch_size 3 is not divisible by the 1 process x 2 accum"):
        train(ae_config.load_config(cfg), phases=[1, 2])
    assert not (tmp_path / "run" / "phase1").exists()


def test_autoencoder_resume_refuses_another_micro_batch(tmp_path):
    """The legacy checkpoint was written with batch_size 2 per process on one process: resuming with a global
    batch of 2 over 2 accumulation steps (micro-batches of 1) would read other images; the error says what
    global batch resumes it (4 = 2 accumulation steps x 2)."""
    from dcae.errors import UserError
    from dcae.train.trainer import train

    run = tmp_path / "ae"
    shutil.copytree(LEGACY / "ae", run)
    ck = torch.load(run / "phase1" / "checkpoints" / "step_00000001.pt", weights_only=True)
    cfg = tiny_config(run, [str(run / "photos")], grad_accum=2)
    cfg["model"]["config"] = ck["config"]["model"]["config"]
    cfg["data"]["holdout"] = 0
    cfg["val"]["max_images"] = 0
    with pytest.raises(UserError, match=r"micro-batches of 2 images on 1 process.*phase1\.batch_size=4"):
        train(ae_config.load_config(cfg), phases=[1], resume=True)


def test_old_diffusion_checkpoint_config_reads_in_the_new_names(capsys):
    from dcae.diffusion.train.checkpoint import load_checkpoint

    path = LEGACY / "diffusion" / "checkpoints" / "step_0000001.pt"
    assert "label_dropout" in torch.load(path, weights_only=True)["config"]["diffusion"]
    _, process, meta = load_checkpoint(path)
    config = meta["config"]
    assert config["diffusion"]["cond_dropout"] == process.cond_dropout == 0.1
    assert config["checkpoint"] == {"every": 1, "keep_last": 2} and config["log"]["every"] == 1
    assert "out" not in config and "out_dir" in config and "ema_decay" not in config["optim"]
    assert capsys.readouterr().err == ""  # no warnings for what a checkpoint recorded
