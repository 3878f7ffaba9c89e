"""`dcae bench diffusion`: one run measures the same transformer on f8-p2, f32-p1 and f64-p1 latents."""

from __future__ import annotations

import json

from dcae.cli import main as cli


def test_bench_cli_records_and_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "diffusion",
        "--model",
        "DiT-S",
        "--depth",
        "1",
        "--batch",
        "1",
        "--warmup",
        "0",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    assert cli(args) == 0
    records = json.loads(out.read_text())
    assert [r["setting"] for r in records] == ["sd-vae-f8-p2", "dc-ae-f32-p1", "dc-ae-f64-p1"]
    assert [r["tokens"] for r in records[:3]] == [1024, 256, 64]
    for r in records:
        assert {"setting", "tokens", "batch", "train_img_s", "infer_img_s", "model", "device", "dtype"} <= set(r)
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0 and r["device"] == "cpu" and r["dtype"] == "float32"
    f8, f64 = records[0], records[2]
    assert f8["train_ratio_vs_f8"] == 1.0 and f8["infer_ratio_vs_f8"] == 1.0
    # 16x fewer tokens: far fewer FLOPs per image, and faster in practice
    assert f64["fwd_gflops_per_img"] < f8["fwd_gflops_per_img"] / 8
    assert f64["infer_img_s"] > f8["infer_img_s"]
    assert "| DiT-S" in capsys.readouterr().out
