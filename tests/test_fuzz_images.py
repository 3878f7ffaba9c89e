"""Fuzzing the image readers: damaged files of every format dcae reads, alone, in a folder and inside tar
shards. Each read gives an RGB uint8 array or one line naming the file (see fuzz_helpers)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fuzz_helpers import FUZZ, damaged_shard, mutated_bytes, result_or_one_line
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dcae.data.images import load_image_uint8
from dcae.data.sources import list_images, read_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _encoded(fmt: str, mode: str = "RGB", size=(12, 9), **kw) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_jpeg() -> bytes:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 12, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 when shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


SEEDS = {
    "png": _encoded("PNG"),
    "jpg": _encoded("JPEG"),
    "exif.jpg": _exif_jpeg(),
    "webp": _encoded("WEBP"),
    "gif": _encoded("GIF", "P"),
    "tif": _encoded("TIFF"),
    "bmp": _encoded("BMP"),
    "gray16.png": _encoded("PNG", "I;16"),
    "rgba.png": _encoded("PNG", "RGBA"),
}


def _check_image(arr) -> None:
    if arr is not None:
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and min(arr.shape[:2]) >= 1


@FUZZ
@given(data=st.data())
def test_damaged_image_files(tmp_path, data):
    name = data.draw(st.sampled_from(sorted(SEEDS)), label="format")
    path = tmp_path / f"photo.{name}"
    path.write_bytes(data.draw(mutated_bytes(SEEDS[name]), label="bytes"))
    _check_image(result_or_one_line(lambda: load_image_uint8(path), path))
    refs = result_or_one_line(lambda: list_images(path), path)  # the one image source, as every command lists
    for ref in refs or []:
        _check_image(result_or_one_line(lambda ref=ref: read_image(ref), path))


@FUZZ
@given(data=st.data())
def test_damaged_tar_shards_and_members(tmp_path, data):
    """A shard with damaged members, or a damaged shard: listed and read member by member, a broken shard
    or member is named (the shard's path and the member) and the others still read."""
    members = {f"{i:03d}.{n}": SEEDS[n] for i, n in enumerate(["png", "jpg", "webp"])}
    shard = tmp_path / "shard-000.tar"
    shard.write_bytes(data.draw(damaged_shard(members)))
    (tmp_path / "good.png").write_bytes(SEEDS["png"])  # a good file beside it: listing the folder must go on
    refs = result_or_one_line(lambda: list_images(tmp_path), shard)
    assert refs is not None and any(r.name == "good.png" for r in refs)
    for ref in refs:
        _check_image(result_or_one_line(lambda ref=ref: read_image(ref), shard, (ref.name,)))
