"""The autoencoder API: sizes, padding, batching, dtypes, structured latents, residual shortcuts, and
image files of every kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_models_parity import narrow

from dcae import DCAE, DCAEConfig
from dcae.data.images import ImageReadError, load_image, load_image_uint8
from dcae.errors import NonFiniteError
from dcae.models.layers import ChannelDuplicatingPixelShuffle, PixelUnshuffleChannelAveraging


@pytest.fixture(scope="module")
def model() -> DCAE:
    torch.manual_seed(0)
    return DCAE.from_config(narrow("dc-ae-f32c32-in-1.0")).eval()


def test_any_image_size_is_padded_and_cropped_back(model) -> None:
    x = torch.rand(2, 3, 45, 70) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, model.latent_channels, 2, 3)  # ceil(45/32), ceil(70/32)
        y = model.reconstruct(x)
    assert y.shape == x.shape
    # a size that is already a multiple goes through untouched
    x64 = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x64), model.encoder(x64))


def test_batch_slicing_matches_one_batch(model) -> None:
    x = torch.rand(5, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        # conv algorithms may differ with the batch size: agreement to fp32 rounding, not bitwise
        torch.testing.assert_close(model.encode(x, batch_size=2), model.encode(x), rtol=1e-5, atol=1e-5)
        z = model.encode(x)
        torch.testing.assert_close(model.decode(z, batch_size=2), model.decode(z), rtol=1e-5, atol=1e-5)


def test_scaling_helpers(model) -> None:
    z = torch.randn(1, 4, 2, 2)
    model.config.scaling_factor = 0.5
    torch.testing.assert_close(model.unscale_latents(model.scale_latents(z)), z)
    torch.testing.assert_close(model.scale_latents(z), z * 0.5)


def test_bf16_keeps_attention_and_norms_in_fp32(model) -> None:
    """bf16 weights and activations, fp32 inside the linear attention and RMS norms: close to fp32."""
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    half = DCAE.from_config(model.config).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)
    with torch.no_grad():
        ref = model.reconstruct(x)
        out = half.reconstruct(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


# The ops that only attention (token sums, matmuls) and RMS norm (mean of squares, rsqrt) use in a DC-AE;
# the convolutions, which may run in bf16, are not among them.
_FP32_ONLY_OPS = ("aten.bmm", "aten.mm", "aten.rsqrt", "aten.rms_norm", "aten._fused_rms_norm")


def _low_precision_ops(module: DCAE, x: torch.Tensor) -> tuple[set[str], set[str]]:
    """(ops of _FP32_ONLY_OPS seen, those of them that got a bf16/fp16 tensor) in one reconstruction."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen, low = set(), set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name in _FP32_ONLY_OPS:
                seen.add(name)
                if any(isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in args):
                    low.add(name)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        module.reconstruct(x)
    return seen, low


@pytest.mark.parametrize("fast_path", [False, True], ids=["eager", "fast"])
def test_bf16_attention_and_rms_norm_run_in_fp32(model, fast_path: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """At op level, not by an error bound: every matmul of the linear attention and every RMS norm op of a
    bf16 model gets fp32 tensors, on the eager modules and on the fast path. (A whole bf16 model is only
    0.017 from fp32 even with both in bf16, so an error bound cannot tell.)"""
    from dcae.models.layers import RMSNorm2d

    half = DCAE.from_config(model.config).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)
    half.enable_fast_path() if fast_path else half.disable_fast_path()
    x = (torch.rand(1, 3, 64, 64) * 2 - 1).to(torch.bfloat16)
    seen, low = _low_precision_ops(half, x)
    assert {"aten.bmm", "aten.rsqrt"} <= seen or {"aten.bmm", "aten.rms_norm"} <= seen, seen
    assert not low, f"ran in bf16: {sorted(low)}"

    # The check can fail: an RMS norm computed in the input's dtype is caught.
    def rms_in_input_dtype(self, t):
        t = t * torch.rsqrt(t.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return t * self.weight.to(t.dtype).view(1, -1, 1, 1) + self.bias.to(t.dtype).view(1, -1, 1, 1)

    monkeypatch.setattr(RMSNorm2d, "forward", rms_in_input_dtype)
    half.disable_fast_path()
    assert "aten.rsqrt" in _low_precision_ops(half, x)[1]


def test_non_finite_latents_are_refused(model) -> None:
    z = torch.zeros(1, model.latent_channels, 2, 2)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        model.decode(z, check_finite=True)


def test_structured_latent_of_dc_ae_1_5() -> None:
    """The first k channels of a DC-AE 1.5 latent are a latent on their own (sliceable in/out convs)."""
    torch.manual_seed(0)
    m = DCAE.from_config(narrow("dc-ae-1.5-f32c128")).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        full = m.encode(x)
        first = m.encode(x, latent_channels=6)
        torch.testing.assert_close(first, full[:, :6])
        # decoding k channels equals decoding with the remaining input weights zeroed
        w = m.decoder.project_in.conv.weight
        expected_in = F.conv2d(first, w[:, :6], m.decoder.project_in.conv.bias, padding=1)
        torch.testing.assert_close(m.decoder.project_in(first), expected_in)
        assert m.decode(first).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="sliceable"):
        DCAE.from_config(narrow("dc-ae-f32c32-in-1.0")).encode(x, latent_channels=2)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"latent_channels must be 1\.\.16"):
        m.encode(x, latent_channels=17)


