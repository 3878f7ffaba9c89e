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
    table = out.with_suffix(".md").read_text()
    assert "time vs diffusers" in table and "dcae bench ae" in table
    assert "| dcae |" in capsys.readouterr().out


def test_bench_ae_batch_count_must_match(tiny_config: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "ae", "--models", str(tiny_config), "--res", "64", "128", "--batch", "1", "2", "3"]
    assert cli_main(argv + ["--device", "cpu"]) == 2
    assert "--batch" in capsys.readouterr().err
