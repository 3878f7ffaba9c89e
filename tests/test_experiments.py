"""`dcae experiment NAME --smoke`: each experiment end to end on scikit-image's bundled photos (a few
steps, one seed), plus the statistics and the sharpness measure against independent computations."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

from dcae.cli import main
from dcae.experiments import EXPERIMENTS
from dcae.experiments.common import sharpness, spread


def _smoke(name: str, tmp_path) -> dict:
    out = tmp_path / name
    assert main(["experiment", name, "--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for png in [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / png).stat().st_size > 1000, png  # every picture the report shows exists
    assert results["smoke"] is True and results["command"].startswith("dcae experiment")
    assert "smoke run" in report
    return results


def test_residual_smoke(tmp_path):
    r = _smoke("residual", tmp_path)
    # "plain" is the same network minus the shortcuts: same parameter count at each factor
    assert r["parameters"]["f32 residual"] == r["parameters"]["f32 plain"]
    assert r["parameters"]["f64 residual"] == r["parameters"]["f64 plain"]
    assert set(r["residual_minus_plain"]) == {"f32", "f64"}
    for label, curves in r["curves"].items():
        (curve,) = curves  # one seed
        assert [p["step"] for p in curve] == [0, r["steps"]], label  # before and after training
        assert all(math.isfinite(p["psnr"]) and 0 < p["lpips"] < 2 for p in curve)
    # the recorded final metrics are the last curve point (the same weights)
    assert r["final"]["f32 plain"]["psnr"]["mean"] == pytest.approx(r["curves"]["f32 plain"][0][-1]["psnr"])


def test_adaptation_smoke(tmp_path):
    r = _smoke("adaptation", tmp_path)
    assert set(r["quality"]) == {"phase 1 only (no adaptation)", *_arms("adaptation")}
    assert all(set(by_res) == {"64", "128", "256"} for by_res in r["quality"].values())
    cost = r["cost"]
    latent, full = cost["phase 2 (latent layers, high res)"], cost["control: full fine-tuning, high res"]
    for res in latent:
        assert latent[res]["trainable_parameters"] < full[res]["trainable_parameters"]
        # less to keep for backward, no gradients / AdamW state for the frozen layers
        assert latent[res]["peak_mib"] < full[res]["peak_mib"]


def test_gan_smoke(tmp_path):
    r = _smoke("gan", tmp_path)
    assert set(r["final"]) == {"start (phase 2 result)", *_arms("gan")}
    for arm, m in r["final"].items():
        assert math.isfinite(m["fid"]["mean"]) and m["sharpness"]["mean"] > 0, arm
    # the GAN arms really trained a discriminator (smoke: disc_start 0)
    from dcae.runtime.log import read_log

    runs = tmp_path / "gan" / "runs"
    with_gan = read_log(runs / "head___GAN" / "seed0" / "phase3" / "log.csv")
    without = read_log(runs / "head__no_GAN" / "seed0" / "phase3" / "log.csv")
    assert with_gan and all("d_loss" in row for row in with_gan)
    assert without and not any("d_loss" in row or "g_loss" in row for row in without)  # the control has no GAN


def test_decoder_smoke(tmp_path):
    r = _smoke("decoder", tmp_path)
    check = r["encoder_checks"]["tiny preview"]
    assert check["encoder_tensors_identical"] and check["teacher_latents_decode_like_own"]
    assert check["scaling_factor"][0] == check["scaling_factor"][1]
    assert r["decoder_parameters"]["tiny preview"] < r["decoder_parameters"]["teacher"]
    assert r["decode"]["teacher"]["speedup"] == 1.0 and r["decode"]["tiny preview"]["dec_img_s"] > 0


def test_t2i_smoke(tmp_path):
    r = _smoke("t2i", tmp_path)
    arms = _arms("t2i")
    assert r["checker_on_truth"] == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}
    assert set(r["adherence"]) == set(arms) and set(r["autoencoder_ceiling"]) == set(arms)
    for arm in arms:
        assert set(r["adherence"][arm]) == {"1", "4"}  # guidance off and on
        assert all(0 <= row["all"]["mean"] <= 1 for row in r["adherence"][arm].values())
    f32, f8 = (r["throughput"][a] for a in arms)
    # 128 px: f32 latents 4 x 4 with patch 1, f8 latents 16 x 16 with patch 2
    assert (f32["tokens"], f8["tokens"]) == (16, 64) and f32["latent_shape"] == [32, 4, 4]
    assert f32["params_m"] == pytest.approx(f8["params_m"], abs=0.01)  # the same network
    # the runs went through the real commands: a t2i cache and a resumable t2i run per arm
    runs = tmp_path / "t2i" / "runs"
    assert (runs / "DC_AE_f32c32__patch_1" / "cache" / "index.json").is_file()
    images = sorted((runs / "f8c4__patch_2" / "samples-seed0-cfg4" / "images").glob("*.png"))
    assert len(images) == 6
    # run again: finished work is read back, not redone, and the report counts both runs' time
    mtimes = [p.stat().st_mtime_ns for p in images]
    again = _smoke("t2i", tmp_path)
    assert [p.stat().st_mtime_ns for p in images] == mtimes
    assert len(again["run_minutes"]) == 2 and again["adherence"] == r["adherence"]


def test_structured_smoke(tmp_path):
    r = _smoke("structured", tmp_path)
    arms = _arms("structured")
    assert set(r["curves"]) == set(arms) and set(r["final"]) == set(arms)
    for curves in r["curves"].values():  # one curve per seed, adherence at every kept checkpoint
        assert [row["step"] for row in curves[0]] == [2, 4]
        assert all(0 <= row["all"] <= 1 for row in curves[0])
    ae = r["autoencoders"]
    assert ae["structured-c32"]["structured"] and set(ae["structured-c32"]["held_out_psnr_by_channels"]) == {
        "8", "16", "24", "32"}  # fmt: skip
    assert [ae[k]["latent_channels"] for k in ("plain-c32", "plain-c8")] == [32, 8]
    runs = tmp_path / "structured" / "runs"
    from dcae.diffusion.train.checkpoint import load_checkpoint

    augmented, _, _ = load_checkpoint(runs / "c__structured_c32___augmented" / "seed0")
    plain, _, _ = load_checkpoint(runs / "b__structured_c32" / "seed0")
    assert augmented.adaptive_channel and not plain.adaptive_channel
    plan = json.loads((runs / "c__structured_c32___augmented" / "seed0" / "samples-subset" / "plan.json").read_text())
    assert plan["settings"]["latent_shape"] == [8, 8, 8]  # sampled at a leading subset
    again = _smoke("structured", tmp_path)  # finished work is read back
    assert again["curves"] == r["curves"] and len(again["run_minutes"]) == 2


def test_adapt_smoke(tmp_path):
    """DC-Gen's recipe end to end: teacher, the three adaptation stages and a merged student, two scratch runs whose
    steps spend the adaptation's and the teacher's training FLOPs, all sampled and checked."""
    r = _smoke("adapt", tmp_path)
    from dcae.experiments.adapt import ARMS

    assert set(r["adherence"]) == set(ARMS)
    assert all(0 <= row["all"]["mean"] <= 1 for row in r["adherence"].values())
    teacher, student, same, full = (r["training_flops"][a] for a in ARMS)
    flops = r["forward_flops_per_image"]
    b = r["budget"]
    assert teacher == 3 * flops["f8c4, patch 2"] * b["teacher_steps"] * b["batch"]
    assert same == pytest.approx(student, rel=0.2) and full == pytest.approx(teacher, rel=0.1)
    runs = tmp_path / "adapt" / "runs" / "adapted_student__f32c32__patch_1" / "seed0"
    assert [(runs / s / "checkpoints").is_dir() for s in ("align", "head", "lora", "final")] == [True] * 4
    assert (tmp_path / "adapt" / "adherence.png").is_file() and (tmp_path / "adapt" / "samples.png").is_file()


def test_t2i_makes_its_own_data(tmp_path, capsys):
    assert main(["experiment", "t2i", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "makes its own data" in capsys.readouterr().err


def _arms(name: str) -> list[str]:
    import importlib

    return list(importlib.import_module(EXPERIMENTS[name][0]).ARMS)


def test_full_protocol_needs_the_data(tmp_path, capsys):
    assert main(["experiment", "residual", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing does not exist" in err and "--data" in err


def test_spread_matches_statistics():
    values = [14.2, 15.1, 14.7]
    s = spread(values)
    assert s["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
    assert s["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)  # sample std (n - 1)
    assert math.isnan(spread([1.0])["std"]) and spread([1.0])["n"] == 1


def test_sharpness_ratio():
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    assert sharpness(ref, ref) == pytest.approx([1.0, 1.0])
    # a 2x2 box blur removes high frequencies: a ratio well below 1
    blur = torch.nn.functional.avg_pool2d(ref.double(), 2, 1, padding=0)
    blur = torch.nn.functional.pad(blur, (0, 1, 0, 1), mode="replicate")
    assert all(v < 0.6 for v in sharpness(ref, blur))
    # scaling the detail by 2 (around the mean) multiplies the Laplacian's variance by 4
    mean = ref.double().mean()
    assert sharpness(ref, (ref.double() - mean) * 2 + mean) == pytest.approx([4.0, 4.0])
    # a flat original has no detail to compare with: skipped
    flat = torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)
    assert sharpness(flat, flat) == []
