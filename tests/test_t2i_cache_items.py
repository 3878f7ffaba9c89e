"""What a text cache leaves out, said: exact duplicates (a source given twice, a manifest row repeating an image
and caption) are skipped, named and counted in `dcae t2i cache`; at training start, buckets smaller than the
batch (never trained) are named in one warning line, a large remainder of the others in another, and a batch
that no bucket fills is one error line giving the largest batch_size that trains."""

from __future__ import annotations

import json

import pytest
from test_t2i import _cli, cache  # noqa: F401

from dcae.diffusion.cache import read_index
from dcae.diffusion.t2i.encoders import all_minilm_l6_v2
from dcae.diffusion.train.data import data_batches, open_cache
from dcae.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mixed(cache):  # noqa: F811
    """A cache of images given twice (a folder twice, a manifest repeating three of its rows): three square
    images and one wide, each once, and one of the square images with a second caption."""
    root = cache.parent / "mixed"
    data = root / "data"
    data.mkdir(parents=True)
    for i, name in enumerate(["0", "2", "4", "1"]):  # 0, 2, 4 square; 1 wide (the fixture's images)
        (data / f"{name}.png").write_bytes((cache.parent / "data" / f"{name}.png").read_bytes())
        (data / f"{name}.txt").write_text(f"caption {i}")
    rows = [("data/0.png", "caption 0"), ("data/0.png", "caption 0"), ("./data/0.png", "another caption"),
            ("data/2.png", "caption 1")]  # fmt: skip
    (root / "m.jsonl").write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
    rc, err = _cli("t2i", "cache", "--data", data, f"{data}/", root / "m.jsonl", "--model", cache.parent / "ae",
                   "--text-encoder", all_minilm_l6_v2(), "-o", root / "cache", "--resolution", 32,
                   "--max-tokens", 16)  # fmt: skip
    assert rc == 0, err
    return root, err.splitlines()


def test_duplicates_are_skipped_named_and_counted(mixed):
    root, messages = mixed
    index = read_index(root / "cache")
    captions = [json.loads(line) for line in (root / "cache" / "captions.jsonl").read_text().splitlines()]
    assert sorted((c["image"], c["caption"]) for c in captions) == [
        ("0.png", "caption 0"), ("1.png", "caption 3"), ("2.png", "caption 1"), ("4.png", "caption 2"),
        ("data/0.png", "another caption"),
    ]  # fmt: skip
    assert index.num_images == 5 and len(index.skipped) == 4, index.skipped
    repeated, *rows = index.skipped
    assert "given twice" in repeated and str(root / "data") in repeated
    for line, first in ((1, "0.png"), (2, "0.png"), (4, "2.png")):  # rows 1, 2 and 4 repeat the folder's items
        assert any(f"{root / 'm.jsonl'}:{line}: " in r and f"listed already ({first})" in r for r in rows), rows
    assert [m for m in messages if "given twice" in m] == [f"dcae: warning: skipping repeated source: {repeated}"]


def test_buckets_smaller_than_the_batch_are_named_at_training_start(mixed, capsys):
    root, _ = mixed
    ds = open_cache(root / "cache")
    assert ds.untrained(2) == {(24, 40): (1, 1), (32, 32): (4, 0)} and ds.untrained(3) == {(24, 40): (1, 1),
                                                                                         (32, 32): (4, 1)}  # fmt: skip
    next(data_batches(ds, 2, 0, 0, 1, 0))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dcae: warning: 1 of the 5 images are never trained"), err
    assert "24x40 (1)" in err and "batch of 2" in err and "at most 1" in err
    next(data_batches(ds, 3, 0, 0, 1, 0))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "1 of the 5 images are left out of each epoch" in lines[1], lines
    next(data_batches(ds, 3, 0, 1, 3, 0))  # the second of three processes says nothing
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError, match=r"no resolution bucket of the 5 images fills a batch of 8: .*24x40 \(1\), "
                       r"32x32 \(4\); batch_size 4 or less would train"):  # fmt: skip
        next(data_batches(ds, 8, 0, 0, 1, 0))
