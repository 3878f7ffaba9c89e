"""`dcae eval`, `dcae fid`, `dcae metrics` end to end on a few real photos.

The autoencoders are tiny and randomly initialised (there are no pretrained weights offline): these
tests check the pipeline, not model quality. LPIPS and FID always use the real shipped weights.
"""

from __future__ import annotations

import csv
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcae.cli import main

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SET14 = ["baboon.png", "bridge.png", "comic.png", "face.png", "foreman.png"]  # bridge is grayscale


def _need(folder: str) -> Path:
    path = DATA / folder
    if not path.is_dir():
        pytest.skip(f"real test images not found at {path} (shared data folder missing)")
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """5 real photos (one grayscale, one made RGBA) and one corrupt file."""
    src = _need("set14")
    folder = tmp_path_factory.mktemp("photos")
    for name in SET14:
        shutil.copy(src / name, folder / name)
    rgba = Image.open(src / "zebra.png").convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "zebra_rgba.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A tiny diffusers AutoencoderKL folder and a tiny DC-AE folder, both randomly initialised."""
    from diffusers import AutoencoderKL

    from dcae.models import DCAE, DCAEConfig

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    kl = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    kl.save_pretrained(root / "kl")
    cfg = DCAEConfig(
        name="tiny",
        latent_channels=8,
        encoder_widths=(16, 32, 64),
        encoder_depths=(0, 1, 1),
        encoder_block_types=("ResBlock", "ResBlock", "EViTGLU"),
        decoder_widths=(16, 32, 64),
        decoder_depths=(0, 1, 1),
        decoder_block_types=("ResBlock", "ResBlock", "EViTGLU"),
        decoder_norms=("bn2d", "bn2d", "trms2d"),
        decoder_acts=("relu", "relu", "silu"),
    )
    DCAE.from_config(cfg).save_pretrained(root / "dcae")
    return {"kl": f"diffusers:{root / 'kl'}", "dcae": str(root / "dcae")}


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


EVAL_KEYS = {
    "model",
    "num_images",
    "psnr",
    "ssim",
    "lpips",
    "lpips_net",
    "fid",
    "fid_method",
    "latent_mean",
    "latent_rms",
    "implied_scaling_factor",
    "images_per_s",
    "ae_images_per_s",
    "num_skipped",
    "skipped",
    "worst",
    "best",
}


def test_eval_two_models_end_to_end(photos, models, tmp_path, capsys):
    out, js, cache = tmp_path / "out", tmp_path / "r.json", tmp_path / "cache"
    argv = ["eval", "--model", models["kl"], "--model", models["dcae"], "--data", photos, "--resolution", 64]
    argv += ["--batch-size", 2, "--workers", 0, "--out", out, "--json", js, "--fid-cache", cache, "--no-progress"]
    rc, stdout, stderr = _run(capsys, *argv)
    assert rc == 0, stderr
    doc = json.loads(js.read_text())
    assert json.loads((out / "results.json").read_text()) == doc
    entries = doc["models"]
    assert [e["model"] for e in entries] == [models["kl"], models["dcae"]]
    for e in entries:
        assert set(e) >= EVAL_KEYS, EVAL_KEYS - set(e)
        assert all(k == k.lower() for k in e)
        assert e["num_images"] == 6 and e["num_skipped"] == 1  # grayscale and RGBA read, the corrupt file skipped
        assert "broken.png" in e["skipped"][0]["error"]
        assert e["lpips_net"] == "stlpips-alex"
        assert e["fid"] > 0 and 0 < e["psnr"] < 40 and -1 < e["ssim"] < 1 and e["lpips"] > 0
        assert e["implied_scaling_factor"] == pytest.approx(1 / e["latent_rms"])
        assert "FID from 6 images" in e["fid_warning"]
        rows = _csv_rows(Path(e["per_image_csv"]))
        assert len(rows) == 6 and {"name", "psnr", "ssim", "lpips"} <= set(rows[0])
        assert np.mean([float(r["psnr"]) for r in rows]) == pytest.approx(e["psnr"], abs=1e-5)
        assert e["worst"][0]["psnr"] == pytest.approx(min(float(r["psnr"]) for r in rows), abs=1e-5)
        png = Image.open(e["extremes_png"])
        assert png.size[0] > 4 * 64 and png.size[1] > 4 * 64  # 4 rows of 4 tiles
    assert entries[0]["spatial_compression"] == 2 and entries[1]["spatial_compression"] == 4
    table = (out / "results.md").read_text()
    assert table.count("| diffusers:") == 1 and f"| {models['dcae']} |" in table
    assert "| model | images | rFID |" in stdout
    assert "skipped 1 of 7" in stderr and "FID from 6 images" in stderr

    # Second run: reference statistics come from the cache and give the same FID.
    rc, _, stderr = _run(capsys, *argv[:3], *argv[5:], "--overwrite")  # the first model only
    assert rc == 0 and "using cached reference statistics" in stderr
    again = json.loads(js.read_text())
    assert again["fid"] == pytest.approx(entries[0]["fid"], rel=1e-9)
    assert again["psnr"] == entries[0]["psnr"]


