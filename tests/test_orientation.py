"""EXIF orientation: every reader shows an image the way viewers do (Pillow's `ImageOps.exif_transpose` is
the reference), every size is the upright size, and written images carry no orientation tag.

A phone photo is stored sideways with an Orientation tag; its "upright twin" is `exif_transpose` of it saved
as a PNG without EXIF, so the two must give identical results everywhere (PSNR inf between them)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, PngImagePlugin
from test_diffusion_latents import tiny_autoencoder

from dcae.cli import main
from dcae.data.images import decode_image_bytes, image_size, load_image_uint8, save_image, upright
from dcae.data.sources import list_images, read_image
from dcae.models.commands import read_latents

ORIENTATION = 0x0112
H, W = 40, 24  # the upright photo is portrait; stored sideways it is 24 x 40 (h x w) for 5-8
# The stored pixels for orientation o are the upright ones turned by the inverse of o (6 and 8 swap).
INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}
FORMATS = {"jpg": {"quality": 95}, "png": {}, "webp": {"lossless": True}, "tif": {}}


def upright_photo(h: int = H, w: int = W) -> np.ndarray:
    """An asymmetric image: no flip or turn of it equals another."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * y // h, 255 * x // w, (7 * y + 3 * x) % 256], axis=-1).astype(np.int64)
    return np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)


def tagged_bytes(arr: np.ndarray, orientation: int, ext: str = "jpg") -> bytes:
    """`arr` (upright) stored turned, with the EXIF Orientation that shows it upright again."""
    img = Image.fromarray(upright(arr, INVERSE[orientation]))
    exif = img.getexif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF"}[ext]
    img.save(buf, format=fmt, exif=exif, **FORMATS[ext])
    return buf.getvalue()


def write_tagged(path: Path, orientation: int = 6, arr: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tagged_bytes(upright_photo() if arr is None else arr, orientation, path.suffix[1:]))
    return path


