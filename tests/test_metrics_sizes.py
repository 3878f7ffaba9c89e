"""Metrics at every image size: 1 px to beyond 8K, in bounded memory, equal to the references.

SSIM is checked against torchmetrics (which unfolds the window for every pixel, so only on sizes it
can hold), PSNR against numpy; memory is the peak RSS growth of a fresh subprocess.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dcae.metrics.psnr_ssim as ps
from dcae.metrics.accumulate import PSNRAccumulator, ReconstructionMetrics, SSIMAccumulator
from dcae.metrics.psnr_ssim import SSIM_MIN_SIZE, psnr_per_image, ssim_per_image


def _noisy(ref: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = sigma * torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    return (ref.double() + noise).clamp(0, 255).round().to(torch.uint8)


def _torchmetrics_ssim(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        test.double(), ref.double(), gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=255.0, reduction="none"
    )


def _real_crops(shared_data, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    from dcae.data.images import find_images, load_image_uint8

    files = find_images(shared_data / "set14")
    out = []
    for i, (h, w) in enumerate(sizes):
        arr = load_image_uint8(files[i % len(files)])
        out.append(torch.from_numpy(np.array(arr[:h, :w], copy=True)).permute(2, 0, 1)[None].contiguous())
    return out


# ----------------------------------------------------------------------------------------- SSIM
@pytest.mark.parametrize("band_bytes", [ps.BAND_BYTES, 1])  # one band, and one row per band
@pytest.mark.parametrize("size", [(6, 6), (6, 41), (11, 11), (12, 7), (37, 64), (101, 53), (255, 257)])
def test_ssim_equals_torchmetrics_on_random_images(monkeypatch, size, band_bytes):
    monkeypatch.setattr(ps, "BAND_BYTES", band_bytes)
    gen = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    ref = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=gen)
    test = _noisy(ref, 25.0)
    test[1] = ref[1] // 2 + 60  # a contrast / brightness change, not noise
    expected = _torchmetrics_ssim(ref, test)
    assert expected.min() < 0.9
    torch.testing.assert_close(ssim_per_image(ref, test), expected, rtol=0, atol=1e-6)


def test_ssim_equals_torchmetrics_on_real_images(shared_data, monkeypatch):
    monkeypatch.setattr(ps, "BAND_BYTES", 2**20)  # several bands on these sizes
    for ref in _real_crops(shared_data, [(480, 500), (333, 257), (97, 311), (64, 15)]):
        for sigma in (2.0, 15.0):
            test = _noisy(ref, sigma)
            got, expected = ssim_per_image(ref, test), _torchmetrics_ssim(ref, test)
            assert abs(got.item() - expected.item()) < 1e-6, (tuple(ref.shape), sigma)
    ref = _real_crops(shared_data, [(200, 300)])[0]
    assert ssim_per_image(ref, ref).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (5, 500), (500, 5), (3, 9)])
def test_ssim_below_min_size_is_nan_where_torchmetrics_raises(size):
    ref = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    assert min(size) < SSIM_MIN_SIZE
    with pytest.raises(RuntimeError, match="[Pp]adding"):
        _torchmetrics_ssim(ref, ref)
    assert torch.isnan(ssim_per_image(ref, ref)).all()


# ----------------------------------------------------------------------------------------- PSNR
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (37, 64), (301, 7)])
def test_psnr_equals_numpy_at_any_size(monkeypatch, size):
    monkeypatch.setattr(ps, "PSNR_BAND_PIXELS", 1)  # a band of one row
    gen = torch.Generator().manual_seed(1)
    ref = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8, generator=gen)
    test = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8, generator=gen)
    d = ref.numpy().astype(np.float64) - test.numpy().astype(np.float64)
    expected = 10 * np.log10(255.0**2 / (d**2).reshape(3, -1).mean(axis=1))
    np.testing.assert_allclose(psnr_per_image(ref, test).numpy(), expected, rtol=1e-13)
    assert torch.isposinf(psnr_per_image(ref, ref)).all()  # identical images: +inf


# ----------------------------------------------------------------------------------------- accumulators
def test_undefined_values_are_left_out_of_means_and_counted():
    gen = torch.Generator().manual_seed(2)
    big = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=gen)
    tiny = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8, generator=gen)
    ssim, psnr = SSIMAccumulator(), PSNRAccumulator()
    values = ssim.update(big, _noisy(big, 10.0))
    assert torch.isnan(ssim.update(tiny, _noisy(tiny, 10.0))).all()
    assert ssim.compute() == pytest.approx(values.mean().item(), abs=1e-15)
    assert ssim.num_na == 1 and int(ssim.count) == 2
    psnr.update(tiny, _noisy(tiny, 10.0))
    assert math.isfinite(psnr.compute()) and psnr.num_na == 0  # PSNR is defined down to 1 px
    only_tiny = SSIMAccumulator()
    only_tiny.update(tiny, tiny)
    assert math.isnan(only_tiny.compute()) and only_tiny.num_na == 1
    merged = only_tiny.merge(ssim)
    assert merged.num_na == 2 and merged.compute() == pytest.approx(values.mean().item(), abs=1e-15)


def test_reconstruction_summary_reports_na_counts_and_json_nulls():
    from dcae.metrics.reconstruction import as_json, markdown_table, per_image_csv

    tiny = torch.randint(0, 256, (2, 3, 5, 9), dtype=torch.uint8)
    metrics = ReconstructionMetrics()
    rows = metrics.update(tiny, _noisy(tiny, 5.0))
    summary = metrics.compute()
    assert summary["num_images"] == 2 and summary["ssim_num_na"] == 2
    assert math.isnan(summary["ssim"]) and math.isfinite(summary["psnr"])
    assert as_json(summary)["ssim"] is None
    json.dumps(as_json(summary), allow_nan=False)
    table = markdown_table([{"model": "m", **summary}])
    assert "n/a" in table.splitlines()[-1]
    csv = per_image_csv([{"name": "a.png", "psnr": float(rows["psnr"][0]), "ssim": float(rows["ssim"][0])}])
    assert csv.splitlines()[1].endswith(",n/a")


def test_image_psnr_ssim_of_tiny_and_single_pixel_images():
    from dcae.models.commands import image_psnr_ssim

    one = np.array([[[10, 20, 30]]], dtype=np.uint8)
    psnr, ssim = image_psnr_ssim(one, one + 1)
    assert psnr == pytest.approx(10 * math.log10(255**2))
    assert math.isnan(ssim)
    assert image_psnr_ssim(one, one)[0] == math.inf


# ----------------------------------------------------------------------------------------- memory
MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    torch.set_num_threads(1)
    from dcae.metrics.psnr_ssim import psnr_per_image, ssim_per_image
    h, w = int(sys.argv[1]), int(sys.argv[2])
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=gen)
    b = a.flip(-1).contiguous()
    ssim_per_image(a[..., :32, :32], b[..., :32, :32])  # imports and first-call allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    p = psnr_per_image(a, b).item()
    psnr_grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    s = ssim_per_image(a, b).item()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"psnr": p, "ssim": s, "psnr_grown_mb": psnr_grown, "grown_mb": grown}))
    """
)


