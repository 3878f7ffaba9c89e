"""Fuzzing the captioned-data readers (`dcae.data.captions`): damaged JSONL / CSV manifests, damaged sidecar
caption files and damaged webdataset caption shards. Each listing gives captioned images or one line naming
the file (see fuzz_helpers); every caption listed is clean text, and every image listed reads or gives one
line naming it."""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fuzz_helpers import EXAMPLES, FUZZ, damaged_shard, mutated_bytes, mutated_json, result_or_one_line, time_limit
from hypothesis import example, given, settings
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


# ----------------------------------------------------------------------------- `dcae t2i cache` end to end
PHRASES = ["a red square", "two blue circles", "a green triangle on grey", "caf\u00e9 \u2014 noir", "one small dot"]
KINDS = ["good", "good", "good", "uncaptioned", "blank", "garbage", "truncated"]
ROW_KINDS = ["bad line", "missing image", "repeated row", "another caption", "repeated elsewhere"]
SIZES = [(8, 8), (8, 16), (16, 8)]
NAMES = {"sidecar": "d{}", "jsonl": "m{}.jsonl", "csv": "c{}.csv", "tar": "t{}.tar"}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A tiny autoencoder folder; it and MiniLM (16 tokens) are loaded once, and every `dcae t2i cache` of the
    module is given these instead of loading its own."""
    from test_diffusion_latents import tiny_autoencoder

    from dcae.diffusion.t2i.encoders import TextEncoder, all_minilm_l6_v2
    from dcae.models import DCAE

    folder = tmp_path_factory.mktemp("models") / "ae"
    tiny_autoencoder().save_pretrained(folder)
    ae, encoder = DCAE.from_pretrained(folder), TextEncoder.from_pretrained(all_minilm_l6_v2(), max_tokens=16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DCAE, "from_pretrained", classmethod(lambda cls, *a, **k: ae))
        mp.setattr(TextEncoder, "from_pretrained", classmethod(lambda cls, *a, **k: encoder))
        yield folder, all_minilm_l6_v2()


@st.composite
def datasets(draw):
    """A small mixed data set: one to three sources (sidecar folders, JSONL / CSV manifests, webdataset shards),
    each a few images of every kind (good, without a caption, with a blank one, not an image, cut short inside
    its pixels), manifests with bad rows of their own (not a record, a missing image, a row repeated here or of
    an earlier source, an image again with another caption), perhaps a shard cut short and a source given
    twice. Items: (kind, (height, width), caption, how far a truncated image is kept (0..1)); a shard is cut
    at (k, delta): delta bytes after the header of its k-th member (modulo their number), or of its end."""
    sources = []
    layouts = draw(st.permutations(sorted(NAMES)), label="layouts")[: draw(st.integers(1, 3), label="sources")]
    for layout in layouts:
        kinds = KINDS + (ROW_KINDS if layout in ("jsonl", "csv") else [])
        items = [(k, draw(st.sampled_from(SIZES)), draw(st.sampled_from(PHRASES)), draw(st.floats(0, 1)))
                 for k in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4), label="kinds")]  # fmt: skip
        cut = None
        if layout == "tar" and draw(st.booleans(), label="cut the shard short"):  # at member k's header + delta
            cut = (draw(st.integers(0, 8), label="k"), draw(st.integers(0, 1600), label="delta"))
        sources.append((layout, items, cut))
    return sources, draw(st.booleans(), label="give the first source twice")


class Expected:
    """What `dcae t2i cache` must make of a drawn data set: the (image file name, caption) of every good item
    (those of a shard cut short in `maybe`: they may be lost with it, which must then be named), and for each
    bad item the names of which one must appear in the record's skipped list (or its cut shard be named)."""

    def __init__(self):
        self.good: list[tuple[str, str]] = []
        self.maybe: dict[str, list[tuple[str, str]]] = {}  # cut shard -> its good items
        self.bad: list[tuple[tuple[str, ...], str | None]] = []
        self.twice: list[str] = []
        self.files: list[tuple[str, str]] = []  # good image files (path relative to the root) and captions


def _image(kind: str, size, seed: int, kept: float) -> bytes:
    if kind == "garbage":
        return b"not an image, though named .png"
    data = _png_sized(seed, size)
    if kind == "truncated":  # cut inside the pixel data: the header reads, the image does not
        return data[: 50 + int(kept * (len(data) - 71))]
    return data


def _png_sized(seed: int, size) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _row(kind: str, line: str, rows: list, kept: list, exp: Expected, n: int) -> None:
    """A manifest row of ROW_KINDS appended to `rows`, and what is expected of it."""
    if kind == "another caption" and kept:  # the same image with another caption is another item
        rows.append((kept[0][0], f"{kept[0][1]} again {n}"))
        exp.good.append((Path(kept[0][0]).name, rows[-1][1]))
        return
    if kind == "repeated row" and kept:
        rows.append(kept[0])
    elif kind == "repeated elsewhere" and exp.files:
        rows.append(exp.files[0])
    elif kind == "bad line":
        rows.append((None, None))
    else:
        rows.append(("nowhere/nothing.png", "an image that is not there"))
    exp.bad.append(((line,), None))


