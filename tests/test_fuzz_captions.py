"""Fuzzing the captioned-data readers (`dcae.data.captions`): damaged JSONL / CSV manifests, damaged sidecar
caption files and damaged webdataset caption shards. Each listing gives captioned images or one line naming
the file (see fuzz_helpers); every caption listed is clean text, and every image listed reads or gives one
line naming it."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest
from fuzz_helpers import FUZZ, damaged_shard, mutated_bytes, mutated_json, result_or_one_line
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dcae.data.captions import list_captioned, read_captioned
from dcae.data.sources import read_size

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _check(items, path, names=()) -> None:
    """Clean captions, and every listed image read (and sized from its header) or named in one line."""
    for item in items or []:
        caption = item.caption
        assert caption == " ".join(caption.split()) and not re.search(r"[\x00-\x1f\x7f-\x9f]", caption)
        caption.encode("utf-8")  # no lone surrogates
        result_or_one_line(lambda item=item: read_captioned(item), path, (item.name, *names))
        size = result_or_one_line(lambda item=item: read_size(item.ref), path, (item.name, *names))
        assert size is None or (len(size) == 2 and min(size) >= 1)


ROWS = [
    {"image": "imgs/a.png", "caption": "a red car, parked"},
    {"image": "imgs/b.png", "caption": 'two "quoted" words'},
    {"image": "imgs/c.png", "caption": "caf\u00e9 \u2014 \u6f22\u5b57"},
]


def _images(root) -> None:
    (root / "imgs").mkdir(exist_ok=True)
    for i, n in enumerate("abc"):
        (root / "imgs" / f"{n}.png").write_bytes(_png(i))


def _jsonl(rows) -> bytes:
    return "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()


def _csv(rows) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "caption"])
    writer.writerows([r["image"], r["caption"]] for r in rows)
    return b"\xef\xbb\xbf" + buf.getvalue().encode()


@FUZZ
@given(data=st.data())
def test_damaged_manifests(tmp_path, data):
    _images(tmp_path)
    kind = data.draw(st.sampled_from(["jsonl", "csv"]), label="kind")
    if kind == "jsonl" and data.draw(st.booleans(), label="damage a row's fields"):
        rows = list(ROWS)
        i = data.draw(st.integers(0, len(rows) - 1))
        rows[i] = data.draw(mutated_json(rows[i]))
        blob = _jsonl(rows)
    else:
        blob = data.draw(mutated_bytes(_jsonl(ROWS) if kind == "jsonl" else _csv(ROWS)), label="bytes")
    manifest = tmp_path / f"manifest.{kind}"
    manifest.write_bytes(blob)
    keep = data.draw(st.booleans(), label="keep_uncaptioned")
    items = result_or_one_line(lambda: list_captioned(manifest, keep_uncaptioned=keep), manifest)
    _check(items, manifest)


SIDECARS = {
    "a.txt": b"a plain caption\n",
    "b.caption": b"caption with\ttabs\r\n",
    "c.json": json.dumps({"caption": "from json", "url": "https://example.com/c.jpg", "width": 9}).encode(),
}


@FUZZ
@given(data=st.data())
def test_damaged_sidecar_captions(tmp_path, data):
    """A damaged sidecar skips (or keeps, uncaptioned) its image only: the others are listed."""
    for i, name in enumerate(SIDECARS):
        (tmp_path / f"{name.split('.')[0]}.png").write_bytes(_png(i))
        (tmp_path / name).write_bytes(SIDECARS[name])
    (tmp_path / "good.png").write_bytes(_png(9))
    (tmp_path / "good.txt").write_bytes(b"a good one")
    name = data.draw(st.sampled_from(sorted(SIDECARS)), label="sidecar")
    if name.endswith(".json") and data.draw(st.booleans(), label="damage its fields"):
        blob = json.dumps(data.draw(mutated_json(json.loads(SIDECARS[name])))).encode()
    else:
        blob = data.draw(mutated_bytes(SIDECARS[name]), label="bytes")
    (tmp_path / name).write_bytes(blob)
    items = result_or_one_line(lambda: list_captioned(tmp_path), tmp_path / name)
    assert items is not None and {"good.png", "a.png", "b.png", "c.png"} - {name.split(".")[0] + ".png"} <= {
        it.name for it in items
    }
    _check(items, tmp_path / name)


@FUZZ
@given(data=st.data())
def test_damaged_caption_shards(tmp_path, data):
    """A shard with a damaged member (image, .txt or .json), or damaged whole, beside a good captioned image:
    the folder still lists; a broken shard is named and skipped."""
    members = {
        "000000000.jpg": _png(0),
        "000000000.txt": b"zero",
        "000000000.json": json.dumps({"caption": "zero (json)", "key": "000000000"}).encode(),
        "000000001.png": _png(1),
        "000000001.json": json.dumps({"caption": "one"}).encode(),
        "000000002.png": _png(2),
        "000000002.txt": "two \u00e9".encode(),
    }
    shard = tmp_path / "shard-000.tar"
    shard.write_bytes(data.draw(damaged_shard(members)))
    (tmp_path / "good.png").write_bytes(_png(9))
    (tmp_path / "good.txt").write_bytes(b"good")
    items = result_or_one_line(lambda: list_captioned(tmp_path), shard)
    assert items is not None and any(it.name == "good.png" for it in items)
    _check(items, shard)
