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


def test_bench_ae_batch_count_must_match(tiny_config: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "ae", "--models", str(tiny_config), "--res", "64", "128", "--batch", "1", "2", "3"]
    assert cli_main(argv + ["--device", "cpu"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_gpu_check_dry_run(tmp_path: Path, tiny_config: Path) -> None:
    """The one-shot GPU script must not break on its single run: rehearse every section on the CPU."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--dry-run", str(tiny_config)]
    proc = subprocess.run(cmd + ["--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = tmp_path.glob("gpu_check_cpu-dry-run_*.json")
    sections = json.loads(report.read_text())["sections"]
    errors = {k: v for k, v in sections.items() if "error" in k or (isinstance(v, dict) and "error" in v)}
    assert not errors, errors
    model = sections["correctness_dc-ae-f32c32-in-1.0"]
    assert model["float32_fast_vs_eager"]["dec"] < 1e-5 and model["float32_fast_vs_diffusers"]["enc"] < 1e-5
    assert sections["tiling"]["exact_2048_psnr_vs_untiled_random_weights"] > 100
    prof = sections["profile"]["dc-ae-f32c32-in-1.0"]
    assert prof["dcae_dec_peak_fraction"] > 0 and prof["diffusers_enc_peak_fraction"] > 0
    assert prof["dcae_dec_top_ops"][0]["ms"] > 0
    variants = sections["fast_path_variants"]["dc-ae-f32c32-in-1.0"]
    assert {"default", "cudnn_benchmark", "no_triton", "channels_last_weights"} <= set(variants)
    assert all(v["enc_img_s"] > 0 and v["dec_img_s"] > 0 for v in variants.values())
    assert [r["setting"] for r in sections["diffusion_throughput"]] == ["sd-vae-f8-p2", "dc-ae-f32-p1", "dc-ae-f64-p1"]
    records = json.loads(next(tmp_path.glob("ae_gpu_cpu-dry-run_*.json")).read_text())
    assert {r["impl"] for r in records} == {"dcae", "diffusers"} and all(set(r) >= KEYS for r in records)
