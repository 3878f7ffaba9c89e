"""The decoder recipe of `dcae train`: a new decoder trained against a frozen encoder (tiny models, CPU)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from test_train_helpers import TINY_MODEL, tiny_config, write_photos

from dcae.models import DCAE, DCAEConfig
from dcae.train.config import ConfigError, load_config
from dcae.train.decoder import student_config

STUDENT = {
    "name": "test-student",
    "decoder_widths": [8, 8, 16, 16, 16, 16],
    "decoder_depths": [0, 1, 1, 1, 1, 1],
    "decoder_block_types": "ResBlock",
    "decoder_norms": "trms2d",
    "decoder_acts": "silu",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_and_photos(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("decoder")
    torch.manual_seed(123)  # not the run's seed: a fresh init of the student's encoder would differ
    DCAE(DCAEConfig(**TINY_MODEL)).save_pretrained(root / "teacher")
    return root / "teacher", write_photos(root / "photos", n=6)


def recipe_config(out: Path, photos: Path, distill: float = 0.0) -> dict:
    cfg = tiny_config(out, [str(photos)])
    del cfg["model"]
    cfg["decoder"] = {"student": dict(STUDENT), "distill_weight": distill}
    cfg["phase1"]["trainable"] = {"decoder": "decoder.*"}
    cfg["phase2"]["trainable"] = {"decoder_in": "decoder.project_in.*", "inner": "decoder.stages.{last}.*"}
    cfg["phase3"]["trainable"] = {"decoder_head": "decoder.project_out.*"}
    return cfg


@pytest.fixture(scope="module")
def recipe_run(teacher_and_photos, tmp_path_factory):
    from dcae.train.trainer import train

    teacher, photos = teacher_and_photos
    out = tmp_path_factory.mktemp("run") / "run"
    train(load_config(recipe_config(out, photos)), phases=[1, 2, 3], init=str(teacher))
    return teacher, out


def _sd(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


@pytest.mark.parametrize("phase", [1, 2, 3])
@pytest.mark.parametrize("folder", ["model", "model-diffusers"])
def test_encoder_is_the_teachers_bit_for_bit(recipe_run, phase, folder):
    teacher_dir, out = recipe_run
    teacher = DCAE.from_pretrained(teacher_dir)
    student = DCAE.from_pretrained(out / f"phase{phase}" / folder)  # loads in both weight formats
    assert student.config.decoder_widths == tuple(STUDENT["decoder_widths"])
    assert student.config.latent_channels == teacher.config.latent_channels
    assert student.config.scaling_factor == teacher.config.scaling_factor
    t, s = _sd(teacher.encoder), _sd(student.encoder)
    assert t.keys() == s.keys()
    assert all(torch.equal(t[k], s[k]) for k in t), [k for k in t if not torch.equal(t[k], s[k])]


def test_decoder_trained_and_reads_the_teachers_latents(recipe_run, teacher_and_photos):
    from dcae.train.decoder import student_model

    teacher_dir, out = recipe_run
    _, photos = teacher_and_photos
    init = _sd(student_model(load_config(recipe_config(out, photos)), str(teacher_dir)).decoder)
    trained = DCAE.from_pretrained(out / "phase3" / "model").eval()
    after = _sd(trained.decoder)
    assert init.keys() == after.keys()
    changed = {k for k in init if not torch.equal(init[k], after[k])}
    assert any(k.startswith("stages.") for k in changed) and any(k.startswith("project_out.") for k in changed)

    teacher = DCAE.from_pretrained(teacher_dir).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = teacher.encode(x)  # latents made by the teacher, decoded without re-encoding
        y = trained.decode(z)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert sum(p.numel() for p in trained.decoder.parameters()) < sum(p.numel() for p in teacher.decoder.parameters())


def test_distillation_changes_training(teacher_and_photos, tmp_path):
    from dcae.train.trainer import train

    teacher, photos = teacher_and_photos
    results = {}
    for w in (0.0, 1.0):
        out = tmp_path / f"w{w}"
        train(load_config(recipe_config(out, photos, distill=w)), phases=[1], init=str(teacher))
        results[w] = _sd(DCAE.from_pretrained(out / "phase1" / "model").decoder)
        rows = list(csv.DictReader((out / "phase1" / "log.csv").open()))
        # the logged total holds the distillation term on top of the image loss
        assert (float(rows[0]["loss"]) > float(rows[0]["rec"])) == (w > 0)
    a, b = results[0.0], results[1.0]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_packaged_tiny_recipe_via_cli(teacher_and_photos, tmp_path):
    """`dcae train decoder_tiny --init SRC`: the packaged student fits the tiny f32 teacher."""
    from dcae.cli import main

    teacher, photos = teacher_and_photos
    out = tmp_path / "cli"
    small = [f"phase{n}.{k}" for n in (1, 2, 3) for k in ("steps=1", "batch_size=1", "resolution=32")]
    argv = ["train", "decoder_tiny", "--init", str(teacher), "--out", str(out), f"data.train=[{photos}]"]
    argv += [*small, "mixed_precision='no'", "num_workers=0", "data.holdout=1", "log.progress=false"]
    argv += ["log.tensorboard=false", "phase1.loss.perceptual_weight=0", "phase2.loss.perceptual_weight=0"]
    argv += ["phase3.loss.perceptual_weight=0", "val.resolutions=[32]", "decoder.distill_weight=0.5"]
    assert main(argv) == 0
    student = DCAE.from_pretrained(out / "phase3" / "model")
    assert student.config.name == "tiny-preview-decoder"
    t = _sd(DCAE.from_pretrained(teacher).encoder)
    assert all(torch.equal(v, _sd(student.encoder)[k]) for k, v in t.items())


# ----------------------------------------------------------------------------- refusals
def test_student_with_other_latent_channels_is_refused():
    teacher = DCAEConfig(**TINY_MODEL)
    with pytest.raises(ConfigError, match=r"latent_channels 16 does not match the encoder's latent_channels 8"):
        student_config(teacher, {**STUDENT, "latent_channels": 16})
    with pytest.raises(ConfigError, match=r"base dc-ae-lite-f32c32-sana-1.1: latent_channels 32 .* latent_channels 8"):
        student_config(teacher, {"base": "dc-ae-lite-f32c32-sana-1.1"})
    with pytest.raises(ConfigError, match=r"scaling_factor 0.5 does not match"):
        student_config(teacher, {**STUDENT, "scaling_factor": 0.5})


def test_other_bad_students_are_refused():
    teacher = DCAEConfig(**TINY_MODEL)
    with pytest.raises(ConfigError, match=r"encoder has 6 stages but decoder has 5"):
        student_config(teacher, {**STUDENT, "decoder_widths": [8, 8, 16, 16, 16], "decoder_depths": [0, 1, 1, 1, 1]})
    with pytest.raises(ConfigError, match=r"encoder_widths are not decoder fields"):
        student_config(teacher, {**STUDENT, "encoder_widths": [8, 8, 8, 8, 8, 8]})
    with pytest.raises(ConfigError, match=r"decoder_depths \[0, 1, 0, 1, 1, 1\]: a stage of depth 0 after"):
        student_config(teacher, {**STUDENT, "decoder_depths": [0, 1, 0, 1, 1, 1]})
    with pytest.raises(ConfigError, match=r"decoder_upsample_shortcut needs"):
        student_config(teacher, {**STUDENT, "decoder_widths": [8, 8, 16, 24, 16, 16]})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["phase2.trainable.x=encoder.project_out.*"], r"phase2.trainable: the decoder recipe trains only decoder"),
        (["phase1.trainable_inner_stages=true"], r"phase1.trainable_inner_stages: would train the encoder"),
        (["model.name=dc-ae-f32c32-in-1.0"], r"the encoder comes from --init"),
        (["decoder.distill_weight=-1"], r"decoder.distill_weight must be at least 0, got -1"),
    ],
)
def test_recipe_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("decoder_tiny", overrides)


def test_missing_teacher_is_refused(teacher_and_photos, tmp_path):
    from dcae.train.trainer import train

    _, photos = teacher_and_photos
    with pytest.raises(ConfigError, match=r"needs the teacher: pass --init"):
        train(load_config(recipe_config(tmp_path / "x", photos)), phases=[1])


def test_trainer_refuses_a_pattern_that_reaches_the_encoder(teacher_and_photos, tmp_path):
    """A regex that passes the config check (it starts with decoder) but also selects encoder tensors."""
    from dcae.train.trainer import train

    teacher, photos = teacher_and_photos
    cfg = recipe_config(tmp_path / "x", photos)
    cfg["phase1"]["trainable"] = {"sneaky": "re:decoder\\..*|encoder\\.project_out\\..*"}
    with pytest.raises(ConfigError, match=r"keeps the encoder frozen.*encoder\.project_out"):
        train(load_config(cfg), phases=[1], init=str(teacher))


def test_interrupted_recipe_resumes_to_the_same_student(teacher_and_photos, tmp_path, capsys):
    """A phase cut after step 2 of 4 (later checkpoints and the export removed) continues from the checkpoint
    with --resume and ends with the weights of the uninterrupted run; the encoder is still the teacher's."""
    import shutil

    from dcae.train.trainer import train

    teacher, photos = teacher_and_photos
    runs = {}
    for name in ("whole", "cut"):
        cfg = recipe_config(tmp_path / name, photos, distill=0.5)
        cfg["phase1"]["steps"] = 4
        cfg["checkpoint"]["keep_last"] = 4
        train(load_config(cfg), phases=[1], init=str(teacher))
        runs[name] = (tmp_path / name, cfg)
    cut, cfg = runs["cut"]
    for path in [cut / "phase1" / "metrics.json", *sorted((cut / "phase1" / "checkpoints").iterdir())[2:]]:
        path.unlink()
    shutil.rmtree(cut / "phase1" / "model")
    capsys.readouterr()
    train(load_config(cfg), phases=[1], init=str(teacher), resume=True)
    printed = capsys.readouterr().out
    assert "resumed phase 1 from" in printed and "(step 2," in printed, printed[-500:]
    a = DCAE.from_pretrained(tmp_path / "whole" / "phase1" / "model").state_dict()
    b = DCAE.from_pretrained(cut / "phase1" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    t = DCAE.from_pretrained(teacher).encoder.state_dict()
    assert all(torch.equal(v, b[f"encoder.{k}"]) for k, v in t.items())