def test_structured_latent_fast_path_and_exact_tiling() -> None:
    """Sliced DC-AE 1.5 latents take the fast path and exact tiling too: the first k channels of the
    full latent, equal to the eager sliced encode."""
    torch.manual_seed(0)
    m = DCAE.from_config(narrow("dc-ae-1.5-f32c128")).eval()
    x = torch.rand(2, 3, 128, 96) * 2 - 1
    with torch.no_grad():  # autograd on: the eager modules
        eager = m.encode(x, latent_channels=6)
    with torch.inference_mode():
        fast = m.encode(x, latent_channels=6)
        m.enable_tiling(tile_size=64)
        tiled = m.encode(x, latent_channels=6)
    assert fast.shape == tiled.shape == (2, 6, 4, 3)
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tiled, eager, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(model) -> None:
    m = DCAE.from_config(model.config)
    m.load_state_dict(model.state_dict())
    m.train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1

    def grads():
        m.zero_grad()
        m(x).square().mean().backward()
        return [p.grad.clone() for p in m.parameters()]

    torch.manual_seed(0)
    plain = grads()
    m.enable_gradient_checkpointing()
    torch.manual_seed(0)
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_updates_batchnorm_statistics_once(model) -> None:
    """The recomputation in backward must not count as a second BatchNorm update."""
    runs = []
    for checkpointing in (False, True):
        m = DCAE.from_config(model.config)
        m.load_state_dict(model.state_dict())
        m.train()
        m.enable_gradient_checkpointing(checkpointing)
        m(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1).mean().backward()
        runs.append({k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k})
    assert runs[0] and runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(v.item() == 1 for k, v in runs[1].items() if k.endswith("num_batches_tracked"))


def test_residual_shortcuts_by_hand() -> None:
    """Downsample shortcut = space-to-channel then mean of consecutive channel groups; upsample shortcut =
    repeat_interleave then channel-to-space (duplicate first, then shuffle)."""
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    down = PixelUnshuffleChannelAveraging(2, 4, 2)(x)  # 8 channels after unshuffle, groups of 2
    u = F.pixel_unshuffle(x, 2)
    torch.testing.assert_close(down, torch.stack([u[:, 2 * i : 2 * i + 2].mean(1) for i in range(4)], 1))
    up = ChannelDuplicatingPixelShuffle(4, 2, 2)(down)
    dup = torch.cat([down[:, i : i + 1].repeat(1, 2, 1, 1) for i in range(4)], 1)
    torch.testing.assert_close(up, F.pixel_shuffle(dup, 2))
    # with a group size of 1 the two shortcuts are exact inverses: the learned branch only adds a residual
    torch.testing.assert_close(ChannelDuplicatingPixelShuffle(8, 2, 2)(PixelUnshuffleChannelAveraging(2, 8, 2)(x)), x)


def test_config_validation_and_yaml(tmp_path) -> None:
    with pytest.raises(ValueError, match="encoder_depths has 2 entries"):
        DCAEConfig(encoder_depths=(1, 1))
    (tmp_path / "m.yaml").write_text("base: dc-ae-f32c32-in-1.0\nname: mine\nlatent_channels: 64\n")
    cfg = DCAEConfig.from_file(tmp_path / "m.yaml")
    assert cfg.latent_channels == 64 and cfg.hub_id is None and cfg.encoder_depths == (0, 4, 8, 2, 2, 2)
    with torch.device("meta"):
        assert DCAE.from_config(tmp_path / "m.yaml").latent_channels == 64


# ----------------------------------------------------------------------------- image files
def test_image_modes_are_converted(tmp_path) -> None:
    rgb = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0  # one transparent pixel composites on white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit PNG
    gray = load_image_uint8(tmp_path / "gray.png")
    assert gray.shape == (20, 30, 3) and (gray[..., 0] == rgb[..., 0]).all()
    a = load_image_uint8(tmp_path / "rgba.png")
    assert (a[0, 0] == 255).all() and (a[1:, 1:] == rgb[1:, 1:]).all()
    deep = load_image_uint8(tmp_path / "deep.png")
    assert np.abs(deep[..., 0].astype(int) - rgb[..., 1]).max() <= 1
    t = load_image(tmp_path / "gray.png")
    assert t.shape == (3, 20, 30) and t.min() >= -1 and t.max() <= 1


def test_corrupt_image_names_the_file(tmp_path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg")
