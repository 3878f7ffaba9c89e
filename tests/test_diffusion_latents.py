"""`dcae latents` and LatentDataset: content, labels, resume after an interruption, input errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcae.cli import main as cli
from dcae.data.images import ImageReadError, center_crop_arr, load_image_uint8, uint8_to_tensor
from dcae.diffusion.c2i.latents import LatentDataset, extract_latents
from dcae.diffusion.cache import read_index
from dcae.errors import NonFiniteError, UserError
from dcae.models import DCAE, DCAEConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Subprocesses get one thread, like the test process (conftest): two would fight over two busy cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_autoencoder(seed: int = 0) -> DCAE:
    """A random f4c8 DC-AE: real code path, tiny enough for CPU tests."""
    torch.manual_seed(seed)
    cfg = DCAEConfig(
        name="tiny-f4c8",
        latent_channels=8,
        encoder_widths=(16, 32, 32),
        encoder_depths=(0, 1, 1),
        encoder_block_types=("ResBlock",) * 3,
        decoder_widths=(16, 32, 32),
        decoder_depths=(0, 1, 1),
        decoder_block_types=("ResBlock",) * 3,
        decoder_norms=("trms2d",) * 3,
        decoder_acts=("silu",) * 3,
        scaling_factor=0.5,
    )
    return DCAE.from_config(cfg).eval()


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ae") / "tiny"
    tiny_autoencoder().save_pretrained(path)
    return path


def write_images(root: Path, names: list[str], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for k, name in enumerate(names):
        h, w = 40 + 7 * k % 30, 52 - 3 * k % 20  # mixed sizes and aspect ratios
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(arr)
        (img.convert("L") if k == 1 else img).save(path)  # one grayscale file
        paths.append(path)
    return paths


def test_extract_folders_flip_and_read_back(tmp_path):
    names = [f"{c}/img{i}.png" for c in ("zebra", "apple") for i in range(3)]
    files = write_images(tmp_path / "data", names)
    ae = tiny_autoencoder()
    index = extract_latents(
        ae,
        tmp_path / "data",
        tmp_path / "lat",
        model_name="tiny",
        resolution=32,
        flip=True,
        batch_size=2,
        shard_size=4,
        num_workers=0,
        progress=False,
    )
    assert index.complete and index.latent_shape == (8, 8, 8) and index.scaling_factor == 0.5
    assert index.class_names == ["apple", "zebra"] and index.label_source == "folders"
    assert [s.count for s in index.shards] == [4, 2]
    assert read_index(tmp_path / "lat").complete
    all_latents = torch.cat([LatentDataset(tmp_path / "lat", use_flip=False)[i][0] for i in range(6)])
    assert abs(index.latent_rms - all_latents.square().mean().sqrt().item()) < 1e-4

    ds = LatentDataset(tmp_path / "lat", use_flip=False)
    assert len(ds) == 6 and ds.num_classes == 2 and ds.latent_shape == (8, 8, 8)
    # find_images sorts paths: apple/* first, label 0
    order = sorted(files)
    for i, path in enumerate(order):
        x = uint8_to_tensor(center_crop_arr(load_image_uint8(path), 32))[None]
        with torch.no_grad():
            expected = ae.encode(x) * 0.5
        z, y = ds[i]
        torch.testing.assert_close(z, expected[0], atol=1e-5, rtol=1e-5)
        assert int(y) == (0 if "apple" in str(path) else 1)

    # Flipped copies: roughly half the items per epoch, a fixed choice per (epoch, index).
    flipped = LatentDataset(tmp_path / "lat", use_flip=True)
    chosen = [[not torch.equal(flipped[i][0], ds[i][0]) for i in range(6)] for _ in range(2)]
    assert chosen[0] == chosen[1]
    picks = []
    for epoch in range(20):
        flipped.set_epoch(epoch)
        picks += [not torch.equal(flipped[i][0], ds[i][0]) for i in range(6)]
    assert 0.3 < sum(picks) / len(picks) < 0.7
    lazy = LatentDataset(tmp_path / "lat", use_flip=False, in_memory=False)  # memory-mapped reads
    assert all(torch.equal(lazy[i][0], ds[i][0]) for i in range(6))


def test_imagenet_style_names_and_labels_files(tmp_path):
    names = ["n02000000_zebra_fish.png", "n01000000_apple.png", "n01000000_apple_2.png"]
    write_images(tmp_path / "data", names)
    ae = tiny_autoencoder()
    kw = dict(resolution=16, num_workers=0, progress=False)
    index = extract_latents(ae, tmp_path / "data", tmp_path / "a", **kw)
    assert index.label_source == "filenames"
    assert index.class_ids == ["n01000000", "n02000000"] and index.class_names == ["apple", "zebra fish"]
    assert [int(LatentDataset(tmp_path / "a")[i][1]) for i in range(3)] == [0, 0, 1]

    (tmp_path / "labels.txt").write_text(
        "# file label\nn01000000_apple.png\tcat\nn01000000_apple_2.png dog\nn02000000_zebra_fish.png,cat\n"
    )
    index = extract_latents(ae, tmp_path / "data", tmp_path / "b", labels_file=tmp_path / "labels.txt", **kw)
    assert index.class_names == ["cat", "dog"] and index.label_source == "file"
    assert [int(LatentDataset(tmp_path / "b")[i][1]) for i in range(3)] == [0, 1, 0]

    (tmp_path / "labels.json").write_text(json.dumps({"n01000000_apple.png": 7, "n01000000_apple_2.png": 7}))
    with pytest.raises(UserError, match="no label for 1 image"):
        extract_latents(ae, tmp_path / "data", tmp_path / "c", labels_file=tmp_path / "labels.json", **kw)

    index = extract_latents(ae, tmp_path / "data", tmp_path / "d", unconditional=True, **kw)
    assert index.num_classes == 0 and int(LatentDataset(tmp_path / "d")[0][1]) == -1


def test_resume_recomputes_only_missing_or_broken_shards(tmp_path):
    write_images(tmp_path / "data", [f"im{i}.png" for i in range(7)])
    ae = tiny_autoencoder()
    kw = dict(model_name="tiny", resolution=16, shard_size=2, num_workers=0, progress=False)
    extract_latents(ae, tmp_path / "data", tmp_path / "lat", **kw)
    shards = sorted((tmp_path / "lat").glob("shard-*.safetensors"))
    assert len(shards) == 4
    reference = LatentDataset(tmp_path / "lat")
    ref = [reference[i][0] for i in range(7)]

    # What a kill leaves behind: a missing shard, a stale temp file, a truncated shard, an unfinished index.
    shards[1].unlink()
    (tmp_path / "lat" / ".shard-00001.safetensors.abc.tmp").write_bytes(b"partial")
    shards[2].write_bytes(shards[2].read_bytes()[:100])
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    index["complete"] = False
    (tmp_path / "lat" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="has not finished"):
        LatentDataset(tmp_path / "lat")
    os.utime(shards[0], (1, 1))
    os.utime(shards[3], (1, 1))

    index = extract_latents(ae, tmp_path / "data", tmp_path / "lat", **kw)
    assert index.complete
    assert shards[0].stat().st_mtime == 1 and shards[3].stat().st_mtime == 1  # kept
    assert shards[1].stat().st_mtime > 1 and shards[2].stat().st_mtime > 1  # recomputed
    again = LatentDataset(tmp_path / "lat")
    assert all(torch.equal(again[i][0], ref[i]) for i in range(7))


def test_input_errors(tmp_path):
    ae = tiny_autoencoder()
    kw = dict(resolution=16, num_workers=0, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        extract_latents(ae, tmp_path / "empty", tmp_path / "o1", **kw)
    with pytest.raises(UserError, match="does not exist"):
        extract_latents(ae, tmp_path / "missing", tmp_path / "o1", **kw)
    write_images(tmp_path / "data", ["a.png", "b.png"])
    with pytest.raises(UserError, match="multiple"):
        extract_latents(ae, tmp_path / "data", tmp_path / "o1", resolution=18, num_workers=0, progress=False)
    extract_latents(ae, tmp_path / "data", tmp_path / "o2", **kw)
    with pytest.raises(UserError, match="different run"):
        extract_latents(ae, tmp_path / "data", tmp_path / "o2", resolution=32, num_workers=0, progress=False)
    extract_latents(
        ae, tmp_path / "data", tmp_path / "o2", resolution=32, overwrite=True, num_workers=0, progress=False
    )
    assert LatentDataset(tmp_path / "o2").latent_shape == (8, 8, 8)
    # A shard of another plan with the right count is never taken as done (a process of a multi-GPU run
    # could otherwise keep it): the shard of the first run, put back, is recomputed.
    (tmp_path / "o5").mkdir()
    extract_latents(ae, tmp_path / "data", tmp_path / "o5", **{**kw, "resolution": 16})
    stale = (tmp_path / "o5" / "shard-00000.safetensors").read_bytes()
    extract_latents(ae, tmp_path / "data", tmp_path / "o5", overwrite=True, **{**kw, "resolution": 32})
    index = json.loads((tmp_path / "o5" / "index.json").read_text())
    (tmp_path / "o5" / "shard-00000.safetensors").write_bytes(stale)
    index["complete"] = False
    (tmp_path / "o5" / "index.json").write_text(json.dumps(index))
    extract_latents(ae, tmp_path / "data", tmp_path / "o5", **{**kw, "resolution": 32})
    assert LatentDataset(tmp_path / "o5")[0][0].shape == (8, 8, 8)
    with pytest.raises(UserError, match="not a latent folder"):
        LatentDataset(tmp_path / "data")

    (tmp_path / "data" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageReadError, match="c.png"):
        extract_latents(ae, tmp_path / "data", tmp_path / "o3", **kw)
    (tmp_path / "data" / "c.png").unlink()

    with torch.no_grad():
        next(ae.encoder.parameters()).fill_(float("nan"))  # broken weights
    with pytest.raises(NonFiniteError, match="NaN"):
        extract_latents(ae, tmp_path / "data", tmp_path / "o4", **kw)


def test_cli_latents(tmp_path, ae_dir, capsys):
    write_images(tmp_path / "data", ["x/a.png", "y/b.png", "y/c.png"])
    args = [
        "latents",
        "--model",
        str(ae_dir),
        "--data",
        str(tmp_path / "data"),
        "-o",
        str(tmp_path / "lat"),
        "--resolution",
        "16",
        "--workers",
        "0",
        "--flip",
    ]
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert "3 images -> 1 shards" in captured.out
    rms = read_index(tmp_path / "lat").latent_rms
    assert ("far from 1" in captured.err) == (not 0.5 < rms < 2.0)
    index = read_index(tmp_path / "lat")
    assert index.autoencoder == str(ae_dir.resolve()) and index.flip and index.num_classes == 2
    assert (tmp_path / "lat" / "files.txt").read_text().split() == ["x/a.png", "y/b.png", "y/c.png"]
    assert cli(args) == 0  # a rerun resumes: nothing left to do
    assert cli([*args[:-1], "--resolution", "32"]) == 2  # a different plan is refused with exit status 2
    assert "different run" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_latents_survives_sigkill(tmp_path, ae_dir):
    """Kill the real command mid-run; the rerun finishes and equals an uninterrupted extraction."""
    write_images(tmp_path / "data", [f"im{i:02d}.png" for i in range(24)])
    cmd = [
        sys.executable,
        "-m",
        "dcae.cli",
        "latents",
        "--model",
        str(ae_dir),
        "--data",
        str(tmp_path / "data"),
        "--resolution",
        "256",
        "--shard-size",
        "2",
        "--batch-size",
        "1",
        "--workers",
        "0",
    ]
    proc = subprocess.Popen([*cmd, "-o", str(tmp_path / "lat")], stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not list((tmp_path / "lat").glob("shard-*.safetensors")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((tmp_path / "lat").glob("shard-*.safetensors")))
    assert 1 <= done < 12, f"the kill should interrupt the run ({done} of 12 shards written)"
    assert not read_index(tmp_path / "lat", complete=False).complete
    subprocess.run([*cmd, "-o", str(tmp_path / "lat")], check=True, stderr=subprocess.DEVNULL, env=ENV)
    subprocess.run([*cmd, "-o", str(tmp_path / "ref")], check=True, stderr=subprocess.DEVNULL, env=ENV)
    a, b = LatentDataset(tmp_path / "lat"), LatentDataset(tmp_path / "ref")
    assert len(a) == len(b) == 24
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(24))


@pytest.mark.skipif(not (SHARED / "imagenet-samples").is_dir(), reason=f"{SHARED / 'imagenet-samples'} missing")
def test_real_imagenet_photos(tmp_path):
    files = sorted((SHARED / "imagenet-samples").glob("*.JPEG"))[:4]
    for f in files:
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f.name).symlink_to(f)
    index = extract_latents(
        tiny_autoencoder(), tmp_path / "data", tmp_path / "lat", resolution=64, num_workers=0, progress=False
    )
    assert index.label_source == "filenames" and index.class_ids[0] == "n01440764"
    assert index.class_names[0] == "tench"
    z, y = LatentDataset(tmp_path / "lat")[0]
    assert z.shape == (8, 16, 16) and torch.isfinite(z).all() and int(y) == 0


@pytest.mark.slow
def test_cli_latents_on_two_processes_equals_one(tmp_path, ae_dir):
    """`torchrun -m dcae.cli latents`: each process writes every other shard; the folder equals a
    1-process run's (same latents, labels and index), and is marked complete once."""
    from test_train_helpers import torchrun_dcae

    write_images(tmp_path / "data", [f"{c}/{i}.png" for c in ("x", "y") for i in range(5)])
    common = ["latents", "--model", str(ae_dir), "--data", str(tmp_path / "data"), "--resolution", "16",
              "--workers", "0", "--shard-size", "3", "--flip"]  # fmt: skip
    assert cli([*common, "-o", str(tmp_path / "one")]) == 0
    torchrun = torchrun_dcae()
    proc = subprocess.run([*torchrun, *common, "-o", str(tmp_path / "two")], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("10 images -> 4 shards") == 1 and "complete" in proc.stdout
    one, two = LatentDataset(tmp_path / "one", use_flip=False), LatentDataset(tmp_path / "two", use_flip=False)
    assert len(one) == len(two) == 10
    for i in range(10):
        assert torch.equal(one[i][0], two[i][0]) and one[i][1] == two[i][1]
    assert read_index(tmp_path / "two").latent_rms == pytest.approx(read_index(tmp_path / "one").latent_rms)


@pytest.mark.slow
def test_cli_latents_compiled_equals_eager(tmp_path, ae_dir):
    """`dcae latents --compile` (torch.compile with Inductor, channels-last) writes the latents the eager
    fast path writes, to float rounding."""
    write_images(tmp_path / "data", ["a.png", "b.png", "c.png"])
    common = ["latents", "--model", str(ae_dir), "--data", str(tmp_path / "data"), "--resolution", "16",
              "--workers", "0", "--batch-size", "3"]  # fmt: skip
    assert cli([*common, "-o", str(tmp_path / "eager")]) == 0
    from torch._dynamo.utils import counters

    counters.clear()
    assert cli([*common, "-o", str(tmp_path / "compiled"), "--compile"]) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # the encoder really went through torch.compile
    eager, compiled = LatentDataset(tmp_path / "eager"), LatentDataset(tmp_path / "compiled")
    for i in range(3):
        a, b = eager[i][0], compiled[i][0]
        assert ((a - b).norm() / a.norm()).item() < 1e-5
