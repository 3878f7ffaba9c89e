"""Fuzzing what dcae reads back of its own latents: files of `dcae encode` through `dcae decode` (bytes,
tensor headers and the dcae metadata damaged), and `dcae latents` folders (index.json and shards) through
LatentDataset. Each gives a result or one line naming the file, and `dcae decode` writes whole images only."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from fuzz_helpers import (
    FUZZ,
    assert_one_line_naming,
    join_safetensors,
    mutated_bytes,
    mutated_json,
    result_or_one_line,
    split_safetensors,
    time_limit,
)
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from test_diffusion_latents import tiny_autoencoder

from dcae.cli import main
from dcae.diffusion.c2i.latents import LatentDataset, extract_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A tiny autoencoder folder, two photos and their `dcae encode --scaled` latents file."""
    root = tmp_path_factory.mktemp("enc")
    tiny_autoencoder().save_pretrained(root / "ae")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(16, 24), (13, 8)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    lat = root / "lat.safetensors"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "encode",
                    str(root / "p0.png"),
                    str(root / "p1.png"),
                    "-o",
                    str(lat),
                    "--model",
                    str(root / "ae"),
                    "--scaled",
                ]
            )
            == 0
        )
    return root, lat.read_bytes()


_runs = iter(range(10**9))


def _decode(root, blob: bytes) -> None:
    """`dcae decode` of a damaged latents file: exit 0 / 1 / 2 with one line per problem naming the file,
    never an exception out of main, and only whole, readable PNG files in the output folder."""
    k = next(_runs)
    lat, out = root / f"damaged-{k}.safetensors", root / f"out-{k}"
    lat.write_bytes(blob)
    err = io.StringIO()
    with time_limit(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["decode", str(lat), "-o", str(out), "--model", str(root / "ae")])
    assert rc in (0, 1, 2)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("dcae: error:")]
    assert "Traceback" not in err.getvalue()
    if rc == 2:
        assert len(lines) == 1, err.getvalue()
        assert_one_line_naming(lines[0], lat)
    for png in out.glob("*") if out.exists() else []:
        assert png.suffix == ".png", f"left behind: {png}"
        with Image.open(png) as im:
            im.load()


@FUZZ
@given(data=st.data())
def test_decode_damaged_bytes(encoded, data):
    root, blob = encoded
    _decode(root, data.draw(mutated_bytes(blob)))


@FUZZ
@given(data=st.data())
def test_decode_damaged_metadata(encoded, data):
    """The dcae metadata (model, scaling, per-image key, file, height, width) with fields of other values and
    types, removed or added: the field that was not anticipated is where tracebacks came from."""
    root, blob = encoded
    header, body = split_safetensors(blob)
    meta = json.loads(header["__metadata__"]["dcae"])
    header["__metadata__"]["dcae"] = json.dumps(data.draw(mutated_json(meta)))
    _decode(root, join_safetensors(header, body))


@FUZZ
@given(data=st.data())
def test_decode_lying_tensor_headers(encoded, data):
    """A tensor's dtype, shape or offsets changed: the header lies about the bytes behind it."""
    root, blob = encoded
    header, body = split_safetensors(blob)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    damaged = data.draw(mutated_json(tensors))
    _decode(root, join_safetensors({"__metadata__": header["__metadata__"], **damaged}, body))


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("lat")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "data" / c / f"{i}.png")
    extract_latents(tiny_autoencoder(), root / "data", root / "latents", model_name="tiny", resolution=16, flip=True,
                    shard_size=4, num_workers=0, progress=False)  # fmt: skip
    return root / "latents"


def _read_all(folder) -> None:
    ds = LatentDataset(folder, use_flip=True)
    for i in range(len(ds)):
        z, y = ds[i]
        assert z.ndim == 3 and y.ndim == 0


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@FUZZ
@given(data=st.data())
def test_latent_folder_damaged_index(latent_folder, tmp_path_factory, data):
    folder = _copy(latent_folder, tmp_path_factory.mktemp("idx") / "latents")
    index = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps(data.draw(mutated_json(index))))
    result_or_one_line(lambda: _read_all(folder), folder / "index.json", (str(folder),))


@FUZZ
@given(data=st.data())
def test_latent_folder_damaged_shard(latent_folder, tmp_path_factory, data):
    folder = _copy(latent_folder, tmp_path_factory.mktemp("shard") / "latents")
    shard = sorted(folder.glob("shard-*.safetensors"))[data.draw(st.integers(0, 1))]
    blob = shard.read_bytes()
    if data.draw(st.booleans(), label="header"):
        header, body = split_safetensors(blob)
        blob = join_safetensors(data.draw(mutated_json(header)), body)
    else:
        blob = data.draw(mutated_bytes(blob))
    shard.write_bytes(blob)
    result_or_one_line(lambda: _read_all(folder), shard, (str(folder),))
