"""One image source for training, evaluation and metrics (`dcae.data.sources`): the same listing, and the
same policy for a broken shard or an unreadable file: named, skipped, counted, and a one-line error when
nothing readable is left."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcae.data.images import ImageReadError
from dcae.data.sources import ImageRef, list_images, read_image, read_images
from dcae.errors import UserError
from dcae.metrics.data import collect_images, iterate_batches
from dcae.train.data import ImageDataset, Item, list_items, load_val_images, split_items


def _png(seed: int, size: int = 8) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _shard(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _shards(root: Path) -> tuple[Path, Path, Path]:
    """shard-000 (good), shard-001 (not a tar at all), shard-002 (good)."""
    a = _shard(root / "shard-000.tar", {"a.png": _png(0), "a.json": b"{}", "b.png": _png(1)})
    broken = _write(root / "shard-001.tar", b"this is not a tar archive" * 40)
    c = _shard(root / "shard-002.tar", {"c.png": _png(2)})
    return a, broken, c


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- broken shards
@pytest.mark.parametrize("lister", ["train", "metrics"])
def test_broken_shard_among_good_ones_is_skipped_named_and_counted(tmp_path, lister):
    _, broken, _ = _shards(tmp_path)
    pattern = str(tmp_path / "shard-*.tar")
    listing, messages = _caught(lambda: list_items([pattern]) if lister == "train" else collect_images(pattern))
    assert [r.member for r in listing] == ["a.png", "b.png", "c.png"]
    assert len(listing.skipped) == 1
    assert listing.skipped[0].name == str(broken) and listing.skipped[0].what == "tar shard"
    assert str(broken) in listing.skipped[0].error and "\n" not in listing.skipped[0].error
    assert [m for m in messages if "shard-001.tar" in m] == [
        f"skipping unreadable tar shard: {listing.skipped[0].error}"
    ]
    assert all(len(read_image(r).shape) == 3 for r in listing)


def test_truncated_shard_is_skipped_whole_and_named(tmp_path):
    good = _shard(tmp_path / "good.tar", {"x.png": _png(3)})
    cut = _shard(tmp_path / "cut.tar", {"y.png": _png(4), "z.png": _png(5, size=32)})
    with tarfile.open(cut) as tar:
        z = tar.getmember("z.png")
    cut.write_bytes(cut.read_bytes()[: z.offset_data + z.size // 2])  # an interrupted copy, cut inside z.png
    listing, messages = _caught(lambda: collect_images([str(good), str(tmp_path / "cut.tar")]))
    assert [r.name for r in listing] == ["good.tar/x.png"]
    assert [s.name for s in listing.skipped] == [str(tmp_path / "cut.tar")]
    assert any("cut.tar" in m for m in messages)


def test_shard_cut_inside_a_later_header_keeps_the_members_before_and_is_named(tmp_path):
    """tarfile ends an archive cut inside (or damaged in) a header after the first without a word: the members
    before are listed, and the shard is named as cut short, so the lost rest is not lost silently."""
    members = {"a.png": _png(1), "b.png": _png(2), "c.png": _png(3)}
    whole = _shard(tmp_path / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        c = tar.getmember("c.png")
    for name, data in [("cut.tar", whole[: c.offset + 100]), ("at.tar", whole[: c.offset]),
                       ("bad.tar", whole[: c.offset + 10] + b"\xff" + whole[c.offset + 11 :])]:  # fmt: skip
        _write(tmp_path / "s" / name, data)
    _write(tmp_path / "s" / "end.tar", whole[: c.offset_data + c.size + 700])  # inside the end blocks: whole
    listing, messages = _caught(lambda: list_images(tmp_path / "s"))
    names = [r.name for r in listing]
    assert names == [f"{s}/{m}" for s in ("at.tar", "bad.tar", "cut.tar") for m in ("a.png", "b.png")] + [
        f"end.tar/{m}" for m in members
    ]
    assert [Path(s.name).name for s in listing.skipped] == ["at.tar", "bad.tar", "cut.tar"]
    assert all(
        s.what == "tar shard" and "cut short or damaged after its 2 member(s)" in s.error for s in listing.skipped
    )
    assert "is damaged" in listing.skipped[1].error and "ends inside the header" in listing.skipped[2].error
    assert sum("cut short" in m for m in messages) == 3


def test_broken_shard_inside_a_folder(tmp_path):
    _write(tmp_path / "data" / "img.png", _png(6))
    _write(tmp_path / "data" / "sub" / "bad.tar", b"")  # an empty file is no shard either
    listing, _ = _caught(lambda: collect_images(tmp_path / "data"))
    assert [r.name for r in listing] == ["img.png"] and [s.name for s in listing.skipped] == [
        str(tmp_path / "data" / "sub" / "bad.tar")
    ]


# ----------------------------------------------------------------------------- nothing readable left
@pytest.mark.parametrize("lister", ["collect_images", "list_items", "split_items"])
def test_nothing_readable_left_is_a_one_line_error_naming_the_source(tmp_path, lister):
    _write(tmp_path / "only-000.tar", b"garbage" * 100)
    _write(tmp_path / "only-001.tar", b"")
    pattern = str(tmp_path / "only-*.tar")
    call = {
        "collect_images": lambda: collect_images(pattern),
        "list_items": lambda: list_items([pattern]),
        "split_items": lambda: split_items([pattern], [], 0),
    }[lister]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError) as info:
            call()
    message = str(info.value)
    assert "\n" not in message
    assert pattern in message and "2 unreadable tar shard(s)" in message and "only-000.tar" in message


def test_nothing_readable_among_images_is_an_error_naming_the_file(tmp_path):
    refs = collect_images(_write(tmp_path / "broken.png", b"\x89PNG\r\n\x1a\n not really"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="none of the 1 validation images could be read.*broken.png"):
            load_val_images(refs, 4)


def test_an_empty_folder_stays_what_it_was(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        collect_images(tmp_path / "empty")
    assert list_items([str(tmp_path / "empty")]) == []  # training: data.train says it, data.val may be empty
    with pytest.raises(UserError, match="no training images"):
        split_items([str(tmp_path / "empty")], [], 0)


# ----------------------------------------------------------------------------- unreadable files
def test_truncated_and_corrupt_files_are_skipped_named_and_counted(tmp_path):
    folder = tmp_path / "photos"
    good = _png(7, size=16)
    _write(folder / "a_good.png", good)
    _write(folder / "b_truncated.png", good[: len(good) // 2])
    _write(folder / "c_corrupt.jpg", b"\xff\xd8 broken jpeg")
    _write(folder / "d_good.png", _png(8, size=16))
    refs = collect_images(folder)
    assert [r.name for r in refs] == ["a_good.png", "b_truncated.png", "c_corrupt.jpg", "d_good.png"]
    for r in refs[1:3]:
        with pytest.raises(ImageReadError, match=r.name):
            read_image(r)

    (arrays, skipped), messages = _caught(lambda: read_images(refs))
    assert len(arrays) == 2 and [s.name for s in skipped] == ["b_truncated.png", "c_corrupt.jpg"]
    assert sum("b_truncated.png" in m for m in messages) == 1 and sum("c_corrupt.jpg" in m for m in messages) == 1

    batches = list(iterate_batches(refs, 8, batch_size=4))  # evaluation: the same two, by name
    assert sorted(refs[i].name for b in batches for i, _ in b.errors) == ["b_truncated.png", "c_corrupt.jpg"]

    ds = ImageDataset(list_items([str(folder)]), 8, seed=0)  # training: named by path, counted per sample
    (results, messages) = _caught(lambda: [ds[(i, 0, i)] for i in range(len(ds))])
    assert sum(n for _, n in results) == 3  # b is skipped for b, and b and c for c
    assert any(str(folder / "c_corrupt.jpg") in m for m in messages)


def test_a_file_removed_after_listing_is_an_unreadable_file_not_a_crash(tmp_path):
    path = _write(tmp_path / "gone.png", _png(9))
    (ref,) = collect_images(path)
    path.unlink()
    with pytest.raises(ImageReadError, match="gone.png: it does not exist"):
        read_image(ref)


def test_a_member_cut_off_by_the_end_of_the_shard_is_named(tmp_path):
    shard = _shard(tmp_path / "s.tar", {"m.png": _png(10, size=32)})
    (ref,) = collect_images(shard)
    cut = ImageRef(ref.name, ref.path, ref.member, ref.offset, ref.size + 10_000, ref.mtime)
    with pytest.raises(ImageReadError, match=r"s\.tar/m\.png: the shard ends inside it"):
        read_image(cut)


# ----------------------------------------------------------------------------- one listing
def test_training_and_metrics_list_the_same_images(tmp_path):
    data = tmp_path / "data"
    _write(data / "b" / "2.png", _png(11))
    _write(data / "a" / "1.jpg", _png(12))  # a PNG under a .jpg name: Pillow reads by content
    _shard(data / "z" / "inner.tar", {"i.png": _png(13)})
    _shard(tmp_path / "shards" / "s-000.tar", {"k.png": _png(14), "k.cls": b"3"})
    _shard(tmp_path / "shards" / "s-001.tar.gz", {"gz.png": _png(15)}, mode="w:gz")
    _shard(tmp_path / "shards" / "s-001.tar", {"l.png": _png(16)}, mode="w:gz")  # compressed, plain name
    single = _write(tmp_path / "single.webp", _png(17))
    sources = [str(data), str(tmp_path / "shards" / "s-{000..001}.tar"), str(single), "skimage:coffee"]

    train, metrics = list_items(sources), collect_images(sources)
    assert [r.location for r in train] == [r.location for r in metrics]
    assert [r.location for r in train] == [
        str(data / "a" / "1.jpg"),
        str(data / "b" / "2.png"),
        f"{data / 'z' / 'inner.tar'}:i.png",
        f"{tmp_path / 'shards' / 's-000.tar'}:k.png",
        f"{tmp_path / 'shards' / 's-001.tar'}:l.png",
        str(single),
        "skimage:coffee",
    ]
    # names: training by location (its holdout sorts by them), evaluation by relative name (reports, pairing)
    assert [r.name for r in train] == [r.location for r in train]
    assert [r.name for r in metrics] == [
        "a/1.jpg",
        "b/2.png",
        "z/inner.tar/i.png",
        "s-000.tar/k.png",
        "s-001.tar/l.png",
        "single.webp",
        "skimage:coffee",
    ]
    assert all(isinstance(r, Item) for r in metrics)  # one type
    for a, b in zip(train, metrics, strict=True):
        assert np.array_equal(read_image(a), read_image(b))
    assert train.skipped == metrics.skipped == []


def test_skimage_names_are_checked_when_listed():
    with pytest.raises(UserError, match="unknown scikit-image photo 'nope'"):
        list_items(["skimage:astronaut,nope"])
    assert [r.key for r in list_images("skimage:astronaut,camera")] == ["astronaut", "camera"]
