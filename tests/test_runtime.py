"""The shared training runtime: the config loader (base: inheritance, errors naming file and field, YAML's
booleans in string fields), the EMA's update rule, and the log's handling of a killed run's last line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dcae.runtime.config import ConfigError, load_config
from dcae.runtime.ema import EMA
from dcae.runtime.log import Logger, read_log


@dataclasses.dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class Cfg:
    name: str = "a"
    mixed_precision: str = "no"
    steps: int = 10
    flag: bool = False
    tags: list[str] = dataclasses.field(default_factory=list)
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_base_inheritance_merges_sections_and_files_override(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("name: root\nsteps: 5\noptim:\n  lr: 3e-4\n  betas: [0.5, 0.9]\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nsteps: 7\n")
    (tmp_path / "top.yaml").write_text("base: sub/mid.yaml\noptim:\n  lr: 1e-3\n")
    cfg = load_config(Cfg, tmp_path / "top.yaml", ["flag=yes"])
    assert (cfg.name, cfg.steps, cfg.flag) == ("root", 7, True)
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.5, 0.9)  # the section merged key by key


def test_base_by_packaged_name_and_loops_refused(tmp_path):
    (tmp_path / "shipped.yaml").write_text("name: shipped\n")
    (tmp_path / "run.yaml").write_text("base: tiny\nsteps: 3\n")
    cfg = load_config(Cfg, tmp_path / "run.yaml", packaged={"tiny": tmp_path / "shipped.yaml"})
    assert (cfg.name, cfg.steps) == ("shipped", 3)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(Cfg, tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "text, message",
    [
        ("stepz: 3\n", r"bad.yaml: unknown config key 'stepz' \(did you mean steps\?\)"),
        ("optim:\n  lrr: 1\n", r"bad.yaml: unknown config key 'optim.lrr' \(did you mean optim.lr\?\)"),
        ("steps: many\n", r"bad.yaml: steps: expected int, got 'many'"),
        ("optim:\n  betas: [0.9]\n", r"bad.yaml: optim.betas: expected tuple"),
        ("optim: 3\n", r"bad.yaml: optim: expected a mapping"),
        ("base: missing.yaml\n", r"bad.yaml: base: config file missing.yaml does not exist"),
        ("- a list\n", r"bad.yaml: expected a mapping at the top level"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, tmp_path / "bad.yaml")


def test_yaml_words_and_numbers_take_the_field_types():
    cfg = load_config(Cfg, {"mixed_precision": False, "name": True, "optim": {"lr": "6.4e-5"}, "tags": "a,b"})
    assert cfg.mixed_precision == "no" and cfg.name == "yes"  # YAML 1.1 reads a bare no / yes as booleans
    assert cfg.optim.lr == 6.4e-5 and cfg.tags == ["a", "b"]
    with pytest.raises(ConfigError, match="override 'steps' is not of the form key=value"):
        load_config(Cfg, None, ["steps"])


def test_ema_update_rule_and_model_state_format():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.999)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    for k in range(1, 4):  # the k-th update decays by min(decay, (1 + k) / (10 + k))
        with torch.no_grad():
            model.weight.add_(1.0)
        before = ema.shadow["weight"].clone()
        ema.update(model)
        d = min(0.999, (1 + k) / (10 + k))
        torch.testing.assert_close(ema.shadow["weight"], d * before + (1 - d) * model.weight.detach())
    torch.testing.assert_close(ema.shadow["bias"], start["bias"])  # an unchanged weight stays where it was
    assert EMA(model, 0.5, warmup=False).current_decay() == 0.5
    other = EMA(model, 0.999)
    other.load_state_dict(ema.state_dict_for(model))  # a model state dict of averaged weights
    torch.testing.assert_close(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict({"weight": torch.zeros(1, 2)})


def test_log_drops_rows_past_the_resume_step_and_half_written_lines(tmp_path):
    log = Logger(tmp_path, ("step", "loss"), None, tensorboard=False)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step})
    with open(tmp_path / "log.csv", "a") as f:
        f.write("4,0.2")  # a killed run's last line, half-written...
    with open(tmp_path / "log.csv", "a") as f:
        f.write("\n5,")  # ...and a line with only its step
    assert [r["step"] for r in read_log(tmp_path / "log.csv")] == [1, 2, 3, 4, 5]
    Logger(tmp_path, ("step", "loss"), 2, tensorboard=False)  # resumed from step 2
    assert [r["step"] for r in read_log(tmp_path / "log.csv")] == [1, 2]
    (tmp_path / "log.csv").write_text("step,loss\n1,0.5\nx,y\n")
    assert [r["step"] for r in read_log(tmp_path / "log.csv")] == [1]