def test_eval_refuses_to_overwrite(photos, models, tmp_path, capsys):
    js = tmp_path / "r.json"
    js.write_text("{}")
    rc, _, err = _run(capsys, "eval", "--model", models["dcae"], "--data", photos, "--json", js, "--no-progress")
    assert rc == 2 and "already exists" in err


def test_eval_result_does_not_depend_on_batch_size_or_workers(photos, models):
    from dcae.metrics.data import collect_images
    from dcae.metrics.lpips import LPIPS
    from dcae.metrics.reconstruction import EvalSettings, evaluate_reconstruction, load_autoencoder

    refs = collect_images(photos)
    model = load_autoencoder(models["dcae"])
    lpips = LPIPS("alex")
    runs = [
        evaluate_reconstruction(model, refs, EvalSettings(64, bs, workers, progress=False), lpips=lpips)
        for bs, workers in ((1, 0), (4, 2))
    ]
    a, b = runs
    assert [r["name"] for r in a.per_image] == [r["name"] for r in b.per_image]
    for ra, rb in zip(a.per_image, b.per_image):
        assert ra["psnr"] == pytest.approx(rb["psnr"], abs=1e-4)  # the model itself may differ ~1e-6 by batch
        assert ra["ssim"] == pytest.approx(rb["ssim"], abs=1e-5)
        assert ra["lpips"] == pytest.approx(rb["lpips"], abs=1e-5)
    for key in ("psnr", "ssim", "lpips", "latent_rms"):
        assert a.summary[key] == pytest.approx(b.summary[key], rel=1e-5, abs=1e-5), key
    assert len(a.skipped) == len(b.skipped) == 1


def test_eval_reads_tar_shards_like_folders(photos, models, tmp_path, capsys):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    names = sorted(p.name for p in photos.iterdir())
    for k, chunk in enumerate((names[:3], names[3:])):
        with tarfile.open(shard_dir / f"shard-{k:03d}.tar", "w") as tar:
            for name in chunk:
                tar.add(photos / name, arcname=f"{Path(name).stem}.png")
            tar.add(photos / names[0], arcname=f"{Path(names[0]).stem}.json")  # not an image: ignored
    common = [
        "--model",
        models["dcae"],
        "--resolution",
        64,
        "--no-fid",
        "--lpips-net",
        "none",
        "--no-progress",
        "--workers",
        0,
    ]
    rc, _, err = _run(
        capsys, "eval", *common, "--data", f"{shard_dir}/shard-{{000..001}}.tar", "--out", tmp_path / "tar"
    )
    assert rc == 0, err
    rc, _, err = _run(capsys, "eval", *common, "--data", photos, "--out", tmp_path / "dir")
    assert rc == 0, err
    tar_rows = _csv_rows(next((tmp_path / "tar").glob("per_image_*.csv")))
    dir_rows = _csv_rows(next((tmp_path / "dir").glob("per_image_*.csv")))
    assert len(tar_rows) == len(dir_rows) == 6
    assert tar_rows[0]["name"].startswith("shard-000.tar/")
    assert sorted(r["psnr"] for r in tar_rows) == sorted(r["psnr"] for r in dir_rows)
    res = json.loads((tmp_path / "tar" / "results.json").read_text())
    assert "fid" not in res and "lpips" not in res and res["num_skipped"] == 1


@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_eval_bad_data_folder_is_a_clear_error(models, tmp_path, capsys, kind):
    folder = tmp_path / "imgs"
    if kind == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("no images here")
    rc, _, err = _run(capsys, "eval", "--model", models["dcae"], "--data", folder, "--no-progress")
    assert rc == 2
    assert ("no images found" if kind == "empty" else "does not exist") in err


def test_fid_command_folders_npz_and_cache(tmp_path, capsys):
    src = _need("imagenet-samples")
    names = sorted(p.name for p in src.iterdir())
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, chunk in ((a, names[:4]), (b, names[500:504])):
        folder.mkdir()
        for name in chunk:
            (folder / name).symlink_to(src / name)
    common = ["--resolution", 64, "--workers", 0, "--no-progress", "--fid-cache", tmp_path / "cache"]
    rc, out, err = _run(capsys, "fid", a, b, "--json", tmp_path / "f.json", "--save-stats", tmp_path / "a.npz", *common)
    assert rc == 0, err
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["fid"] > 0 and res["num_images_a"] == res["num_images_b"] == 4
    assert res["fid_method"] == "lowrank" and "FID from 4 images" in err
    assert f"FID: {res['fid']:.4f}" in out
    with np.load(tmp_path / "a.npz") as stats:
        assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    # the saved statistics stand in for folder A
    rc, _, err = _run(capsys, "fid", tmp_path / "a.npz", b, "--json", tmp_path / "g.json", *common)
    assert rc == 0, err
    assert json.loads((tmp_path / "g.json").read_text())["fid"] == pytest.approx(res["fid"], rel=1e-9)
    rc, out, err = _run(capsys, "fid", a, a, *common)
    assert rc == 0 and abs(float(out.split()[-1])) < 1e-3  # a set with itself


