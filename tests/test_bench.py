"""`dcae bench ae`: a tiny run through the real CLI, and the JSON/Markdown it writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dcae.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).parent))
from test_tiling import TINY  # noqa: E402

KEYS = {"model", "impl", "res", "batch", "dtype", "device", "enc_img_s", "dec_img_s", "enc_peak_gib", "dec_peak_gib"}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY.to_dict()))
    return path


def test_bench_ae_json_schema(tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results" / "ae.json"
    argv = ["bench", "ae", "--models", str(tiny_config), "--res", "64", "128", "--batch", "2", "1"]
    argv += ["--device", "cpu", "--repeats", "2", "--threads", "1", "--json", str(out)]
    assert cli_main(argv) == 0
    records = json.loads(out.read_text())
    assert len(records) == 4  # 2 resolutions x (dcae, diffusers)
    for r in records:
        assert set(r) >= KEYS, KEYS - set(r)
        assert r["impl"] in ("dcae", "diffusers") and r["device"] == "cpu" and r["dtype"] == "fp32"
        assert r["enc_img_s"] > 0 and r["dec_img_s"] > 0 and r["enc_peak_gib"] > 0 and r["dec_peak_gib"] > 0
    assert [(r["res"], r["batch"]) for r in records] == [(64, 2), (64, 2), (128, 1), (128, 1)]
    from PIL import Image

    assert Image.open(out.with_suffix(".png")).size[0] > 300  # the chart next to the numbers
    table = out.with_suffix(".md").read_text()
    assert "time vs diffusers" in table and "dcae bench ae" in table
    assert "| dcae |" in capsys.readouterr().out


def test_bench_ae_saved_models(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--models takes saved folders (e.g. a trained decoder's `phase3/model`) and weight files, loaded with
    their weights and named as given; a model diffusers cannot express runs without the diffusers impls."""
    import torch

    from dcae.models import DCAE
    from dcae.models.bench import load_model, weights_kind

    torch.manual_seed(1)
    saved = DCAE(TINY)
    saved.save_pretrained(tmp_path / "run" / "model")
    DCAE(TINY.without_residual()).save_pretrained(tmp_path / "plain")
    folder, plain, weights = tmp_path / "run" / "model", tmp_path / "plain", tmp_path / "plain" / "model.safetensors"
    loaded = load_model(str(folder)).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in saved.state_dict().items())  # the real weights, not a re-init
    out = tmp_path / "ae.json"
    argv = ["bench", "ae", "--models", str(folder), str(plain), str(weights), "--res", "64", "--batch", "1"]
    argv += ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-memory"]
    assert cli_main(argv + ["--json", str(out)]) == 0
    records = json.loads(out.read_text())
    got = [(r["model"], r["impl"]) for r in records]
    assert got == [(str(folder), "dcae"), (str(folder), "diffusers"), (str(plain), "dcae"), (str(weights), "dcae")]
    assert all(r["weights"] == "loaded" and r["enc_img_s"] > 0 and r["dec_img_s"] > 0 for r in records)
    assert all(r["enc_peak_gib"] is None for r in records)
    err = capsys.readouterr().err
    assert f"dcae: note: {plain}: diffusers cannot express this model" in err and "skipping the diffusers" in err
    assert f"| {folder} | 64 | 1 | dcae |" in out.with_suffix(".md").read_text()
    assert weights_kind("dc-ae-f32c32-in-1.0") == "random"  # zoo names: a random init of the config, as before