def _write_dataset(root: Path, drawn) -> tuple[list[str], Expected]:
    """The drawn sources written under root: their --data arguments and what is expected of them."""
    from fuzz_helpers import tar_bytes

    sources, twice = drawn
    exp, data, n = Expected(), [], 0
    for k, (layout, items, cut) in enumerate(sources):
        path = root / NAMES[layout].format(k)
        shard = str(path) if cut is not None else None
        rows, members, kept = [], {}, []  # manifest rows (image, caption), tar members, good manifest rows
        for kind, size, caption, keep in items:
            n += 1
            img, line = f"i{n}.png", f"{path}:{len(rows) + (2 if layout == 'csv' else 1)}"
            if kind in ROW_KINDS:
                _row(kind, line, rows, kept, exp, n)
                continue
            blob, text = _image(kind, size, n, keep), {"uncaptioned": None, "blank": " \t "}.get(kind, caption)
            if kind == "good" and shard:
                exp.maybe.setdefault(shard, []).append((img, caption))
            elif kind == "good":
                exp.good.append((img, caption))
            else:  # named by its file, or by its manifest line
                exp.bad.append(((img, line) if layout in ("jsonl", "csv") else (img,), shard))
            if layout == "sidecar":
                path.mkdir(exist_ok=True)
                (path / img).write_bytes(blob)
                if text is not None:
                    (path / img).with_suffix(".txt").write_text(text)
                if kind == "good":
                    exp.files.append((f"{path.name}/{img}", caption))
            elif layout == "tar":
                members[img] = blob
                if text is not None:
                    members[img.replace(".png", ".txt")] = text.encode()
            else:
                (root / "imgs").mkdir(exist_ok=True)
                (root / "imgs" / img).write_bytes(blob)
                rows.append((f"imgs/{img}", text))
                if kind == "good":
                    kept.append(rows[-1])
                    exp.files.append(rows[-1])
        if layout == "tar":
            blob = tar_bytes(members)
            if cut is not None:
                with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                    starts = [m.offset for m in tar.getmembers()] + [len(blob) - 1024]  # the end blocks
                blob = blob[: starts[cut[0] % len(starts)] + cut[1]]
            path.write_bytes(blob)
        elif layout == "jsonl":  # a row without a caption has the column, empty (no column at all is an error)
            lines = ["{not json" if i is None else json.dumps({"image": i, "caption": c}) for i, c in rows]
            path.write_text("\n".join(lines) + "\n")
        elif layout == "csv":
            buf = io.StringIO()
            csv.writer(buf).writerows([["image", "caption"]] + [["x", "y", "z"] if i is None else [i, c or ""]
                                                                for i, c in rows])  # fmt: skip
            path.write_text(buf.getvalue())
        data.append(str(path))
    if twice:
        data.append(data[0])
        exp.twice.append(data[0])
    return data, exp


_RUNS = iter(range(1_000_000))
CUT_IN_A_HEADER = (  # tarfile ends a shard cut inside a later header without a word: the rest is lost
    [("tar", [("good", (8, 8), "a red square", 0.0)] * 3 + [("truncated", (8, 16), "a dot", 0.5)], (4, 100))],
    False,
)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(drawn=datasets())
@example(drawn=CUT_IN_A_HEADER)
def test_t2i_cache_of_a_mixed_data_set(loaded, tmp_path, drawn):
    """The real `dcae t2i cache` on good items mixed with bad ones in every layout: exactly the good items are
    cached and every bad one is named and counted in the record's skipped list, or, with no good item left, one
    error line; never a traceback."""
    from test_t2i import _cli

    from dcae.diffusion.cache import read_index

    ae, text_encoder = loaded
    root = tmp_path / f"run{next(_RUNS)}"  # a fresh folder for each example
    root.mkdir()
    data, exp = _write_dataset(root, drawn)
    with time_limit(60):
        rc, err = _cli("t2i", "cache", "--data", *data, "--model", ae, "--text-encoder", text_encoder, "-o",
                       root / "out", "--resolution", 32, "--max-tokens", 16, "--batch-size", 3)  # fmt: skip
    if rc != 0:
        assert rc == 2 and err.count("dcae: error:") == 1 and "Traceback" not in err, err
        assert not exp.good, f"failed with good items: {err[err.index('dcae: error:') :]}"
        return
    index = read_index(root / "out")
    listed = (root / "out" / "captions.jsonl").read_text().splitlines()
    cached = Counter((Path(c["image"]).name, c["caption"]) for c in map(json.loads, listed))
    assert index.num_images == sum(cached.values())
    good, maybe = Counter(exp.good), Counter(g for items in exp.maybe.values() for g in items)
    assert not good - cached, f"good items not cached: {good - cached}"
    assert not (cached - good) - maybe, f"cached, but not good: {(cached - good) - maybe}"
    skipped = index.skipped

    def shard_named(shard) -> bool:  # the shard itself: unreadable, or cut short after some members
        return shard is not None and any(f"tar shard {shard}" in s for s in skipped)

    for names, shard in exp.bad:
        assert any(n in s for s in skipped for n in names) or shard_named(shard), (names, skipped)
    for shard, items in exp.maybe.items():
        lost = Counter(items) - cached
        assert not lost or shard_named(shard), (shard, lost, skipped)
    for source in exp.twice:
        assert any("given twice" in s and source in s for s in skipped), skipped
    if not any(layout == "tar" and cut is not None for layout, _, cut in drawn[0]):
        assert len(skipped) == len(exp.bad) + len(exp.twice), skipped  # one record each