def reference(source) -> np.ndarray:
    """What viewers show: Pillow's exif_transpose, then RGB."""
    with Image.open(source) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def write_twin(tagged: Path, path: Path) -> Path:
    """The upright twin: exif_transpose of the tagged file, saved as a PNG without EXIF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(reference(tagged)).save(path)
    return path


def orientation_of(path: Path) -> int | None:
    with Image.open(path) as img:
        return img.getexif().get(ORIENTATION)


# ----------------------------------------------------------------------------------------- the reader
@pytest.mark.parametrize("ext", list(FORMATS))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_is_read_upright(tmp_path, orientation, ext) -> None:
    path = write_tagged(tmp_path / f"phone.{ext}", orientation)
    if ext != "tif":  # Pillow's TIFF reader reports the size already turned; the others the stored size
        with Image.open(path) as img:
            stored = (img.height, img.width)
        assert stored == ((W, H) if orientation >= 5 else (H, W))
    expected = reference(path)
    assert expected.shape[:2] == (H, W)  # the reference shows it upright
    got = load_image_uint8(path)
    np.testing.assert_array_equal(got, expected)
    if ext != "jpg":  # lossless: exactly the upright original
        np.testing.assert_array_equal(got, upright_photo())
    np.testing.assert_array_equal(decode_image_bytes(path.read_bytes(), "phone"), expected)
    assert image_size(path) == (H, W)  # from the header, upright


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_an_invalid_orientation_leaves_the_stored_pixels(tmp_path, orientation) -> None:
    arr = upright_photo()
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[ORIENTATION] = orientation
    img.save(tmp_path / "odd.png", exif=exif)
    np.testing.assert_array_equal(load_image_uint8(tmp_path / "odd.png"), reference(tmp_path / "odd.png"))
    np.testing.assert_array_equal(load_image_uint8(tmp_path / "odd.png"), arr)
    assert image_size(tmp_path / "odd.png") == (H, W)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def test_a_png_with_its_exif_after_the_pixel_data(tmp_path) -> None:
    """Pillow reads an eXIf chunk after IDAT only with the pixels; the header size must still be upright."""
    chunks = _png_chunks(tagged_bytes(upright_photo(), 8, "png"))
    exif = [c for c in chunks if c[0] == b"eXIf"]
    rest = [c for c in chunks if c[0] not in (b"eXIf", b"IEND")]
    path = tmp_path / "late.png"
    path.write_bytes(_png(rest + exif + [(b"IEND", b"")]))
    with Image.open(path) as img:
        assert "exif" not in img.info and img.size == (H, W)  # stored sideways, nothing known before the pixels
    np.testing.assert_array_equal(load_image_uint8(path), reference(path))
    np.testing.assert_array_equal(load_image_uint8(path), upright_photo())
    assert image_size(path) == (H, W)


def test_xmp_orientation_is_applied_like_pillow(tmp_path) -> None:
    arr = upright_photo()
    info = PngImagePlugin.PngInfo()
    xmp = '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    info.add_itxt("XML:com.adobe.xmp", xmp)
    path = tmp_path / "xmp.png"
    Image.fromarray(upright(arr, 8)).save(path, pnginfo=info)
    np.testing.assert_array_equal(reference(path), arr)  # Pillow itself turns it
    np.testing.assert_array_equal(load_image_uint8(path), arr)
    assert image_size(path) == (H, W)


def test_save_image_writes_no_orientation(tmp_path) -> None:
    out = save_image(load_image_uint8(write_tagged(tmp_path / "phone.jpg", 6)), tmp_path / "out.png")
    assert orientation_of(out) is None
    assert Image.open(out).size == (W, H)


# ----------------------------------------------------------------------------------------- the one source
def test_the_image_source_reads_files_and_tar_members_upright(tmp_path) -> None:
    data = tmp_path / "data"
    paths = [write_tagged(data / f"o{o}.jpg", o) for o in range(1, 9)]
    with tarfile.open(data / "shard.tar", "w") as tar:
        for p in paths:
            tar.add(p, arcname=f"member_{p.name}")
    refs = list_images(data)
    assert len(refs) == 16 and {r.kind for r in refs} == {"file", "tar"}
    for ref in refs:
        name = ref.member.removeprefix("member_") if ref.kind == "tar" else ref.name
        got = read_image(ref)
        np.testing.assert_array_equal(got, reference(data / name), err_msg=ref.location)
        assert got.shape[:2] == (H, W)


def test_training_data_sees_the_upright_photo(tmp_path) -> None:
    from dcae.train.data import ImageDataset

    tagged = write_tagged(tmp_path / "a" / "phone.jpg", 6)
    twin = write_twin(tagged, tmp_path / "b" / "phone.png")
    kw = dict(resolution=16, seed=0, crop="center", hflip=0.0)
    x = ImageDataset(list_images(tagged.parent, naming="location"), **kw)[(0, 0, 0)][0]
    y = ImageDataset(list_images(twin.parent, naming="location"), **kw)[(0, 0, 0)][0]
    torch.testing.assert_close(x, y, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random f4c8 DC-AE, tiny enough for CPU tests."""
    path = tmp_path_factory.mktemp("ae") / "tiny"
    tiny_autoencoder().save_pretrained(path)
    return path


@pytest.fixture()
def pair(tmp_path) -> tuple[Path, Path]:
    """A phone photo stored sideways (orientation 6) and its upright twin, in folders of their own."""
    tagged = write_tagged(tmp_path / "tagged" / "photo.jpg", 6)
    return tagged, write_twin(tagged, tmp_path / "twin" / "photo.png")


def test_reconstruct_writes_the_upright_photo_at_its_upright_size(model_dir, pair, tmp_path, capsys) -> None:
    tagged, twin = pair
    for src, out in ((tagged, "rec_a"), (twin, "rec_b")):
        argv = ["reconstruct", str(src), "--model", str(model_dir), "-o", str(tmp_path / out)]
        assert main([*argv, "--json", str(tmp_path / f"{out}.json"), "--device", "cpu"]) == 0, capsys.readouterr()
    a, b = tmp_path / "rec_a" / "photo.png", tmp_path / "rec_b" / "photo.png"
    assert Image.open(a).size == (W, H) and orientation_of(a) is None
    assert orientation_of(tmp_path / "rec_a" / "photo_side_by_side.png") is None
    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    side_a = np.asarray(Image.open(tmp_path / "rec_a" / "photo_side_by_side.png"))
    side_b = np.asarray(Image.open(tmp_path / "rec_b" / "photo_side_by_side.png"))
    np.testing.assert_array_equal(side_a, side_b)  # the original half is the upright photo too
    row_a, row_b = (json.loads((tmp_path / f"{o}.json").read_text())["images"][0] for o in ("rec_a", "rec_b"))
    assert row_a["psnr"] == row_b["psnr"] and row_a["ssim"] == row_b["ssim"]  # against the upright original


