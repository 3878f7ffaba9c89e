"""PSNR / SSIM / Frechet distance / streaming accumulators: closed forms and merge invariants."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dcae.metrics.accumulate import (
    FeatureStatsAccumulator,
    LatentStatsAccumulator,
    PSNRAccumulator,
    ReconstructionMetrics,
    SSIMAccumulator,
)
from dcae.metrics.fid import (
    GaussianStats,
    fid_from_stats,
    fid_method_used,
    frechet_distance,
    frechet_distance_lowrank,
)
from dcae.metrics.psnr_ssim import psnr_per_image, quantize, ssim_per_image

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _real_images(n: int, size: int = 96) -> torch.Tensor:
    folder = DATA / "set14"
    if not folder.is_dir():
        pytest.skip(f"real test images not found at {folder} (shared data folder missing)")
    from dcae.data.images import center_crop_arr, find_images, load_image_uint8

    arrs = [center_crop_arr(load_image_uint8(p), size) for p in find_images(folder)[:n]]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------- PSNR
def test_psnr_by_hand():
    a = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    b = torch.full((1, 3, 8, 8), 10, dtype=torch.uint8)
    # MSE = 100 -> 10 log10(255^2 / 100)
    assert psnr_per_image(a, b).item() == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    # one pixel of one channel off by 255: MSE = 255^2 / 192
    c = a.clone()
    c[0, 1, 2, 3] = 255
    assert psnr_per_image(a, c).item() == pytest.approx(10 * math.log10(192), abs=1e-12)


def test_psnr_is_mean_of_per_image_values_not_pooled_mse():
    ref = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    test = ref.clone()
    test[0] = 2  # MSE 4
    test[1] = 20  # MSE 400
    acc = PSNRAccumulator()
    acc.update(ref, test)
    per_image = [10 * math.log10(255**2 / 4), 10 * math.log10(255**2 / 400)]
    assert acc.compute() == pytest.approx(sum(per_image) / 2, abs=1e-12)
    pooled = 10 * math.log10(255**2 / 202)
    assert abs(acc.compute() - pooled) > 1.0


def test_psnr_identical_images_is_inf_and_rejects_float():
    a = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.isinf(psnr_per_image(a, a)).all()
    with pytest.raises(TypeError, match="uint8"):
        psnr_per_image(a.float(), a.float())
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_per_image(a, a[:, :, :4])


def test_quantize_rounds_like_image_saving():
    from dcae.data.images import tensor_to_uint8

    x = torch.rand(2, 3, 16, 16) * 2.4 - 1.2  # also out of range values
    q = quantize(x)
    for i in range(2):
        assert np.array_equal(q[i].permute(1, 2, 0).numpy(), tensor_to_uint8(x[i]))


# ----------------------------------------------------------------------------------------- SSIM
def test_ssim_matches_torchmetrics_module_on_real_images():
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    ref = _real_images(3)
    gen = torch.Generator().manual_seed(0)
    noisy = (ref.float() + 12 * torch.randn(ref.shape, generator=gen)).clamp(0, 255).round().to(torch.uint8)
    ours = ssim_per_image(ref, noisy)
    # an independent call: the torchmetrics module, [0, 1] floats and data_range 1
    for i in range(3):
        tm = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=11, sigma=1.5)
        expected = tm(noisy[i : i + 1].double() / 255, ref[i : i + 1].double() / 255).item()
        assert ours[i].item() == pytest.approx(expected, abs=1e-6)  # the module keeps float32 states
    assert ssim_per_image(ref, ref).numpy() == pytest.approx(np.ones(3))
    assert (ours < 0.95).all()


def test_psnr_ssim_decrease_with_blur_and_noise():
    ref = _real_images(3)
    gen = torch.Generator().manual_seed(0)
    psnrs, ssims = [], []
    for sigma in (3.0, 10.0, 30.0):
        noisy = (ref.float() + sigma * torch.randn(ref.shape, generator=gen)).clamp(0, 255).round().to(torch.uint8)
        psnrs.append(psnr_per_image(ref, noisy).mean().item())
        ssims.append(ssim_per_image(ref, noisy).mean().item())
    assert psnrs[0] > psnrs[1] > psnrs[2]
    assert ssims[0] > ssims[1] > ssims[2]


# ----------------------------------------------------------------------------------------- Frechet
def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    for method in ("sqrtm", "eigh"):
        got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
        assert got == pytest.approx(expected, rel=1e-9), method
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-9)


def test_frechet_methods_agree_on_full_and_rank_deficient_covariances():
    rng = np.random.default_rng(1)
    d = 64
    mix = rng.normal(size=(d, d)) / 8
    for n1, n2 in ((300, 250), (40, 30)):  # full rank, then fewer samples than dimensions
        x = rng.normal(size=(n1, d)) @ mix
        y = rng.normal(size=(n2, d)) @ mix * 1.3 + 0.2
        a, b = FeatureStatsAccumulator(d, keep_features=n1), FeatureStatsAccumulator(d, keep_features=n2)
        a.update(torch.from_numpy(x))
        b.update(torch.from_numpy(y))
        sa, sb = a.compute(), b.compute()
        ref = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma, method="sqrtm")
        assert frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma, method="eigh") == pytest.approx(ref, rel=1e-6)
        assert frechet_distance_lowrank(sa.mu, sa.factor, sb.mu, sb.factor) == pytest.approx(ref, rel=1e-6)
        assert fid_method_used(sa, sb) == "lowrank"
        assert fid_from_stats(sa, sb, warn=False) == pytest.approx(ref, rel=1e-6)


def test_frechet_rejects_mismatched_shapes_and_methods():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="magic")


def test_feature_stats_match_numpy_and_drop_features_past_limit():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 8)) * 3 + 5
    acc = FeatureStatsAccumulator(8, keep_features=20)
    acc.update(torch.from_numpy(x[:15]))
    assert acc.features is not None
    acc.update(torch.from_numpy(x[15:]))
    stats = acc.compute()
    assert stats.count == 30
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.factor is None  # 30 > keep_features: the sqrtm path will be used
    assert fid_method_used(stats, stats) == "sqrtm"


def test_feature_stats_merge_equals_single_pass():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(37, 16)))
    single = FeatureStatsAccumulator(16)
    single.update(x)
    parts = [FeatureStatsAccumulator(16) for _ in range(3)]
    for part, chunk in zip(parts, (x[:5], x[5:20], x[20:])):
        part.update(chunk)
    merged = parts[2].merge(parts[0]).merge(parts[1])  # order must not matter
    a, b = single.compute(), merged.compute()
    assert a.count == b.count == 37
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-12)
    np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-10, atol=1e-13)
    assert fid_from_stats(a, b, warn=False) == pytest.approx(0, abs=1e-9)


def test_gaussian_stats_npz_roundtrip_and_pytorch_fid_files(tmp_path):
    rng = np.random.default_rng(4)
    acc = FeatureStatsAccumulator(6)
    acc.update(torch.from_numpy(rng.normal(size=(5, 6))))
    stats = acc.compute({"resolution": 64})
    stats.save(tmp_path / "s.npz")
    back = GaussianStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    np.testing.assert_array_equal(back.factor, stats.factor)
    assert back.count == 5 and back.meta == {"resolution": 64}
    with np.load(tmp_path / "s.npz") as data:  # what pytorch-fid reads
        np.testing.assert_array_equal(data["mu"], stats.mu)
    np.savez(tmp_path / "pt.npz", mu=stats.mu, sigma=stats.sigma)  # a file written by pytorch-fid
    plain = GaussianStats.load(tmp_path / "pt.npz")
    assert plain.count is None and plain.factor is None
    from dcae.errors import UserError

    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(UserError, match="mu"):
        GaussianStats.load(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------------------- other accumulators
def test_latent_stats_and_implied_scaling_factor():
    z = torch.tensor([[1.0, -3.0], [3.0, -1.0]]).reshape(1, 1, 2, 2)
    acc = LatentStatsAccumulator()
    acc.update(z[..., :1])
    acc.update(z[..., 1:])
    res = acc.compute()
    assert res["latent_mean"] == pytest.approx(0.0)
    assert res["latent_rms"] == pytest.approx(math.sqrt(5.0))
    assert res["implied_scaling_factor"] == pytest.approx(1 / math.sqrt(5.0))


def test_reconstruction_metrics_merge_equals_single_pass():
    gen = torch.Generator().manual_seed(5)
    real = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8, generator=gen)
    recon = (real.float() + 20 * torch.randn(real.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    z = torch.randn(6, 4, 3, 3, generator=gen)
    single = ReconstructionMetrics()
    single.update(real, recon, z)
    a, b = ReconstructionMetrics(), ReconstructionMetrics()
    a.update(real[:2], recon[:2], z[:2])
    b.update(real[2:], recon[2:], z[2:])
    merged = a.merge(b).compute()
    expected = single.compute()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key] == pytest.approx(value, rel=1e-12), key
    ssim = SSIMAccumulator()
    ssim.update(real, recon)
    assert expected["ssim"] == pytest.approx(ssim.compute())


def _all_reduce_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    real = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=gen)
    recon = real.flip(-1)
    feats = FeatureStatsAccumulator(8)
    feats.update(x[rank * 6 : (rank + 1) * 6])
    metrics = ReconstructionMetrics()
    metrics.update(real[rank * 2 : (rank + 1) * 2], recon[rank * 2 : (rank + 1) * 2], x[rank * 6 : (rank + 1) * 6])
    feats.all_reduce()
    metrics.all_reduce()
    stats = feats.compute()
    queue.put((rank, stats.mu, stats.sigma, stats.factor is not None, metrics.compute()))
    dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_across_two_processes_equals_single_pass(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    real = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=gen)
    expected = ReconstructionMetrics()
    expected.update(real, real.flip(-1), x)
    expected = expected.compute()
    for _, mu, sigma, has_factor, summary in results:
        np.testing.assert_allclose(mu, x.numpy().mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
        assert has_factor  # kept features were gathered from both ranks
        for key, value in expected.items():
            assert summary[key] == pytest.approx(value, rel=1e-12), key