def test_metrics_command_pairs_by_name(photos, tmp_path, capsys):
    ref, test = tmp_path / "ref", tmp_path / "test"
    ref.mkdir()
    test.mkdir()
    for name in ["baboon.png", "face.png", "comic.png", "foreman.png"]:
        shutil.copy(photos / name, ref / name)
    for name, quality in (("baboon", 30), ("face", 90)):  # reconstructions saved as JPEG: pair by stem
        Image.open(photos / f"{name}.png").convert("RGB").save(test / f"{name}.jpg", quality=quality)
    Image.open(photos / "comic.png").resize((100, 100)).save(test / "comic.png")  # size mismatch: skipped
    shutil.copy(photos / "bridge.png", test / "extra.png")  # no partner
    rc, out, err = _run(
        capsys, "metrics", ref, test, "--json", tmp_path / "m.json", "--csv", tmp_path / "m.csv", "--no-progress"
    )
    assert rc == 0, err
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["num_pairs"] == 2 and res["num_skipped"] == 1
    assert res["unmatched_ref"] == 1 and res["unmatched_test"] == 1
    assert res["lpips_net"] == "stlpips-alex"
    rows = {r["name"]: r for r in _csv_rows(tmp_path / "m.csv")}
    # JPEG quality 30 is worse than 90 on every metric
    assert float(rows["baboon.png"]["psnr"]) < float(rows["face.png"]["psnr"])
    assert float(rows["baboon.png"]["lpips"]) > float(rows["face.png"]["lpips"])
    assert "sizes differ" in res["skipped"][0]["error"]
    assert "pairs: 2" in out
    rc, out, err = _run(capsys, "metrics", ref, test, "--resolution", 64, "--lpips-net", "none", "--no-progress")
    assert rc == 0 and "pairs: 3" in out  # center-cropped to one size, the resized file pairs too


def test_standard_lpips_without_backbone_is_a_clear_error(photos, models, capsys, tmp_path, monkeypatch):
    from dcae.metrics import weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache, and a download that cannot connect
    monkeypatch.setitem(weights.TORCHVISION_BACKBONES, "alex", "http://127.0.0.1:9/alexnet-owt-7be5be79.pth")
    rc, _, err = _run(capsys, "eval", "--model", models["dcae"], "--data", photos, "--lpips-net", "lpips-alex",
                      "--no-fid", "--no-progress")  # fmt: skip
    assert rc == 2 and "--lpips-backbone" in err and "stlpips" in err


@pytest.mark.slow
def test_eval_on_two_processes_equals_one(photos, models, tmp_path, capsys):
    """`torchrun -m dcae.cli eval`: each process takes every other image; the report (metrics, rFID from the
    gathered features, per-image rows in file order, skipped files, extremes) equals the 1-process one."""
    import os
    import subprocess

    from test_train_helpers import torchrun_dcae

    common = ["eval", "--model", models["dcae"], "--data", str(photos), "--resolution", "64", "--batch-size", "2",
              "--no-fid-cache", "--no-progress"]  # fmt: skip
    rc, _, err = _run(capsys, *common, "--out", tmp_path / "one")
    assert rc == 0, err
    cmd = [*torchrun_dcae(), *common, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("| model | images | rFID |") == 1  # one report, from the first process
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["num_images"] == one["num_images"] == 6 and two["skipped"] == one["skipped"]
    for key in ("psnr", "ssim", "lpips", "fid", "latent_mean", "latent_rms"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    assert two["fid_method"] == one["fid_method"] == "lowrank"  # the features of both processes were gathered
    assert [r["name"] for r in two["worst"]] == [r["name"] for r in one["worst"]]
    rows_one, rows_two = _csv_rows(Path(one["per_image_csv"])), _csv_rows(Path(two["per_image_csv"]))
    assert [r["name"] for r in rows_two] == [r["name"] for r in rows_one]
    for a, b in zip(rows_one, rows_two):
        assert float(b["psnr"]) == pytest.approx(float(a["psnr"]), abs=1e-4)


@pytest.mark.slow
def test_eval_compiled_matches_eager(photos, models, tmp_path, capsys):
    """`dcae eval --compile` runs the DC-AE through torch.compile and reports the eager numbers."""
    from torch._dynamo.utils import counters

    common = ["eval", "--model", models["dcae"], "--data", photos, "--resolution", 64, "--no-fid", "--lpips-net",
              "none", "--no-progress"]  # fmt: skip
    rc, _, err = _run(capsys, *common, "--json", tmp_path / "eager.json")
    assert rc == 0, err
    counters.clear()
    rc, _, err = _run(capsys, *common, "--json", tmp_path / "compiled.json", "--compile")
    assert rc == 0, err
    assert counters["stats"]["unique_graphs"] >= 1
    eager, compiled = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("eager", "compiled"))
    assert compiled["psnr"] == pytest.approx(eager["psnr"], abs=1e-3)
    assert compiled["ssim"] == pytest.approx(eager["ssim"], abs=1e-4)
