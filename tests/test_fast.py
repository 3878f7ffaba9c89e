"""The fast inference path (dcae.models.fast, dcae.models.winograd) against the eager modules.

The fast path is on by default for inference, so `model.encode/decode` under no_grad use it; the
eager reference is the same model with `disable_fast_path()`. Tolerances: 1e-5 relative in fp32
(Winograd F(4x4,3x3) adds ~3e-6 per conv; the parity tests against diffusers use the same bound).
"""

from __future__ import annotations

import copy
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dcae import DCAE, list_models
from dcae.models import fast, fast_triton, winograd
from dcae.models.layers import RMSNorm2d, relu_linear_attention

sys.path.insert(0, str(Path(__file__).parent))
from test_models_parity import narrow, randomize_norms  # noqa: E402
from test_tiling import TINY, images, rel_err  # noqa: E402


def eager_and_fast(model: DCAE, x: torch.Tensor, **options):
    with torch.no_grad():
        model.disable_fast_path()
        z0 = model.encode(x)
        y0 = model.decode(z0)
        model.enable_fast_path(**options)
        z1 = model.encode(x)
        y1 = model.decode(z0)
    return z0, y0, z1, y1


# ----------------------------------------------------------------------------- Winograd
@pytest.mark.parametrize("b, c, co, h, w", [(1, 64, 64, 16, 16), (2, 96, 128, 13, 7), (1, 128, 64, 33, 40)])
def test_winograd_conv_matches_fp64_reference(b: int, c: int, co: int, h: int, w: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(co, c, 3, 3, generator=g, dtype=torch.float64) / (3 * c**0.5)
    bias = torch.randn(co, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, weight, bias, padding=1)
    u = winograd.winograd_weight(weight.float())
    for layout in (torch.contiguous_format, torch.channels_last):
        y = winograd.conv3x3_winograd(x.float().contiguous(memory_format=layout), u, bias.float())
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(y, ref) < 1e-5
        assert rel_err(F.conv2d(x.float(), weight.float(), bias.float(), padding=1), ref) < 1e-6


def test_winograd_chunking_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 64, 40, 24)
    u = winograd.winograd_weight(torch.randn(64, 64, 3, 3) / 24)
    whole = winograd.conv3x3_winograd(x, u)
    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 1)  # one tile row per chunk
    torch.testing.assert_close(winograd.conv3x3_winograd(x, u), whole, rtol=0, atol=0)


# ----------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("name", list_models())
def test_fast_path_matches_eager(name: str) -> None:
    torch.manual_seed(0)
    model = DCAE.from_config(narrow(name, 4)).eval()
    randomize_norms(model)
    f = model.spatial_compression
    x = images(2 * f, 3 * f, b=2)
    z0, y0, z1, y1 = eager_and_fast(model, x)
    assert z1.shape == z0.shape and y1.shape == y0.shape
    assert z1.is_contiguous() and y1.is_contiguous()
    assert rel_err(z1, z0) < 1e-5 and rel_err(y1, y0) < 1e-5


def test_fast_path_uses_winograd_and_folds_batchnorm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The f32c32-in decoder's ResBlocks at 64 px: BN folded, 3x3 convs through Winograd, still exact."""
    torch.manual_seed(0)
    model = DCAE.from_config(narrow("dc-ae-f32c32-in-1.0", 4)).eval()
    randomize_norms(model)
    calls = []
    original = winograd.conv3x3_winograd
    monkeypatch.setattr(winograd, "conv3x3_winograd", lambda *a, **k: calls.append(1) or original(*a, **k))
    z0, y0, z1, y1 = eager_and_fast(model, images(128, 96))
    assert len(calls) > 10
    assert rel_err(z1, z0) < 1e-5 and rel_err(y1, y0) < 1e-5
    folded = [v for v in model._fast._cache.values() if "fold" in v]
    assert folded, "no BatchNorm was folded"


