"""`dcae models | encode | decode | reconstruct` end to end, on real photos where available."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_models_parity import narrow

from dcae import DCAE
from dcae.cli import main
from dcae.data.images import load_image_uint8
from dcae.models.commands import read_latents


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("m") / "narrow-sana"
    DCAE.from_config(narrow("dc-ae-f32c32-sana-1.1")).save_pretrained(d)
    return d


@pytest.fixture()
def photos(tmp_path, shared_data):
    files = sorted((shared_data / "set5").glob("*.png"))[:3]
    assert files, "set5 is empty"
    return files


def test_models_lists_the_zoo(capsys) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"dc-ae-f32c32-in-1.0", "dc-ae-f64c128-mix-1.0", "dc-ae-1.5-f64c128"} <= names
    assert next(r for r in rows if r["name"] == "dc-ae-f32c32-in-1.0")["scaling_factor"] == "0.3189"


def test_encode_decode_round_trip_on_real_photos(model_dir, photos, tmp_path) -> None:
    lat = tmp_path / "lat.safetensors"
    assert main(["encode", *map(str, photos), "-o", str(lat), "--model", str(model_dir), "--scaled"]) == 0
    tensors, meta = read_latents(lat)
    assert meta["scaled"] and meta["scaling_factor"] == pytest.approx(0.41407)
    assert [r["file"] for r in meta["images"]] == [str(p) for p in photos]
    # the latents equal the library's, scaled
    model = DCAE.from_pretrained(model_dir)
    from dcae.data.images import load_image

    with torch.no_grad():
        z = model.scale_latents(model.encode(load_image(photos[0])[None]))[0]
    torch.testing.assert_close(tensors[meta["images"][0]["key"]], z, rtol=1e-5, atol=1e-5)

    out = tmp_path / "dec"
    assert main(["decode", str(lat), "-o", str(out)]) == 0
    for rec, p in zip(meta["images"], photos):
        arr = load_image_uint8(out / f"{p.stem}.png")
        assert arr.shape[:2] == (rec["height"], rec["width"]) == load_image_uint8(p).shape[:2]

    # refuses to overwrite, both the latents file and decoded images
    assert main(["encode", str(photos[0]), "-o", str(lat), "--model", str(model_dir)]) == 2
    assert main(["decode", str(lat), "-o", str(out)]) == 2
    assert main(["decode", str(lat), "-o", str(out), "--overwrite"]) == 0


def test_reconstruct_writes_images_side_by_sides_and_numbers(model_dir, photos, tmp_path, capsys) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "rec"
    rc = main(
        [
            "reconstruct",
            *map(str, photos),
            str(bad),
            "--model",
            str(model_dir),
            "-o",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 1  # one unreadable file: the others are done, the exit status says something failed
    err = capsys.readouterr().err
    assert "broken.png" in err
    numbers = json.loads((tmp_path / "r.json").read_text())
    assert len(numbers["images"]) == len(photos) and numbers["failed"] == [str(bad)]
    for p, rec in zip(photos, numbers["images"]):
        side = load_image_uint8(out / f"{p.stem}_side_by_side.png")
        h, w = load_image_uint8(p).shape[:2]
        assert side.shape[0] == h + 4 and side.shape[1] == 2 * w + 6
        assert 0 < rec["psnr"] < 60 and -1 <= rec["ssim"] <= 1


def test_reconstruct_is_lossless_for_an_identity_like_check(tmp_path) -> None:
    """PSNR/SSIM printed by reconstruct are the protocol's: a flat image reconstructs to a flat image."""
    img = np.full((64, 64, 3), 128, np.uint8)
    Image.fromarray(img).save(tmp_path / "flat.png")
    from dcae.models.commands import image_psnr_ssim

    psnr, ssim = image_psnr_ssim(img, img.copy())
    assert psnr == float("inf") and ssim == pytest.approx(1.0)
    noisy = np.clip(img.astype(int) + 2, 0, 255).astype(np.uint8)
    assert image_psnr_ssim(img, noisy)[0] == pytest.approx(10 * np.log10(255**2 / 4))


def test_unknown_model_exits_with_a_one_line_error(tmp_path, capsys) -> None:
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    assert (
        main(["encode", str(tmp_path / "a.png"), "-o", str(tmp_path / "l.safetensors"), "--model", "f32c32-inn"]) == 2
    )
    assert "Did you mean" in capsys.readouterr().err


def test_images_smaller_than_the_compression_factor_reconstruct(model_dir, tmp_path, capsys) -> None:
    """1x1 and 5x3 px through an f32 model: padded up, cropped back, written; SSIM is n/a, the exit status 0."""
    rng = np.random.default_rng(0)
    files = []
    for h, w in ((1, 1), (3, 5)):
        files.append(tmp_path / f"tiny_{h}x{w}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    out, js = tmp_path / "rec", tmp_path / "r.json"
    rc = main(["reconstruct", *map(str, files), "--model", str(model_dir), "-o", str(out), "--json", str(js)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for row, (h, w) in zip(json.loads(js.read_text())["images"], ((1, 1), (3, 5))):
        assert load_image_uint8(row["output"]).shape == (h, w, 3)
        assert row["psnr"] > 0 and row["ssim"] is None and f"n/a for a {w}x{h} px image" in row["metric_note"]
    assert "SSIM n/a" in captured.out
