"""Numerical parity with diffusers' AutoencoderDC, for every released configuration.

Full-width models are expensive on CPU, so each configuration is also checked at 1/8 width with the
same structure (blocks, depths, norms, shortcuts); f32c32-in and sana-1.0 run once at full width.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderDC

from dcae import DCAE, get_config, list_models
from dcae.models.convert import original_to_diffusers, to_diffusers_config


def narrow(name: str, factor: int = 8):
    cfg = get_config(name)
    return dataclasses.replace(
        cfg,
        name=f"{name}-narrow",
        latent_channels=cfg.latent_channels // factor,
        encoder_widths=tuple(w // factor for w in cfg.encoder_widths),
        decoder_widths=tuple(w // factor for w in cfg.decoder_widths),
    )


def randomize_norms(model: torch.nn.Module) -> None:
    """Non-trivial norm parameters and BatchNorm statistics, so that they are really compared (ours, or
    diffusers' own model: its RMSNorm)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if type(m).__name__ in ("RMSNorm2d", "RMSNorm", "BatchNorm2d") and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)


def diffusers_twin(model: DCAE) -> AutoencoderDC:
    cfg = {k: v for k, v in to_diffusers_config(model.config).items() if not k.startswith("_")}
    twin = AutoencoderDC(**cfg).eval()
    twin.load_state_dict(original_to_diffusers(model.state_dict()), strict=True)
    return twin


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_parity(model: DCAE, height: int, width: int) -> tuple[float, float]:
    twin = diffusers_twin(model)
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z, z_ref = model.encode(x), twin.encode(x).latent
        # Decode the same latents on both sides, so decoder errors are measured on their own.
        y, y_ref = model.decode(z_ref), twin.decode(z_ref).sample
    assert z.shape == z_ref.shape and y.shape == y_ref.shape
    return rel_err(z, z_ref), rel_err(y, y_ref)


@pytest.mark.parametrize("name", list_models())
def test_parity_with_diffusers_narrow(name: str) -> None:
    torch.manual_seed(0)
    model = DCAE.from_config(narrow(name)).eval()
    randomize_norms(model)
    f = model.spatial_compression
    enc, dec = check_parity(model, 2 * f, 3 * f)  # non-square: catches H/W mix-ups in the attention reshape
    assert enc < 1e-5, f"encode relative error {enc:.2e}"
    assert dec < 1e-5, f"decode relative error {dec:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.0"])
def test_parity_with_diffusers_full_width(name: str) -> None:
    torch.manual_seed(0)
    model = DCAE.from_config(name).eval()
    randomize_norms(model)
    enc, dec = check_parity(model, 64, 96)
    assert enc < 1e-5 and dec < 1e-5, (enc, dec)


@pytest.mark.parametrize(
    "name, params_m, keys",
    [
        ("dc-ae-f32c32-in-1.0", 323.4, 338),
        ("dc-ae-f32c32-sana-1.0", 312.3, None),
        ("dc-ae-f64c128-in-1.0", 676.9, None),
        ("dc-ae-f128c512-in-1.0", 1120.7, None),
    ],
)
def test_released_sizes(name: str, params_m: float, keys: int | None) -> None:
    """Parameter counts of the paper / reference code and the key count of the released checkpoint."""
    with torch.device("meta"):
        model = DCAE.from_config(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == params_m
    if keys is not None:
        assert len(model.state_dict()) == keys
    enc = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    if name == "dc-ae-f32c32-in-1.0":
        assert round(enc, 1) == 123.2


def test_linear_and_quadratic_attention_agree() -> None:
    """The two attention paths compute the same kernel; the switch at N <= head dim is only for speed."""
    from dcae.models.layers import relu_linear_attention, relu_quadratic_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(2, 3, 32, 20, generator=g) for _ in range(3))
    torch.testing.assert_close(relu_linear_attention(q, k, v), relu_quadratic_attention(q, k, v), rtol=1e-5, atol=1e-6)