def test_fast_path_only_for_inference() -> None:
    model = DCAE.from_config(TINY)
    x = images(64, 64)
    model.train()
    with torch.no_grad():
        assert model._fast_path() is None  # training mode: BatchNorm statistics must update
    model.eval()
    assert model._fast_path() is None  # autograd on
    with torch.no_grad():
        assert model._fast_path() is not None
    y = model.decode(model.encode(x))
    assert y.requires_grad


def test_weight_changes_invalidate_caches() -> None:
    torch.manual_seed(0)
    model = DCAE.from_config(narrow("dc-ae-f32c32-in-1.0", 4)).eval()
    x = images(96, 64)
    with torch.no_grad():
        model.decode(model.encode(x))  # fills the caches
        for p in model.decoder.parameters():
            p.mul_(1.01)  # in place, like an optimizer step
        for m in model.decoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(1.5)
    z0, y0, z1, y1 = eager_and_fast(model, x)
    assert rel_err(y1, y0) < 1e-5


def test_copies_and_pickles_drop_caches() -> None:
    model = DCAE.from_config(TINY).eval()
    with torch.no_grad():
        model.decode(model.encode(images(64, 64)))
    clone = copy.deepcopy(model)
    assert len(clone._fast._cache) == 0
    restored = pickle.loads(pickle.dumps(model))
    assert restored.fast_path_enabled and len(restored._fast._cache) == 0


def test_bf16_fast_path_close_to_eager() -> None:
    torch.manual_seed(0)
    model = DCAE.from_config(narrow("dc-ae-f32c32-sana-1.0", 8)).eval().to(torch.bfloat16)
    z0, y0, z1, y1 = eager_and_fast(model, images(64, 96))
    assert z1.dtype == torch.bfloat16 and rel_err(z1, z0) < 2e-2 and rel_err(y1, y0) < 2e-2


