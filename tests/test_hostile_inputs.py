"""Hostile and odd input files through `dcae reconstruct`, `dcae encode` and `dcae eval`.

Every file of the corpus is generated here: empty, truncated, text named .jpg, a PNG whose header
claims 100000 x 100000 px, 1x1 and 5x3 px, CMYK JPEG, palette PNG, 16-bit grayscale, animated GIF,
WebP, TIFF, a folder named like an image, and (slow tests) a 3072 x 2048 16-bit RGB scan. Each readable
image must get its output, each unreadable one a single line naming it, the exit status must be
non-zero only because of the unreadable ones, and there must be no traceback.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcae.cli import main
from dcae.data.images import ImageReadError, image_size, load_image_uint8
from dcae.models import DCAE, DCAEConfig
from dcae.models.commands import read_latents

READABLE = {  # file -> (height, width) as read
    "ok.png": (48, 64),
    "one_px.png": (1, 1),
    "five_by_three.png": (3, 5),
    "cmyk.jpg": (48, 64),
    "palette.png": (48, 64),
    "gray16.png": (40, 56),
    "anim.gif": (32, 40),
    "photo.webp": (48, 64),
    "photo.tif": (48, 64),
    "strip.png": (1, 20000),
}
UNREADABLE = ["bomb.png", "nan_float.tif", "text.jpg", "truncated.jpg", "zero.jpg"]


# ----------------------------------------------------------------------------- the corpus
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG from raw scanlines (each row starts with its filter byte), written by hand so that the
    header can claim anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw, 1))
        + _png_chunk(b"IEND", b"")
    )


def rgb16_png(width: int, height: int) -> bytes:
    """16-bit RGB gradients (Pillow cannot write 16-bit RGB itself)."""
    y = np.linspace(0, 65535, height)[:, None] * np.ones((1, width))
    x = np.linspace(0, 65535, width)[None, :] * np.ones((height, 1))
    rgb = np.stack([x, y, (x + y) / 2], -1).astype(">u2")
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1).view(np.uint8)], axis=1)
    return png_bytes(width, height, 16, 2, rows.tobytes())


def make_corpus(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(photo).save(d / "ok.png")
    Image.fromarray(photo[:1, :1]).save(d / "one_px.png")
    Image.fromarray(photo[:3, :5]).save(d / "five_by_three.png")
    Image.fromarray(photo).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(photo).convert("P").save(d / "palette.png")
    Image.fromarray(rng.integers(0, 65536, (40, 56)).astype(np.uint16)).save(d / "gray16.png")
    frames = [Image.fromarray(np.full((32, 40, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(photo).save(d / "photo.webp")
    Image.fromarray(photo).save(d / "photo.tif")
    Image.fromarray(rng.integers(0, 256, (1, 20000, 3), dtype=np.uint8)).save(d / "strip.png")
    (d / "zero.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(photo).save(jpeg, "JPEG")
    (d / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "bomb.png").write_bytes(png_bytes(100_000, 100_000, 8, 2, b"\x00" * 301))
    nan = np.linspace(0, 1, 24 * 32, dtype=np.float32).reshape(24, 32)
    nan[3, 4] = np.nan
    Image.fromarray(nan).save(d / "nan_float.tif")  # a 32-bit float image with a NaN pixel
    (d / "dir.png").mkdir()
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("hostile"))


def tiny_config() -> DCAEConfig:
    """f4c8 with one stage at 1/4 resolution: cheap even on a 3072 x 2048 image."""
    return DCAEConfig(
        name="tiny-f4",
        latent_channels=8,
        encoder_widths=(8, 16, 32),
        encoder_depths=(0, 0, 1),
        encoder_block_types=("ResBlock",) * 3,
        decoder_widths=(8, 16, 32),
        decoder_depths=(0, 0, 1),
        decoder_block_types=("ResBlock",) * 3,
        decoder_norms=("bn2d",) * 3,
        decoder_acts=("relu",) * 3,
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model") / "tiny"
    DCAE.from_config(tiny_config()).save_pretrained(d)
    return d


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _lines_naming(err: str, name: str) -> list[str]:
    return [line for line in err.splitlines() if name in line]


def _assert_each_unreadable_named_once(err: str) -> None:
    assert "Traceback" not in err
    for name in UNREADABLE:
        lines = _lines_naming(err, name)
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("dcae: cannot read image"), lines[0]


# ----------------------------------------------------------------------------- reading
def test_every_odd_file_reads_or_fails_with_its_name(corpus) -> None:
    for name, (h, w) in READABLE.items():
        arr = load_image_uint8(corpus / name)
        assert arr.shape == (h, w, 3) and arr.dtype == np.uint8, name
        assert image_size(corpus / name) == (h, w)
    expected = {
        "bomb.png": "10000000000 pixels is more than the limit",
        "text.jpg": "not an image format",
        "truncated.jpg": "truncated",
        "zero.jpg": "empty (0 bytes)",
        "dir.png": "it is a folder, not an image file",
        "nan_float.tif": "1 of its 768 pixels are NaN/Inf",
    }
    for name, words in expected.items():
        with pytest.raises(ImageReadError, match=re.escape(words)) as info:
            load_image_uint8(corpus / name)
        assert str(corpus / name) in str(info.value) and "\n" not in str(info.value)
    assert load_image_uint8(corpus / "anim.gif").max() == 10  # the first frame
    gray = np.asarray(Image.open(corpus / "gray16.png"), dtype=np.float64)
    assert load_image_uint8(corpus / "gray16.png")[..., 0] == pytest.approx(gray / 65535 * 255, abs=0.51)


def test_pixel_limit_is_checked_on_the_header(corpus, tmp_path, monkeypatch) -> None:
    """Above the limit but below Pillow's own hard limit, the project refuses by the header's size too."""
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(10_000, 10_000, 8, 0, b"\x00" * 10_001))  # 100 MP claimed, 10 kB of data
    with pytest.raises(ImageReadError, match="10000x10000 px is more than the limit of 89478485 pixels"):
        load_image_uint8(big)
    monkeypatch.setenv("DCAE_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageReadError, match="64x48 px is more than the limit of 1000 pixels"):
        image_size(corpus / "ok.png")


CROP_UNDER_MEMORY_LIMIT = """
import resource, sys
import numpy as np
from dcae.data.images import center_crop_arr
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))  # 1 GiB more
print(center_crop_arr(np.zeros((1, 100_000, 3), np.uint8), 256).shape)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to cap the address space")
def test_center_crop_of_a_long_strip_stays_small() -> None:
    """The eval crop of a 1 x 100000 px strip would resize all of it first (to 256 x 25.6 million px,
    20 GB): under a 1 GiB cap on new memory it must still work, by cutting the strip's centre first."""
    proc = subprocess.run([sys.executable, "-c", CROP_UNDER_MEMORY_LIMIT], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "(256, 256, 3)", proc.stderr[-2000:]
    from dcae.data.images import center_crop_arr

    photo = np.random.default_rng(1).integers(0, 256, (100, 1500, 3), dtype=np.uint8)  # aspect 15: as before
    img = Image.fromarray(photo).resize((3840, 256), resample=Image.BICUBIC)
    assert (center_crop_arr(photo, 256) == np.asarray(img)[:, 1792:2048]).all()


# ----------------------------------------------------------------------------- reconstruct
def test_reconstruct_the_corpus(corpus, tiny_model, tmp_path, capsys) -> None:
    out, js = tmp_path / "rec", tmp_path / "r.json"
    rc, stdout, err = _run(capsys, "reconstruct", corpus, "--model", tiny_model, "-o", out, "--json", js)
    assert rc == 1  # only because of the unreadable files
    _assert_each_unreadable_named_once(err)
    doc = json.loads(js.read_text())
    assert sorted(Path(f).name for f in doc["failed"]) == sorted(UNREADABLE)
    rows = {Path(r["file"]).name: r for r in doc["images"]}
    assert set(rows) == set(READABLE)
    for name, (h, w) in READABLE.items():
        assert load_image_uint8(rows[name]["output"]).shape[:2] == (h, w), name
        assert load_image_uint8(rows[name]["side_by_side"]).shape[:2] == (h + 4, 2 * w + 6), name
    # same stem, two formats: two outputs
    assert {Path(rows[n]["output"]).name for n in ("photo.webp", "photo.tif")} == {"photo_webp.png", "photo_tif.png"}
    # smaller than SSIM's window: written, SSIM n/a with the reason, the run goes on
    for name in ("one_px.png", "five_by_three.png"):
        assert rows[name]["ssim"] is None and "n/a" in rows[name]["metric_note"]
        assert f"{corpus / name}: PSNR" in stdout
    assert rows["ok.png"]["psnr"] > 0 and -1 <= rows["ok.png"]["ssim"] <= 1
    side = load_image_uint8(rows["anim.gif"]["side_by_side"])
    assert (side[2:34, 2:42] == 10).all()  # the GIF's first frame is what was reconstructed
    # the uint8 side-by-side is the float grid's layout and pixels
    from dcae.data.images import load_image, make_grid, save_image

    rec = load_image(rows["ok.png"]["output"])
    save_image(make_grid([load_image(corpus / "ok.png"), rec], nrow=2), tmp_path / "grid.png")
    assert (load_image_uint8(rows["ok.png"]["side_by_side"]) == load_image_uint8(tmp_path / "grid.png")).all()


def test_reconstruct_only_readable_files_exits_zero(corpus, tiny_model, tmp_path, capsys) -> None:
    files = [corpus / n for n in READABLE]
    rc, _, err = _run(capsys, "reconstruct", *files, "--model", tiny_model, "-o", tmp_path / "rec")
    assert rc == 0, err
    assert len(list((tmp_path / "rec").glob("*_side_by_side.png"))) == len(READABLE)


def test_folder_named_like_an_image(corpus, tiny_model, tmp_path, capsys) -> None:
    rc, _, err = _run(capsys, "reconstruct", corpus / "dir.png", "--model", tiny_model, "-o", tmp_path / "rec")
    assert rc == 2 and "no image files in the folder" in err and "no input images" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_a_fifo_named_like_an_image_is_refused_not_read(corpus, tiny_model, tmp_path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: the reader must refuse it by its file type.
    Run in a subprocess with a timeout, so that a regression fails instead of hanging the suite."""
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "pipe.png")
    (data / "ok.png").write_bytes((corpus / "palette.png").read_bytes())
    argv = ["-m", "dcae.cli", "encode", str(data / "pipe.png"), str(data / "ok.png"), "--model", str(tiny_model),
            "-o", str(tmp_path / "z.safetensors")]  # fmt: skip
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "pipe.png" in ln]
    assert "special file" in line
    assert (tmp_path / "z.safetensors").is_file()  # the readable image still got its latent


def test_reconstruct_refuses_existing_outputs_before_any_work(corpus, tiny_model, tmp_path, capsys) -> None:
    out = tmp_path / "rec"
    out.mkdir()
    (out / "palette_side_by_side.png").write_bytes(b"mine")
    rc, stdout, err = _run(capsys, "reconstruct", corpus, "--model", tiny_model, "-o", out)
    assert rc == 2 and "palette_side_by_side.png already exists" in err
    assert "PSNR" not in stdout and sorted(p.name for p in out.iterdir()) == ["palette_side_by_side.png"]


def test_a_failing_metric_costs_only_that_number(corpus, tiny_model, tmp_path, capsys, monkeypatch) -> None:
    """Metrics come after the outputs: one that fails (injected: a MemoryError on the largest image)
    leaves that image's files written and its numbers null with the reason; the exit status stays 0."""
    import dcae.models.commands

    real = dcae.models.commands.image_psnr_ssim

    def failing(a, b):
        if a.shape[:2] == (48, 64):
            raise MemoryError("cannot allocate the SSIM window")
        return real(a, b)

    monkeypatch.setattr(dcae.models.commands, "image_psnr_ssim", failing)
    out, js = tmp_path / "rec", tmp_path / "r.json"
    files = [corpus / n for n in ("ok.png", "gray16.png")]
    rc, _, err = _run(capsys, "reconstruct", *files, "--model", tiny_model, "-o", out, "--json", js)
    assert rc == 0, err
    assert err.count("metrics failed: MemoryError: cannot allocate the SSIM window") == 1 and str(files[0]) in err
    rows = {Path(r["file"]).name: r for r in json.loads(js.read_text())["images"]}
    assert rows["ok.png"]["psnr"] is None and "MemoryError" in rows["ok.png"]["metric_note"]
    assert Path(rows["ok.png"]["output"]).is_file() and Path(rows["ok.png"]["side_by_side"]).is_file()
    assert rows["gray16.png"]["psnr"] > 0


# ----------------------------------------------------------------------------- encode / decode
def test_encode_and_decode_the_corpus(corpus, tiny_model, tmp_path, capsys) -> None:
    lat = tmp_path / "lat.safetensors"
    rc, _, err = _run(capsys, "encode", corpus, "--model", tiny_model, "-o", lat)
    assert rc == 1
    _assert_each_unreadable_named_once(err)
    tensors, meta = read_latents(lat)
    files = [Path(r["file"]).name for r in meta["images"]]
    assert files == sorted(READABLE)  # input order (find_images sorts), not grouped by size
    for rec in meta["images"]:
        h, w = READABLE[Path(rec["file"]).name]
        assert (rec["height"], rec["width"]) == (h, w)
        assert tensors[rec["key"]].shape == (8, -(-h // 4), -(-w // 4))  # padded up to the compression factor
    rc, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "dec")
    assert rc == 0, err
    for name, (h, w) in READABLE.items():
        stem = Path(name).stem if name not in ("photo.webp", "photo.tif") else name.replace(".", "_")
        assert load_image_uint8(tmp_path / "dec" / f"{stem}.png").shape[:2] == (h, w), name


@pytest.mark.parametrize(
    "meta", ["{not json", '{"images": [{"key": "latent_000000"}]}', '{"images": 3}', '{"scaled": true, "images": []}']
)
def test_decode_of_damaged_latent_metadata_is_one_line(tmp_path, capsys, meta) -> None:
    from safetensors.torch import save_file

    lat = tmp_path / "lat.safetensors"
    save_file({"latent_000000": torch.zeros(8, 2, 2)}, str(lat), metadata={"dcae": meta})
    rc, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "dec", "--model", "unused")
    assert rc == 2 and err.startswith(f"dcae: error: {lat}: damaged dcae metadata") and err.count("\n") == 1


def test_encode_failure_on_one_size_costs_only_those_images(corpus, tiny_model, tmp_path, capsys, monkeypatch):
    """A model call that fails for one input size (injected: the real failures are out-of-memory and
    unsupported shapes) loses that image only; one that fails for whole batches is retried image by image."""
    real = DCAE._encode_once

    def failing(self, x):
        if x.shape[-2:] == (4, 4) or x.shape[0] > 1:  # the 1x1 image, padded; and any batch of two or more
            raise RuntimeError(f"cannot encode input of shape {tuple(x.shape)}\nsecond line")
        return real(self, x)

    monkeypatch.setattr(DCAE, "_encode_once", failing)
    lat = tmp_path / "lat.safetensors"
    rc, _, err = _run(capsys, "encode", *[corpus / n for n in READABLE], "--model", tiny_model, "-o", lat)
    assert rc == 1 and "Traceback" not in err and "second line" not in err
    lines = _lines_naming(err, "encode failed")
    assert len(lines) == 1 and "one_px.png" in lines[0] and "RuntimeError: cannot encode" in lines[0]
    _, meta = read_latents(lat)
    assert sorted(Path(r["file"]).name for r in meta["images"]) == sorted(set(READABLE) - {"one_px.png"})


# ----------------------------------------------------------------------------- eval
def test_eval_the_corpus(corpus, tiny_model, tmp_path, capsys) -> None:
    js = tmp_path / "e.json"
    argv = ["eval", "--model", tiny_model, "--data", corpus, "--resolution", 32, "--no-fid", "--lpips-net", "none"]
    rc, _, err = _run(capsys, *argv, "--workers", 0, "--no-progress", "--json", js)
    assert rc == 0, err  # eval reports skipped files in its results and still measures the rest
    assert "Traceback" not in err
    doc = json.loads(js.read_text())
    assert doc["num_images"] == len(READABLE) and doc["num_skipped"] == len(UNREADABLE)
    assert sorted(s["name"] for s in doc["skipped"]) == sorted(UNREADABLE)
    for item in doc["skipped"]:
        assert item["name"] in item["error"]
    assert f"skipped {len(UNREADABLE)} of {len(READABLE) + len(UNREADABLE)} file(s)" in err


def test_eval_model_failures_are_skipped_by_file(corpus, tiny_model, tmp_path, capsys, monkeypatch) -> None:
    """A model call that fails for batches (injected, like running out of memory) is retried image by
    image; images it fails on alone (here: flat ones) are skipped with the reason, the rest measured."""
    real = DCAE._encode_once

    def failing(self, x):
        if x.shape[0] > 1 or bool((x.amax(dim=(-2, -1)) == x.amin(dim=(-2, -1))).all()):  # flat channels
            raise RuntimeError("out of memory (injected)")
        return real(self, x)

    monkeypatch.setattr(DCAE, "_encode_once", failing)
    js = tmp_path / "e.json"
    argv = ["eval", "--model", tiny_model, "--data", corpus, "--resolution", 32, "--no-fid", "--lpips-net", "none"]
    rc, _, err = _run(capsys, *argv, "--batch-size", 4, "--workers", 0, "--no-progress", "--json", js)
    assert rc == 0 and "Traceback" not in err
    doc = json.loads(js.read_text())
    flat = {"anim.gif", "one_px.png"}  # a constant frame; one pixel scaled up
    assert sorted(s["name"] for s in doc["skipped"]) == sorted(UNREADABLE + list(flat))
    failed = [s for s in doc["skipped"] if s["name"] in flat]
    assert all(
        s["error"].startswith(f"{s['name']}: reconstruction failed (RuntimeError: out of memory") for s in failed
    )
    assert doc["num_images"] == len(READABLE) - len(flat)


# ----------------------------------------------------------------------------- the large scan, memory
@pytest.mark.slow
def test_reconstruct_with_a_large_16_bit_scan_in_bounded_memory(corpus, tiny_model, tmp_path) -> None:
    """The whole corpus plus a 3072 x 2048 16-bit RGB scan in a fresh process: outputs for all readable
    files and a peak resident memory far below what the 100000 x 100000 header would need (30 GB)."""
    data = tmp_path / "data"
    make_corpus(data)
    (data / "scan16.png").write_bytes(rgb16_png(3072, 2048))
    out, js = tmp_path / "rec", tmp_path / "r.json"
    code = (
        "import resource, sys; from dcae.cli import main; rc = main(sys.argv[1:]); "
        "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)"
    )
    argv = ["reconstruct", str(data), "--model", str(tiny_model), "-o", str(out), "--json", str(js)]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 1, proc.stderr[-3000:]
    _assert_each_unreadable_named_once(proc.stderr)
    rows = {Path(r["file"]).name: r for r in json.loads(js.read_text())["images"]}
    assert set(rows) == set(READABLE) | {"scan16.png"}
    assert Image.open(rows["scan16.png"]["output"]).size == (3072, 2048)
    peak_gib = int(proc.stderr.split("maxrss_kb")[1].split()[0]) / 2**20
    print(f"peak RSS of reconstruct on the corpus with the 3072x2048 scan: {peak_gib:.2f} GiB")
    # Measured 0.9-1.0 GiB when this test runs alone or with its file, but up to 3.7 GiB inside the full
    # two-worker suite (cause not found). The bound is far below the 30 GB the bomb header asks for.
    assert peak_gib < 6.0, proc.stderr[-3000:]
