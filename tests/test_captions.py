"""Captioned images (`dcae.data.captions`) in every form it reads: folders with sidecar captions, JSONL / CSV
manifests, webdataset shards; the one skip policy (named, skipped, counted; nothing usable left is one line
naming the sources); and the resolution buckets (`dcae.data.buckets`) against diffusers' PixArt / SANA
tables."""

from __future__ import annotations

import gzip
import io
import json
import math
import random
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcae.data.buckets import assign_buckets, bucket_table, image_sizes, resize_to_bucket
from dcae.data.captions import (
    WARN_FIRST,
    CaptionList,
    clean_caption,
    list_captioned,
    read_captioned,
    sample_key,
)
from dcae.data.images import ImageReadError
from dcae.data.sources import read_image, read_size
from dcae.errors import UserError


def _arr(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encoded(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _shard(path: Path, members: dict[str, bytes | str]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return _write(path, buf.getvalue())


def _listed(*args, **kw) -> tuple[CaptionList, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = list_captioned(*args, **kw)
    return out, [str(w.message) for w in caught]


def _captions(items) -> dict[str, str]:
    return {it.name: it.caption for it in items}


# ----------------------------------------------------------------------------- folders with sidecars
def test_folder_with_sidecar_captions_round_trips(tmp_path):
    _write(tmp_path / "a.png", _encoded(_arr(0)))
    _write(tmp_path / "a.txt", "  A red\n\tcar  \r\n")
    _write(tmp_path / "b.jpg", _encoded(_arr(1), "JPEG"))
    _write(tmp_path / "b.caption", "b caption")
    _write(tmp_path / "c.png", _encoded(_arr(2)))
    _write(tmp_path / "c.json", json.dumps({"caption": "c from json", "url": "http://x"}))
    _write(tmp_path / "sub" / "d.png", _encoded(_arr(3)))
    _write(tmp_path / "sub" / "d.json", json.dumps({"text": "d text"}))
    _write(tmp_path / "e.png", _encoded(_arr(4)))
    _write(tmp_path / "e.TXT", "upper-case suffix")
    _write(tmp_path / "g.png", _encoded(_arr(5)))
    _write(tmp_path / "g.txt", "the .txt wins")
    _write(tmp_path / "g.json", json.dumps({"caption": "not this one"}))
    _write(tmp_path / "f.png", _encoded(_arr(6)))  # no caption

    items, messages = _listed(tmp_path)
    assert _captions(items) == {
        "a.png": "A red car",
        "b.jpg": "b caption",
        "c.png": "c from json",
        "e.png": "upper-case suffix",
        "g.png": "the .txt wins",
        "sub/d.png": "d text",
    }
    assert [s.name for s in items.skipped] == ["f.png"] and items.skipped[0].what == "image"
    assert str(tmp_path / "f.png") in items.skipped[0].error
    assert [m for m in messages if "f.png" in m] == [f"skipping unreadable image: {items.skipped[0].error}"]
    arr, caption = read_captioned(items[0])
    assert caption == "A red car" and np.array_equal(arr, _arr(0))

    kept, _ = _listed(tmp_path, keep_uncaptioned=True)
    assert _captions(kept)["f.png"] == "" and not kept.skipped
    located, _ = _listed(tmp_path, naming="location")
    assert str(tmp_path / "a.png") in _captions(located)


def test_damaged_and_empty_sidecars_are_named(tmp_path):
    cases = {
        "bad.json": ("{not json", True),
        "array.json": ("[1, 2]", True),
        "listcap.json": (json.dumps({"caption": ["a", "b"]}), True),
        "nokey.json": (json.dumps({"url": "x"}), False),
        "null.json": (json.dumps({"caption": None}), False),
        "empty.txt": ("", False),
        "blank.txt": (" \n\t ", False),
    }
    for name, (text, _) in cases.items():
        _write(tmp_path / name, text)
        _write(tmp_path / (Path(name).stem + ".png"), _encoded(_arr(len(name))))
    _write(tmp_path / "ok.png", _encoded(_arr(0)))
    _write(tmp_path / "ok.txt", "fine")

    items, _ = _listed(tmp_path)
    assert _captions(items) == {"ok.png": "fine"}
    errors = {s.name: s.error for s in items.skipped}
    for name in cases:
        image = Path(name).stem + ".png"
        assert str(tmp_path / name) in errors[image] and "\n" not in errors[image]
    assert "not JSON" in errors["bad.png"] and "list, not text" in errors["listcap.png"]

    kept, _ = _listed(tmp_path, keep_uncaptioned=True)  # damaged files stay skipped
    damaged = {Path(n).stem + ".png" for n, (_, bad) in cases.items() if bad}
    assert {s.name for s in kept.skipped} == damaged
    assert {n for n, c in _captions(kept).items() if c == ""} == {
        Path(n).stem + ".png" for n, (_, bad) in cases.items() if not bad
    }


def test_caption_text_is_cleaned_and_bad_utf8_counted(tmp_path):
    assert clean_caption("  a\x00b\r\n\t c\u3000d ") == ("a b c d", False)
    _write(tmp_path / "bom.png", _encoded(_arr(0)))
    _write(tmp_path / "bom.txt", b"\xef\xbb\xbfwith BOM")
    _write(tmp_path / "latin.png", _encoded(_arr(1)))
    _write(tmp_path / "latin.txt", b"caf\xe9 au lait")
    items, messages = _listed(tmp_path)
    assert _captions(items) == {"bom.png": "with BOM", "latin.png": "caf\ufffd au lait"}
    assert items.replaced == 1
    assert any("1 caption(s) had bytes that are not UTF-8" in m and "latin.png" in m for m in messages)
    assert all(it.caption.encode("utf-8") for it in items)


# ----------------------------------------------------------------------------- manifests
def _images(root: Path, names=("a", "b", "c")) -> None:
    for i, n in enumerate(names):
        _write(root / "imgs" / f"{n}.png", _encoded(_arr(i)))


def test_jsonl_manifest_rows_skipped_by_line_number(tmp_path):
    _images(tmp_path)
    lines = [
        json.dumps({"file_name": "imgs/a.png", "text": "alpha"}),
        "",
        json.dumps({"file_name": "imgs/missing.png", "text": "x"}),
        json.dumps({"file_name": "imgs/b.png", "text": ""}),
        json.dumps({"file_name": "imgs/b.png"}),
        '{"file_name": "imgs/b.png", ',
        "[1, 2]",
        json.dumps({"file_name": "https://example.com/x.jpg", "text": "y"}),
        json.dumps({"file_name": "imgs/c.png", "text": "gamma \n delta"}),
        json.dumps({"file_name": 5, "text": "z"}),
        json.dumps({"file_name": str(tmp_path / "imgs" / "b.png"), "text": "absolute"}),
    ]
    manifest = _write(tmp_path / "metadata.jsonl", b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    items, _ = _listed(manifest)
    assert [(it.name, it.caption) for it in items] == [
        ("imgs/a.png", "alpha"),
        ("imgs/c.png", "gamma delta"),
        ("imgs/b.png", "absolute"),
    ]
    errors = {s.name: s.error for s in items.skipped}
    assert sorted(errors) == sorted(f"{manifest}:{n}" for n in (3, 4, 5, 6, 7, 8, 10))
    assert all(s.what == "manifest line" and s.error.startswith(s.name) for s in items.skipped)
    assert "does not exist" in errors[f"{manifest}:3"] and "imgs/missing.png" in errors[f"{manifest}:3"]
    assert "no caption" in errors[f"{manifest}:4"] and "no caption" in errors[f"{manifest}:5"]
    assert "not JSON" in errors[f"{manifest}:6"] and "not a JSON object" in errors[f"{manifest}:7"]
    assert "https://example.com/x.jpg" in errors[f"{manifest}:8"] and "URL" in errors[f"{manifest}:8"]
    assert np.array_equal(read_captioned(items[1])[0], _arr(2))

    kept, _ = _listed(manifest, keep_uncaptioned=True)
    assert [it.caption for it in kept] == ["alpha", "", "gamma delta", "absolute"]  # lines 4 and 5: one item
    assert [(s.name, s.what) for s in kept.skipped if s.what == "duplicate"] == [(f"{manifest}:5", "duplicate")]
    located, _ = _listed(manifest, naming="location")
    assert located[0].name == str(tmp_path / "imgs" / "a.png")


def test_jsonl_columns_the_most_rows_have_and_overrides(tmp_path):
    _images(tmp_path)
    rows = [{"image": f"imgs/{n}.png", "prompt": n, "caption": n.upper()} for n in "abc"]
    rows.append({"path": "imgs/a.png", "caption": "a damaged row"})
    manifest = _write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in rows))
    items, _ = _listed(manifest)
    assert [it.caption for it in items] == ["A", "B", "C"]  # "image" (3 rows) over "path" (1 row)
    assert [s.name for s in items.skipped] == [f"{manifest}:4"]
    items, _ = _listed(manifest, caption_column="Prompt")
    assert [it.caption for it in items] == ["a", "b", "c"]
    with pytest.raises(UserError, match="has no caption column 'title'") as err:
        list_captioned(manifest, caption_column="title")
    assert str(manifest) in str(err.value)
    bare = _write(tmp_path / "bare.jsonl", json.dumps({"name": "imgs/a.png", "caption": "x"}))
    with pytest.raises(UserError, match="no image column among") as err:
        list_captioned(bare)
    assert str(bare) in str(err.value) and "'name'" in str(err.value) and "\n" not in str(err.value)


def test_csv_manifest_quoting_crlf_bom_and_wrong_field_counts(tmp_path):
    _images(tmp_path)
    text = (
        "\ufeffImage,Caption\r\n"
        'imgs/a.png,"a, with a comma"\r\n'
        "\r\n"
        'imgs/b.png,"two\r\nlines, ""quoted"""\r\n'
        "imgs/c.png,one,too many\r\n"
        "imgs/c.png\r\n"
        "imgs/missing.png,x\r\n"
        "imgs/c.png,last\r\n"
    )
    manifest = _write(tmp_path / "data.csv", text)
    items, _ = _listed(manifest)
    assert [(it.name, it.caption) for it in items] == [
        ("imgs/a.png", "a, with a comma"),
        ("imgs/b.png", 'two lines, "quoted"'),
        ("imgs/c.png", "last"),
    ]
    errors = {s.name: s.error for s in items.skipped}
    assert sorted(errors) == [f"{manifest}:{n}" for n in (6, 7, 8)]
    assert "3 fields where the header has 2" in errors[f"{manifest}:6"]
    assert "1 fields where the header has 2" in errors[f"{manifest}:7"]
    assert "does not exist" in errors[f"{manifest}:8"]

    tsv = _write(tmp_path / "data.tsv", "path\ttext\tprompt\nimgs/a.png\tfrom text\tfrom prompt\n")
    assert [it.caption for it in _listed(tsv)[0]] == ["from text"]
    assert [it.caption for it in _listed(tsv, caption_column="prompt")[0]] == ["from prompt"]


def test_csv_record_too_large_is_one_line_by_number(tmp_path):
    _images(tmp_path)
    manifest = _write(tmp_path / "big.csv", f"file,text\nimgs/a.png,{'x' * 200_000}\nimgs/b.png,fine\n")
    items, _ = _listed(manifest)
    assert [it.caption for it in items] == ["fine"]
    assert items.skipped[0].name == f"{manifest}:2" and "not a CSV record" in items.skipped[0].error


# ----------------------------------------------------------------------------- webdataset shards
def test_sample_key_is_webdatasets():
    names = ["000000001.jpg", "dir/a.b.png", "./x/000.seg.png", "a.TXT", "noext", ".hidden.jpg", "d.x/y.z"]
    ours = [sample_key(n) for n in names]
    assert ours[:4] == [("000000001", "jpg"), ("dir/a", "b.png"), ("./x/000", "seg.png"), ("a", "TXT")]
    tariterators = pytest.importorskip("webdataset.tariterators")
    assert ours == [tariterators.base_plus_ext(n) for n in names]


def test_webdataset_shards_as_img2dataset_writes_them(tmp_path):
    img = {i: _encoded(_arr(i)) for i in range(6)}
    _shard(
        tmp_path / "shard-000.tar",
        {
            "000000000.jpg": _encoded(_arr(0), "JPEG"),
            "000000000.txt": "a photo of zero",
            "000000000.json": json.dumps({"caption": "not used: .txt first", "width": 8}),
            "000000001.png": img[1],
            "000000001.json": json.dumps({"caption": "from json", "url": "https://x"}),
            "000000002.png": img[2],  # no caption
            "000000003.txt": "a caption without an image",
            "dir/a.b.png": img[3],
            "dir/a.txt": "key dir/a",
        },
    )
    _write(tmp_path / "shard-001.tar", b"not a tar archive" * 50)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {"000000010.png": img[4], "000000010.TXT": b"compressed"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _write(tmp_path / "shard-002.tar", gzip.compress(buf.getvalue()))

    items, messages = _listed(str(tmp_path / "shard-{000..002}.tar"))
    assert _captions(items) == {
        "shard-000.tar/000000000.jpg": "a photo of zero",
        "shard-000.tar/000000001.png": "from json",
        "shard-000.tar/dir/a.b.png": "key dir/a",
        "shard-002.tar/000000010.png": "compressed",
    }
    broken = str(tmp_path / "shard-001.tar")
    assert {s.name: s.what for s in items.skipped} == {broken: "tar shard", "shard-000.tar/000000002.png": "image"}
    assert any(broken in m and m.startswith("skipping unreadable tar shard") for m in messages)
    assert np.array_equal(read_captioned(items[1])[0], _arr(1))
    assert read_captioned(items[3])[1] == "compressed" and np.array_equal(read_captioned(items[3])[0], _arr(4))


def test_mixed_sources_keep_their_order(tmp_path):
    data = tmp_path / "data"
    _write(data / "x.png", _encoded(_arr(0)))
    _write(data / "x.txt", "folder file")
    _shard(data / "inner.tar", {"k.png": _encoded(_arr(1)), "k.txt": "inner shard"})
    _images(tmp_path)
    manifest = _write(tmp_path / "m.csv", "file_name,caption\nimgs/c.png,from csv\n")
    items, _ = _listed([manifest, data])
    assert [it.caption for it in items] == ["from csv", "folder file", "inner shard"]
    # a pattern's matches: a caption file beside its image is not a source of its own
    items, _ = _listed(str(data / "*"))
    assert [it.caption for it in items] == ["inner shard", "folder file"]


# ----------------------------------------------------------------------------- nothing readable
def test_nothing_readable_is_one_line_naming_the_sources(tmp_path):
    for i in range(2):
        _write(tmp_path / "shards" / f"s-{i}.tar", b"garbage" * 100)
    pattern = str(tmp_path / "shards" / "s-*.tar")
    with pytest.raises(UserError) as err:
        _listed(pattern)
    message = str(err.value)
    assert "\n" not in message and pattern in message and "2 unreadable tar shard(s)" in message

    _write(tmp_path / "bare" / "a.png", _encoded(_arr(0)))
    with pytest.raises(UserError, match="nothing readable in") as err:
        _listed(tmp_path / "bare")
    assert str(tmp_path / "bare") in str(err.value) and "no caption for" in str(err.value)

    manifest = _write(tmp_path / "m.jsonl", "{bad\n" + json.dumps({"image": "nope.png", "caption": "x"}) + "\n")
    with pytest.raises(UserError) as err:
        _listed(manifest)
    assert "\n" not in str(err.value) and f"{manifest}:1" in str(err.value)

    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty.csv", "image,caption\n")
    with pytest.raises(UserError, match="no captioned images found in"):
        _listed([tmp_path / "empty", tmp_path / "empty.csv"])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _listed(tmp_path / "nope.jsonl")


def test_many_skips_warn_for_the_first_then_count(tmp_path):
    for i in range(WARN_FIRST + 5):
        _write(tmp_path / f"u{i:02d}.png", _encoded(_arr(i)))
    _write(tmp_path / "ok.png", _encoded(_arr(99)))
    _write(tmp_path / "ok.txt", "fine")
    items, messages = _listed(tmp_path)
    assert len(items.skipped) == WARN_FIRST + 5
    assert len([m for m in messages if m.startswith("skipping")]) == WARN_FIRST
    assert [m for m in messages if not m.startswith("skipping")] == [
        f"skipped {WARN_FIRST + 5} in all ({WARN_FIRST + 5} image); the first {WARN_FIRST} are named above, "
        "all in the listing's .skipped"
    ]


def test_an_image_that_cannot_be_decoded_is_named_when_read(tmp_path):
    _write(tmp_path / "imgs" / "bad.png", _encoded(_arr(0))[:40])
    manifest = _write(tmp_path / "m.jsonl", json.dumps({"image": "imgs/bad.png", "caption": "x"}))
    (item,) = list_captioned(manifest)
    with pytest.raises(ImageReadError, match="imgs/bad.png"):
        read_captioned(item)


# ----------------------------------------------------------------------------- buckets
def _diffusers_tables():
    pipelines = pytest.importorskip("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha")
    return {256: pipelines.ASPECT_RATIO_256_BIN, 512: pipelines.ASPECT_RATIO_512_BIN,
            1024: pipelines.ASPECT_RATIO_1024_BIN}  # fmt: skip


# The sizes of our 1024 table that diffusers' ASPECT_RATIO_1024_BIN leaves out: 1344x704 (1.91, the transpose
# of its 704x1344) is in none of PixArt's / SANA's tables; the other 7 are in their full ASPECT_RATIO_1024.
EXTRA_1024 = {(512, 1920), (512, 1984), (1344, 704), (1664, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512)}


@pytest.mark.parametrize(("resolution", "patch"), [(256, 16), (512, 32), (1024, 32), (1024, 64)])
def test_bucket_table_reproduces_diffusers_aspect_ratio_bins(resolution, patch):
    table = bucket_table(resolution, patch)
    theirs = {(int(h), int(w)) for h, w in _diffusers_tables()[resolution].values()}
    assert theirs <= set(table)
    scale = resolution / 1024
    assert set(table) - theirs == {(round(h * scale), round(w * scale)) for h, w in EXTRA_1024}
    for key, (h, w) in _diffusers_tables()[resolution].items():  # their keys: h/w to two decimals
        assert float(key) == pytest.approx(h / w, abs=0.006)


@pytest.mark.parametrize(("resolution", "module", "name"), [
    (2048, "pixart_alpha.pipeline_pixart_sigma", "ASPECT_RATIO_2048_BIN"),
    (4096, "sana.pipeline_sana", "ASPECT_RATIO_4096_BIN"),
])  # fmt: skip
def test_bucket_table_at_2048_and_4096_is_diffusers_full_table_and_1_91(resolution, module, name):
    bins = getattr(pytest.importorskip(f"diffusers.pipelines.{module}"), name)
    theirs = {(int(h), int(w)) for h, w in bins.values()}
    scale = resolution // 1024
    assert set(bucket_table(resolution, 32)) - theirs == {(1344 * scale, 704 * scale)}
    assert theirs <= set(bucket_table(resolution, 32))


def test_bucket_table_properties():
    for resolution, patch in [(512, 32), (1024, 32), (1024, 64), (768, 32), (2048, 64)]:
        table = bucket_table(resolution, patch)
        assert all(h % patch == 0 and w % patch == 0 for h, w in table)
        assert all(0.9 * resolution**2 <= h * w <= resolution**2 for h, w in table)
        assert all(1 / 4 <= h / w <= 4 for h, w in table)
        assert {(w, h) for h, w in table} == set(table)  # every bucket's transpose too
        assert list(table) == sorted(table, key=lambda s: s[0] / s[1])
        assert len({h / w for h, w in table}) == len(table)
    assert (1024, 1024) in bucket_table(1024, 32) and len(bucket_table(1024, 32, step=32)) > 41
    with pytest.raises(ValueError, match="not a multiple"):
        bucket_table(1024, 32, step=48)


def test_bucket_choice_for_portrait_landscape_square():
    sizes = [(1000, 1000), (480, 640), (640, 480), (3000, 1000), (1000, 3000), (100, 1000), (4032, 3024)]
    assert assign_buckets(sizes, 1024, 32) == [
        (1024, 1024),  # square
        (896, 1152),  # 3:4 portrait -> 0.78
        (1152, 896),  # 4:3 landscape
        (1728, 576),  # 3:1
        (576, 1728),
        (512, 2048),  # 1:10 -> the longest, 1:4
        (1152, 896),
    ]
    assert assign_buckets([(512, 512), None], 512, 32) == [(512, 512), None]
    rng = random.Random(0)
    some = [(rng.randint(50, 5000), rng.randint(50, 5000)) for _ in range(500)]
    flipped = assign_buckets([(w, h) for h, w in some], 1024, 32)
    assert flipped == [(w, h) for h, w in assign_buckets(some, 1024, 32)]


def test_bucket_choice_agrees_with_diffusers_classify_up_to_the_midpoints():
    processor = pytest.importorskip("diffusers.image_processor").PixArtImageProcessor
    bins = _diffusers_tables()[1024]
    table = [(int(h), int(w)) for h, w in bins.values()]
    assert assign_buckets(table, 1024, table=table) == table
    rng = random.Random(1)
    sizes = [(rng.randint(100, 4000), rng.randint(100, 4000)) for _ in range(3000)]
    for size, ours in zip(sizes, assign_buckets(sizes, 1024, table=table)):
        theirs = processor.classify_height_width_bin(*size, bins)
        if theirs != ours:  # log vs linear distance, keys rounded: only where both are about as close
            a = math.log(size[0] / size[1])
            gap = abs(math.log(theirs[0] / theirs[1]) - a) - abs(math.log(ours[0] / ours[1]) - a)
            assert 0 <= gap < 0.02, (size, ours, theirs)


def test_image_sizes_are_upright_from_headers_for_files_and_shard_members(tmp_path):
    img = Image.fromarray(_arr(0, 30, 40))  # stored 30 x 40 (landscape), shown portrait
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    sideways = buf.getvalue()
    _write(tmp_path / "p.jpg", sideways)
    _write(tmp_path / "p.txt", "a portrait")
    truncated = _encoded(_arr(1, 20, 60))[:-30]  # header fine, pixels cut
    _shard(tmp_path / "s.tar", {"1.jpg": sideways, "1.txt": "in a shard", "2.png": truncated, "2.txt": "cut"})
    items = list_captioned(tmp_path)
    assert [it.name for it in items] == ["p.jpg", "s.tar/1.jpg", "s.tar/2.png"]
    assert image_sizes(items) == [(40, 30), (40, 30), (20, 60)]  # the cut one: its header is good
    assert read_size(items[1].ref) == read_image(items[1].ref).shape[:2]
    with pytest.raises(ImageReadError, match="s.tar/2.png"):
        read_image(items[2].ref)
    assert assign_buckets(image_sizes(items), 512, 32)[:2] == [(576, 448)] * 2


def test_resize_to_bucket_covers_then_center_crops(tmp_path):
    arr = np.zeros((100, 300, 3), np.uint8)  # a wide image: a white center square on black
    arr[:, 100:200] = 255
    out = resize_to_bucket(arr, (64, 64))
    assert out.shape == (64, 64, 3) and out[:, 4:-4].min() > 250  # the center third fills the square
    tall = resize_to_bucket(np.ascontiguousarray(arr.transpose(1, 0, 2)), (96, 32))
    assert tall.shape == (96, 32, 3)
    same = _arr(3, 32, 48)
    assert resize_to_bucket(same, (32, 48)) is same
    scaled = resize_to_bucket(same, (64, 96))  # same aspect: a plain bicubic resize
    assert np.array_equal(scaled, np.asarray(Image.fromarray(same).resize((96, 64), Image.BICUBIC)))
    strip = resize_to_bucket(_arr(4, 1, 20000), (256, 1024))  # never enlarged whole
    assert strip.shape == (256, 1024, 3)

    _write(tmp_path / "w.png", _encoded(arr))
    _write(tmp_path / "w.txt", "wide")
    (item,) = list_captioned(tmp_path)
    (bucket,) = assign_buckets(image_sizes([item]), 512, 32)
    image, caption = read_captioned(item, bucket)
    assert bucket == (288, 864) and image.shape == (288, 864, 3) and caption == "wide"