def _peak_growth(h: int, w: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(h), str(w)], capture_output=True, text=True, check=True, timeout=900
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_psnr_ssim_memory_does_not_grow_with_height():
    # SSIM works on bands of rows: 4096 px wide images use the same memory whatever their height.
    # torchmetrics would need 121 x 5 float64 maps of the whole image here (about 12 GB).
    res = _peak_growth(768, 4096)
    assert 0.0 < res["ssim"] < 0.1
    assert res["grown_mb"] < 600, res


@pytest.mark.slow
def test_psnr_ssim_of_a_4096_square_pair_within_1gb():
    res = _peak_growth(4096, 4096)
    assert math.isfinite(res["psnr"]) and 0.0 < res["ssim"] < 0.1
    assert res["psnr_grown_mb"] < 100, res  # a float64 difference image alone would be 384 MB
    assert res["grown_mb"] < 1024, res


# ----------------------------------------------------------------------------------------- LPIPS
def _lpips(name: str, tmp_path) -> torch.nn.Module:
    """A network of each kind. Standard LPIPS gets random trunk/head weights in torchvision's layout
    (the torchvision file may be absent offline): tiling is checked against the same network untiled,
    so the weights' values do not matter there."""
    from dcae.metrics.lpips import LPIPS, Backbone, parse_lpips_name

    net, variant = parse_lpips_name(name)
    if variant == "shift_tolerant":
        return LPIPS(net, variant)
    gen = torch.Generator().manual_seed(0)
    tv = {}
    for key, value in Backbone(net, "standard").state_dict().items():
        _, index, param = key.split(".")
        tv[f"features.{index}.{param}"] = torch.randn(value.shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5
    torch.save(tv, tmp_path / "backbone.pth")
    channels = (64, 192, 384, 256, 256) if net == "alex" else (64, 128, 256, 512, 512)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for k, c in enumerate(channels)}
    torch.save(heads, tmp_path / "heads.pth")
    return LPIPS(net, variant, backbone_weights=tmp_path / "backbone.pth", heads_weights=tmp_path / "heads.pth")