def test_encode_decode_round_trips_to_the_upright_size(model_dir, pair, tmp_path, capsys) -> None:
    tagged, twin = pair
    lat = tmp_path / "lat.safetensors"
    assert main(["encode", str(tagged), str(twin), "-o", str(lat), "--model", str(model_dir)]) == 0
    tensors, meta = read_latents(lat)
    assert [(r["height"], r["width"]) for r in meta["images"]] == [(H, W), (H, W)]
    keys = [r["key"] for r in meta["images"]]
    torch.testing.assert_close(tensors[keys[0]], tensors[keys[1]], rtol=1e-5, atol=1e-5)
    out = tmp_path / "dec"
    assert main(["decode", str(lat), "-o", str(out)]) == 0, capsys.readouterr()
    decoded = sorted(out.glob("*.png"))
    assert len(decoded) == 2
    for p in decoded:
        assert Image.open(p).size == (W, H) and orientation_of(p) is None
    diff = np.abs(np.asarray(Image.open(decoded[0]), np.int16) - np.asarray(Image.open(decoded[1]), np.int16))
    assert diff.max() <= 1


def test_metrics_compare_against_the_upright_original(pair, tmp_path, capsys) -> None:
    tagged, twin = pair
    js = tmp_path / "m.json"
    argv = ["metrics", str(twin.parent), str(tagged.parent), "--lpips-net", "none", "--json", str(js)]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0, capsys.readouterr()
    res = json.loads(js.read_text())
    assert res["num_pairs"] == 1 and res["num_skipped"] == 0
    assert res["psnr"] is None  # identical images: PSNR inf
    assert "PSNR: inf" in capsys.readouterr().out


def test_eval_sees_the_upright_photo(model_dir, pair, tmp_path, capsys) -> None:
    tagged, twin = pair
    docs = []
    for folder in (tagged.parent, twin.parent):
        js = tmp_path / f"{folder.name}.json"
        argv = ["eval", "--model", str(model_dir), "--data", str(folder), "--resolution", "16", "--no-fid"]
        argv += ["--lpips-net", "none", "--workers", "0", "--no-progress", "--device", "cpu", "--json", str(js)]
        assert main(argv) == 0, capsys.readouterr()
        docs.append(json.loads(js.read_text()))
    assert docs[0]["num_images"] == 1
    assert docs[0]["psnr"] == docs[1]["psnr"] and docs[0]["ssim"] == docs[1]["ssim"]


def test_latents_encode_the_upright_photo(model_dir, pair, tmp_path, capsys) -> None:
    from dcae.diffusion.c2i.latents import LatentDataset
    from dcae.diffusion.cache import read_index

    tagged, twin = pair
    for folder in (tagged.parent, twin.parent):
        argv = ["latents", "--model", str(model_dir), "--data", str(folder), "-o", str(tmp_path / f"lat_{folder.name}")]
        assert main([*argv, "--resolution", "16", "--workers", "0", "--device", "cpu"]) == 0, capsys.readouterr()
    a, b = (LatentDataset(tmp_path / f"lat_{n}", use_flip=False)[0][0] for n in ("tagged", "twin"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert read_index(tmp_path / "lat_tagged").latent_shape == (8, 4, 4)


def test_fid_statistics_cached_by_the_sideways_reader_are_not_reused(monkeypatch) -> None:
    import dcae.data.images as images
    from dcae.metrics.fid import stats_cache_key

    args = ("/data/x", [("a.jpg", 10, 1.0)], {"resolution": 256, "crop": "adm-center"})
    key = stats_cache_key(*args)
    monkeypatch.setattr(images, "READER_VERSION", "stored-pixels")
    assert stats_cache_key(*args) != key