def test_large_maps_run_in_bands_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention and GLU blocks on big maps run in row bands (two passes for attention): same result."""
    torch.manual_seed(0)
    model = DCAE.from_config(narrow("dc-ae-f32c32-sana-1.0", 8)).eval()  # multi-scale attention: halo rows
    randomize_norms(model)
    x = images(256, 192)
    with torch.no_grad():
        z0, y0 = model.encode(x), model.decode(model.encode(x))
        model.enable_fast_path(band_elements=4096)
        z1, y1 = model.encode(x), model.decode(z0)
    assert rel_err(z1, z0) < 1e-5 and rel_err(y1, y0) < 1e-5


def test_token_attention_matches_eager_kernel() -> None:
    g = torch.Generator().manual_seed(0)
    b, heads, d, h, w = 2, 3, 32, 5, 9
    qkv = torch.randn(b, heads * 3 * d, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    t = qkv.permute(0, 2, 3, 1).reshape(b, h * w, heads, 3 * d)
    out = fast.relu_linear_attention_tokens(t, d)  # (B, N, heads, d)
    q, k, v = qkv.reshape(b, heads, 3 * d, h * w).chunk(3, dim=2)
    ref = relu_linear_attention(F.relu(q), F.relu(k), v)  # (B, heads, d, N)
    torch.testing.assert_close(out.permute(0, 2, 3, 1), ref, rtol=1e-5, atol=1e-6)


def test_rms_norm_channels_last_matches_module() -> None:
    norm = RMSNorm2d(48)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 48, 7, 5).contiguous(memory_format=torch.channels_last) * 10
    y = fast.FastPath().rms_norm(norm, x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, norm(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fp16
def test_fp16_overflow_scan_and_fallback() -> None:
    torch.manual_seed(0)
    model = DCAE.from_config(TINY).eval()
    x = images(64, 64)
    with torch.no_grad():
        model.decoder.stages[1].op_list[1].main.conv1.conv.weight.mul_(3e4)  # force an fp16 overflow there
        ref = model.decode(model.encode(x))
    scan = fast.fp16_overflow_scan(model, x)
    assert "decoder.stages.1" in scan["fp32_units"] and "encoder.project_in" not in scan["fp32_units"]
    assert model.fast_path_enabled  # the scan restores the fast path
    half = copy.deepcopy(model).half()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = half.decode(half.encode(x))
    assert any("overflowed" in str(w.message) for w in caught)
    assert torch.isfinite(y).all() and rel_err(y, ref) < 5e-2
    half.enable_fast_path(fp32_units=scan["fp32_units"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the plan keeps fp16 finite without the fallback
        y2 = half.decode(half.encode(x))
    assert rel_err(y2, ref) < 5e-2


# ----------------------------------------------------------------------------- compile, Triton, CUDA graphs
def test_eager_modules_compile_without_graph_breaks() -> None:
    import torch._dynamo

    model = DCAE.from_config(narrow("dc-ae-f32c32-sana-1.0", 16)).eval()
    x = images(64, 64)
    with torch.no_grad():
        enc = torch._dynamo.explain(model.encoder)(x)
        dec = torch._dynamo.explain(model.decoder)(model.encoder(x))
    assert enc.graph_break_count == 0 and dec.graph_break_count == 0, enc.break_reasons + dec.break_reasons


def test_compile_dcae_wiring() -> None:
    """compile_dcae: eager modules, channels-last, compiled in place (the 'eager' backend keeps it quick;
    the benchmark uses Inductor)."""
    model = DCAE.from_config(TINY).eval()
    x = images(64, 64)
    with torch.no_grad():
        ref = model.decode(model.encode(x))
        compiled = fast.compile_dcae(copy.deepcopy(model), backend="eager")
        assert not compiled.fast_path_enabled
        y = compiled.decode(compiled.encode(x.contiguous(memory_format=torch.channels_last)))
    assert rel_err(y, ref) < 1e-5


@pytest.mark.skipif(fast_triton.triton is None, reason="Triton is not installed (the dev install has it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels, h, w", [(96, 9, 11), (20, 1, 1), (160, 17, 23), (7, 3, 5)])
def test_triton_kernels_match_torch(dtype: torch.dtype, channels: int, h: int, w: int) -> None:
    """Every kernel against the PyTorch op it replaces, over odd shapes (masks at every block edge) and
    fp32/bf16/fp16 inputs; on a GPU, or on CPU through Triton's interpreter (TRITON_INTERPRET=1, which
    tests/conftest.py sets before triton is imported)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not fast_triton.available():
        pytest.skip("no CUDA and TRITON_INTERPRET=1 not set")
    g = torch.Generator().manual_seed(channels * h * w)
    x = (
        (torch.randn(2, channels, h, w, generator=g) * 5)
        .to(device, dtype)
        .contiguous(memory_format=torch.channels_last)
    )
    norm = RMSNorm2d(channels).to(device)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=g), norm.bias.normal_(0.0, 0.3, generator=g)
    y = fast_triton.rms_norm_channels_last(x, norm.weight, norm.bias, norm.eps)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    # Both compute in fp32 and round once to the output dtype: equal up to one rounding step of that dtype.
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(y.float(), norm(x).float(), rtol=tol, atol=tol)
    for heads in (1, 3):
        qkv = torch.randn(2, 3 * 32 * heads, h, w, generator=g).to(device, dtype)
        t = qkv.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(2, h * w, heads, 96)
        torch.testing.assert_close(
            fast_triton.relu_linear_attention_tokens(t, 32), fast.relu_linear_attention_tokens(t, 32),
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager() -> None:
    model = DCAE.from_config(TINY).eval().cuda()
    x = images(128, 128).cuda()
    graphed = fast.GraphedDCAE(model)
    with torch.inference_mode():
        z = model.encode(x)
        torch.testing.assert_close(graphed.encode(x), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graphed.decode(z), model.decode(z), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(fast_triton.triton is None, reason="Triton is not installed (the dev install has it)")
def test_fast_path_with_triton_kernels_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels wired into whole models (token views of channels-last qkv, bands, multi-scale heads)."""
    if not fast_triton.available():
        pytest.skip("no CUDA and TRITON_INTERPRET=1 not set")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(fast.FastPath, "_kernels", lambda self, x: fast_triton)
    torch.manual_seed(0)
    model = DCAE.from_config(narrow("dc-ae-f32c32-sana-1.0", 16)).eval().to(device)
    randomize_norms(model)
    z0, y0, z1, y1 = eager_and_fast(model, images(96, 64).to(device), band_elements=1 << 13)
    assert rel_err(z1, z0) < 1e-5 and rel_err(y1, y0) < 1e-5


def test_cudnn_autotune_touches_only_the_benchmark_flag_and_restores_it() -> None:
    from dcae.models.fast import _cudnn_autotune

    cudnn = torch.backends.cudnn
    before = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32)
    with _cudnn_autotune(True):
        assert cudnn.benchmark and (cudnn.deterministic, cudnn.allow_tf32) == before[1:]
    assert (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32) == before
    with pytest.raises(RuntimeError), _cudnn_autotune(True):
        raise RuntimeError("a failing call")
    assert cudnn.benchmark == before[0]
    with _cudnn_autotune(False):
        assert cudnn.benchmark == before[0]


def test_kernel_check_accepts_correct_and_rejects_broken_kernels() -> None:
    """Before a FastPath uses Triton it checks the kernels against PyTorch on small inputs; a kernel that
    fails to compile or computes wrongly turns Triton off (with a warning) instead of breaking inference."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from dcae.models import fast

    def rms(x, w, b, eps):
        return F.rms_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, eps).add(b).permute(0, 3, 1, 2)

    good = SimpleNamespace(rms_norm_channels_last=rms, relu_linear_attention_kv=fast.relu_linear_attention_kv,
                           relu_linear_attention_apply=fast.relu_linear_attention_apply)  # fmt: skip
    cpu = torch.device("cpu")
    assert fast.check_kernels(good, cpu) is None

    def fails(*args):
        raise RuntimeError("PassManager::run failed\nlong compiler log")

    def no_relu_on_k(t, d):  # a plausible kernel bug: keys not rectified
        _, k, v = t.float().split(d, dim=-1)
        return torch.einsum("bnhd,bnhe->bhde", k, v), k.sum(dim=1)

    broken = SimpleNamespace(**{**vars(good), "rms_norm_channels_last": fails})
    assert fast.check_kernels(broken, cpu) == "RuntimeError: PassManager::run failed"
    wrong = SimpleNamespace(**{**vars(good), "relu_linear_attention_kv": no_relu_on_k})
    assert "linear attention kernel differs from PyTorch" in fast.check_kernels(wrong, cpu)


def test_a_failing_fast_path_falls_back_to_the_eager_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast path that raises where the eager modules work (a GPU library we never met) costs speed, not
    the result: the eager modules answer, the fast path is switched off, a warning says so. An input the
    eager modules reject too is an error as before, and the fast path stays on."""
    from dcae.models.autoencoder import FastPathFallbackWarning
    from dcae.models.fast import FastPath

    torch.manual_seed(0)
    model = DCAE.from_config(TINY).eval()
    z = torch.randn(1, 32, 4, 3)
    with torch.no_grad():
        reference = model.decoder(z)

    def broken(self, decoder, z):
        raise RuntimeError("CUDA error: misaligned address\\nCUDA kernel errors might be reported later")

    monkeypatch.setattr(FastPath, "decode", broken)
    with torch.inference_mode(), pytest.warns(FastPathFallbackWarning, match="misaligned address"):
        out = model.decode(z)
    assert torch.equal(out, reference) and not model.fast_path_enabled
    model.enable_fast_path()
    with torch.inference_mode(), pytest.raises(ValueError, match="the latents have 8 channels; tiny-f32 decodes 32"):
        model.decode(torch.randn(1, 8, 4, 3))
    # Both fail: the error is the eager one, and the fast path is not blamed.
    monkeypatch.setattr(model.decoder, "forward", lambda z: (_ for _ in ()).throw(RuntimeError("eager fails")))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="eager fails"):
        model.decode(z)
    assert model.fast_path_enabled