def test_bench_ae_batch_count_must_match(tiny_config: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "ae", "--models", str(tiny_config), "--res", "64", "128", "--batch", "1", "2", "3"]
    assert cli_main(argv + ["--device", "cpu"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_gpu_check_dry_run(tmp_path: Path, tiny_config: Path) -> None:
    """The one-shot GPU script must not break on its single run: rehearse every section on the CPU, with the
    gates judging the rehearsal (fp32 timings at batch 1: the dry run checks code paths, not speed)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--dry-run", str(tiny_config)]
    # The timeout only stops a hung run (the rehearsal takes well under a minute on 2 AVX2 cores).
    proc = subprocess.run(cmd + ["--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "all correctness gates passed" in proc.stdout
    (report,) = tmp_path.glob("gpu_check_cpu-dry-run_*.json")
    sections = json.loads(report.read_text())["sections"]
    errors = {k: v for k, v in sections.items() if "error" in k or (isinstance(v, dict) and "error" in v)}
    assert not errors, errors
    assert sections["gates"] == {"passed": True, "failures": []}
    model = sections["correctness_dc-ae-f32c32-in-1.0"]
    assert model["float32_fast_vs_eager"]["dec"] < 1e-5 and model["float32_fast_vs_diffusers"]["enc"] < 1e-5
    assert sections["tiling"]["exact_fp32_psnr_vs_untiled"] > 100
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels ran in Triton's interpreter
        kernels = sections["triton_kernels"]
        assert kernels["fast_path_self_check"] == "ok" and kernels["rms_float32"] < 1e-5, kernels
    prof = sections["profile"]["dc-ae-f32c32-in-1.0"]
    assert prof["dcae_dec_peak_fraction"] > 0 and prof["diffusers_enc_peak_fraction"] > 0
    assert prof["dcae_dec_top_ops"][0]["ms"] > 0
    variants = sections["fast_path_variants"]["dc-ae-f32c32-in-1.0"]
    assert {"default", "cudnn_benchmark", "no_triton", "channels_last_weights"} <= set(variants)
    assert all(v["enc_img_s"] > 0 and v["dec_img_s"] > 0 for v in variants.values())
    assert [r["setting"] for r in sections["diffusion_throughput"]] == ["sd-vae-f8-p2", "dc-ae-f32-p1", "dc-ae-f64-p1"]
    t2i = sections["diffusion_t2i_throughput"]
    assert [r["tokens"] for r in t2i] == [1024, 256, 64] and all(r["condition"]["kind"] == "text" for r in t2i)
    records = json.loads(next(tmp_path.glob("ae_gpu_cpu-dry-run_*.json")).read_text())
    assert {r["impl"] for r in records} == {"dcae", "diffusers"} and all(set(r) >= KEYS for r in records)
    # every goal was computed from the rehearsal's own records (met or missed means nothing on a CPU)
    goals = sections["goals"]
    compiled = [g for g in goals if "compile" in g["goal"]]
    assert all(g["status"] in ("met", "missed") for g in goals if g not in compiled), goals
    assert all(g["status"] == "not measured" for g in compiled)  # the dry run skips the compiled benchmark
    assert "| goal | target | measured | status |" in next(tmp_path.glob("goals_cpu-dry-run_*.md")).read_text()


def _passing_report() -> dict:
    ok_model = {
        "float32_fast_vs_eager": {"enc": 1e-6, "dec": 1e-6},
        "float32_fast_vs_diffusers": {"enc": 1e-6, "dec": 1e-6},
        "bfloat16_fast_vs_eager": {"enc": 1e-2, "dec": 1e-2},
        "bfloat16_fast_vs_diffusers": {"enc": 1e-2, "dec": 1e-2},
        "fp16_finite": True,
        "fp16_vs_fp32_recon": 1e-2,
    }
    return {
        "triton_kernels": {"fast_path_self_check": "ok", "rms_float32": 1e-7, "attn_bfloat16": 1e-3},
        "correctness_dc-ae-f32c32-in-1.0": ok_model,
        "tiling": {"exact_fp32_psnr_vs_untiled": 120.0, "dec_peak_ratio_exact": 0.2},
        "cuda_graphs_and_compile": {"graph_enc_rel": 0.0, "graph_dec_rel": 0.0, "compiled_dec_rel": 1e-3},
    }


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("correctness_dc-ae-f32c32-in-1.0", "float32_fast_vs_eager", "dec"), 3e-3, "float32_fast_vs_eager.dec"),
        (("correctness_dc-ae-f32c32-in-1.0", "bfloat16_fast_vs_diffusers", "enc"), 0.4, "bfloat16_fast_vs_diffusers"),
        (("correctness_dc-ae-f32c32-in-1.0", "fp16_finite"), False, "fp16_finite"),
        (("correctness_dc-ae-f32c32-in-1.0", "fp16_vs_fp32_recon"), float("nan"), "fp16_vs_fp32_recon"),
        (("tiling", "exact_fp32_psnr_vs_untiled"), 45.0, "exact_fp32_psnr"),
        (("triton_kernels", "rms_float32"), 1e-3, "rms_float32"),
        (("triton_kernels", "fast_path_self_check"), "rms: rel 0.3", "own check"),
        (("cuda_graphs_and_compile", "graph_dec_rel"), 0.5, "graph_dec_rel"),
        (("correctness_dc-ae-f32c32-in-1.0",), {"error": "RuntimeError('x')"}, "raised"),
    ],
)
def test_gpu_gates_name_each_failure(path: tuple, value, expected: str) -> None:
    """The gates pass a good report and name exactly what is wrong in a bad one (the exit code follows)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_gates

    assert gpu_gates.gates(_passing_report(), on_gpu=True) == []
    report = _passing_report()
    node = report
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (failure,) = gpu_gates.gates(report, on_gpu=True)
    assert expected in failure


def test_gpu_goals_ratios_against_the_peer_of_the_same_run() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_gates

    def rec(model, impl, res, enc, dec):
        return {"model": model, "impl": impl, "res": res, "enc_img_s": enc, "dec_img_s": dec}

    records = [rec("dc-ae-f32c32-in-1.0", "dcae", 512, 250.0, 230.0),
               rec("dc-ae-f32c32-in-1.0", "diffusers", 512, 118.0, 121.0),
               rec("dc-ae-f32c32-sana-1.0", "dcae", 512, 300.0, 280.0),
               rec("dc-ae-f32c32-sana-1.0", "dcae-compiled", 512, 310.0, 320.0),
               rec("dc-ae-f32c32-sana-1.0", "diffusers-compiled", 512, 284.0, 187.0)]  # fmt: skip
    rows = {g["goal"]: g for g in gpu_gates.goals({"tiling": {"dec_peak_ratio_exact": 0.5}}, records)}
    enc512 = rows["f32c32-in enc 512 px: dcae vs diffusers eager bf16"]
    assert enc512["status"] == "met" and enc512["ratio"] == round(250 / 118, 3)
    assert rows["f32c32-in dec 512 px: dcae vs diffusers eager bf16"]["status"] == "missed"  # 1.90x < 2x
    assert rows["f32c32-in dec 1024 px: dcae vs diffusers eager bf16"]["status"] == "not measured"
    sana = rows["f32c32-sana dec 512 px: dcae vs diffusers channels-last + compile"]
    assert sana["ratio"] == round(320 / 187, 3) and sana["status"] == "met" and "dcae-compiled" in sana["detail"]
    assert rows["4096 px decode peak memory, exact tiles / untiled"]["status"] == "missed"
