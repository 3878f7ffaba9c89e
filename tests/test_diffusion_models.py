"""DiT / U-ViT: shapes, adaLN-zero init, U-ViT long skips, named sizes, attention, checkpointing, compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcae.diffusion.nets import (
    DiT,
    UViT,
    create_diffusion_model,
    list_diffusion_models,
    set_grad_checkpointing,
)
from dcae.diffusion.nets.layers import sincos_pos_embed_2d
from dcae.errors import UnknownModelError


def tiny(family: str, **kw):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10)
    args.update(kw)
    return (DiT if family == "DiT" else UViT)(**args)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move away from the zero init so outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def inputs(b: int = 3, c: int = 4, s: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, c, s, s, generator=g), torch.tensor([0.0, 500.0, 999.0])[:b], torch.tensor([1, 2, 3])[:b]


@pytest.mark.parametrize("family", ["DiT", "UViT"])
@pytest.mark.parametrize("patch", [1, 2])
def test_output_shapes(family, patch):
    x, t, y = inputs()
    model = tiny(family, patch_size=patch)
    assert model(x, t, y).shape == x.shape
    sigma = tiny(family, patch_size=patch, learn_sigma=True)
    assert sigma(x, t, y).shape == (3, 8, 8, 8)  # prediction + variance channels
    uncond = tiny(family, patch_size=patch, num_classes=0)
    assert uncond(x, t, None).shape == x.shape


def test_dit_adaln_zero_outputs_zero_at_init_but_learns():
    x, t, y = inputs()
    model = tiny("DiT")
    out = model(x, t, y)
    assert torch.count_nonzero(out) == 0
    # Zero output must not mean a dead network: the zero-initialised output layer reads the (unmodulated)
    # normalised features, so it receives a gradient and training moves everything else after one step.
    F.mse_loss(out, torch.randn_like(out)).backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_uvit_long_skips():
    depth = 6
    model = randomize(tiny("UViT", depth=depth))
    assert len(model.in_blocks) == len(model.out_blocks) == depth // 2
    skip_layers = [m for m in model.modules() if getattr(m, "skip_linear", None) is not None]
    assert len(skip_layers) == depth // 2
    calls = []
    for block in model.out_blocks:
        block.skip_linear.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-1]))
    x, t, y = inputs()
    model(x, t, y)
    assert calls == [2 * 64] * (depth // 2)  # each out-block concatenated one skip with its input
    # The first in-block output reaches the last out-block through the skip only: zeroing that skip weight's
    # half that reads it changes the output.
    before = model(x, t, y)
    with torch.no_grad():
        model.out_blocks[-1].skip_linear.weight[:, 64:] = 0
    assert not torch.allclose(before, model(x, t, y))


@pytest.mark.parametrize("family", ["DiT", "UViT"])
def test_condition_changes_output(family):
    model = randomize(tiny(family))
    x, t, y = inputs()
    base = model(x, t, y)
    assert not torch.allclose(base, model(x, t + 100, y))
    assert not torch.allclose(base, model(x, t, (y + 1) % 10))
    # No labels means the null class.
    assert torch.allclose(model(x, t, None), model(x, t, torch.full_like(y, 10)))


@pytest.mark.parametrize(
    "name,params_m",
    [("DiT-XL/2", 675.1), ("DiT-S/2", 33.0), ("DiT-B/2", 130.5), ("UViT-H/2", 501.0), ("UViT-S/2", 44.8)],
)
def test_named_sizes_match_papers(name, params_m):
    with torch.device("meta"):  # count parameters without allocating them
        model = create_diffusion_model(name, in_channels=4, input_size=32, num_classes=1000, learn_sigma="DiT" in name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.01, n


def test_registry_names_and_errors():
    names = list_diffusion_models()
    assert "DiT-XL/1" in names and "UViT-H/1" in names and "UViT-2B/1" in names
    m = create_diffusion_model("dit-s/1", in_channels=32, input_size=16, depth=2)
    assert isinstance(m, DiT) and len(m.blocks) == 2 and m.patch_size == 1
    with pytest.raises(UnknownModelError):
        create_diffusion_model("DiT-Q/2", 4, 32)
    with pytest.raises(UnknownModelError):
        create_diffusion_model("UViT-XL/2", 4, 32)
    with pytest.raises(ValueError):
        create_diffusion_model("DiT-S/3", 4, 32)  # 32 is not divisible by 3


def test_attention_matches_reference_softmax():
    model = randomize(tiny("DiT"))
    attn = model.blocks[0].attn
    x = torch.randn(2, 16, 64)
    B, N, C, H = 2, 16, 64, 4
    q, k, v = attn.qkv(x).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / (C // H) ** 0.5, dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_pos_embed_is_sincos_per_axis():
    pe = sincos_pos_embed_2d(16, 4)
    assert pe.shape == (16, 16)
    # Tokens in one row share the row half (second half of the channels), tokens in one column the first half.
    assert torch.allclose(pe[0, 8:], pe[3, 8:]) and not torch.allclose(pe[0, :8], pe[3, :8])
    assert torch.allclose(pe[0, :8], pe[4, :8]) and not torch.allclose(pe[0, 8:], pe[4, 8:])


@pytest.mark.parametrize("family", ["DiT", "UViT"])
def test_gradient_checkpointing_same_gradients(family):
    torch.manual_seed(0)
    model = randomize(tiny(family))
    x, t, y = inputs()

    def grads():
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    set_grad_checkpointing(model, True)
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["DiT", "UViT"])
def test_bf16_autocast_runs(family):
    model = randomize(tiny(family))
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), model(x, t, y), atol=0.1, rtol=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["DiT", "UViT"])
def test_compiles_without_graph_breaks(family):
    torch._dynamo.reset()
    model = randomize(tiny(family))
    set_grad_checkpointing(model, True)
    model.train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph raises on any graph break
    x, t, y = inputs()
    compiled(x, t, y).sum().backward()
    model.eval()
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