def _pair(h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h, w, generator=gen) * 2 - 1
    return x, (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


# (name, image height, width, tile): tiles far smaller than the receptive field, odd sizes, and
# sizes where the tap grids are coarser than the tile grid.
TILING_CASES = [
    ("stlpips-alex", 700, 500, 160),
    ("stlpips-alex", 97, 131, 40),
    ("lpips-alex", 233, 301, 64),
    ("stlpips-vgg", 150, 111, 48),
    ("lpips-vgg", 131, 150, 48),
]


@pytest.mark.parametrize(("name", "h", "w", "tile"), TILING_CASES)
def test_lpips_tiled_equals_untiled(tmp_path, name, h, w, tile):
    from dcae.metrics.lpips_tiled import lpips_tiled

    model = _lpips(name, tmp_path)
    x, y = _pair(h, w)
    with torch.no_grad():
        expected = model(x, y)
    got = lpips_tiled(model, x, y, tile=tile)
    assert expected.item() > 1e-4
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("name", ["stlpips-alex", "lpips-alex", "stlpips-vgg", "lpips-vgg"])
def test_lpips_min_size_is_where_the_network_starts_to_run(tmp_path, name):
    from dcae.metrics.lpips_tiled import lpips_any_size, min_size

    model = _lpips(name, tmp_path)
    n = min_size(model)
    x, y = _pair(n, n + 3)
    with torch.no_grad():
        assert math.isfinite(model(x, y).item())  # the plain network runs at the minimum ...
        with pytest.raises(RuntimeError):
            model(x[..., :-1, :], y[..., :-1, :])  # ... and fails one row below it
    assert math.isfinite(lpips_any_size(model, x, y).item())
    for h, w in [(1, 1), (n - 1, 300), (300, n - 1)]:
        assert torch.isnan(lpips_any_size(model, *_pair(h, w))).all()


LPIPS_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    torch.set_num_threads(1)
    from dcae.metrics.lpips import LPIPS
    from dcae.metrics.lpips_tiled import lpips_any_size
    model = LPIPS("alex")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 1024, 1024, generator=gen) * 2 - 1
    y = x.flip(-1).contiguous()
    with torch.no_grad():
        model(x[..., :64, :64], y[..., :64, :64])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    value = lpips_any_size(model, x, y).item()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"lpips": value, "grown_mb": grown}))
    """
)


@pytest.mark.slow
def test_lpips_of_a_megapixel_pair_is_tiled_in_bounded_memory():
    # The untiled shift-tolerant AlexNet needs about 1.7 GB here (stride-1 first conv, 64 channels);
    # tiles of TILE px keep it near 0.5 GB whatever the image size.
    out = subprocess.run(
        [sys.executable, "-c", LPIPS_MEMORY_SCRIPT], capture_output=True, text=True, check=True, timeout=900
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.0 < res["lpips"] < 1.0
    assert res["grown_mb"] < 800, res


# ----------------------------------------------------------------------------------------- CLI
def test_metrics_command_on_tiny_and_normal_images(tmp_path, capsys):
    """`dcae metrics` on 1 px, 5x3 px and 40x30 px pairs: no crash, SSIM / LPIPS n/a where undefined."""
    from PIL import Image

    from dcae.cli import main

    gen = np.random.default_rng(0)
    (tmp_path / "ref").mkdir()
    (tmp_path / "test").mkdir()
    for name, (h, w) in {"a1x1.png": (1, 1), "b5x3.png": (3, 5), "c40x30.png": (30, 40)}.items():
        img = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "ref" / name)
        Image.fromarray(255 - img).save(tmp_path / "test" / name)
    argv = ["metrics", tmp_path / "ref", tmp_path / "test", "--json", tmp_path / "m.json", "--csv", tmp_path / "m.csv"]
    rc = main([str(a) for a in argv + ["--no-progress"]])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["num_pairs"] == 3 and res["ssim_num_na"] == 2 and res["lpips_num_na"] == 2
    assert res["ssim"] is not None and res["lpips"] is not None  # the mean of the one 40x30 pair
    assert "(2 n/a)" in out
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[1].count("n/a") == 2 and "n/a" not in rows[3]


def test_lpips_of_uint8_images_tiled_equals_the_plain_forward(tmp_path, monkeypatch):
    """uint8 pairs (what the accumulators pass) are mapped to [-1, 1] tile by tile, with the same result."""
    from dcae.metrics import lpips_tiled as lt
    from dcae.metrics.accumulate import LPIPSAccumulator
    from dcae.metrics.psnr_ssim import to_unit_range

    model = _lpips("stlpips-alex", tmp_path)
    gen = torch.Generator().manual_seed(4)
    ref = torch.randint(0, 256, (2, 3, 97, 131), dtype=torch.uint8, generator=gen)
    test = _noisy(ref, 20.0)
    with torch.no_grad():
        expected = model(to_unit_range(ref), to_unit_range(test))
    monkeypatch.setattr(lt, "UNTILED_PIXELS", 0)  # force tiling
    monkeypatch.setattr(lt, "TILE", 40)
    acc = LPIPSAccumulator(model)
    torch.testing.assert_close(acc.update(ref, test).float(), expected, rtol=2e-6, atol=0)
