"""LPIPS perceptual distance, implemented here (no torchvision), as a metric and a training loss.

Two families, always labelled in results:

- ``stlpips-vgg`` / ``stlpips-alex``: shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022). Backbone and
  linear heads come from one state dict shipped by the PyPI package ``stlpips-pytorch``
  (``weights/vST0.0/{vgg,alex}_shift_tolerant.pth``), so this works offline. The networks below
  reproduce that package's ``invariant_networks.py`` / ``models_lpf`` layer by layer: max-pools with
  stride 1 followed by a reflect-padded binomial blur-pool that does the striding, and module indices
  that give the exact state-dict keys (``net.slice2.5.filt`` ...), loaded with ``strict=True``.
- ``lpips-vgg`` / ``lpips-alex``: the standard LPIPS v0.1 (Zhang et al. 2018; what torchmetrics and the
  DC-AE paper report, with AlexNet). Needs the torchvision ImageNet backbone file
  (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``: taken from torch's hub cache, or downloaded
  there) and the linear heads of the ``lpips`` package (installed with ``--no-deps``).

Inputs are images in [-1, 1] (``normalize=True`` accepts [0, 1]); the result is one distance per image.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from dcae.metrics.weights import MissingWeightsError, lpips_heads, stlpips_weights, torchvision_backbone

NETS = ("vgg", "alex")
VARIANTS = ("shift_tolerant", "standard")
LPIPS_NAMES = ("stlpips-vgg", "stlpips-alex", "lpips-vgg", "lpips-alex")
CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}


class BlurPool2d(nn.Module):
    """Anti-aliased downsampling (Zhang 2019, 'Making CNNs shift-invariant again'): reflect pad, then a
    normalised binomial filter applied per channel with stride 2. The filter is a buffer named `filt`
    because the shipped state dicts store it under that name."""

    def __init__(self, channels: int, filt_size: int = 3, stride: int = 2, pad_more: bool = True) -> None:
        super().__init__()
        # pad_more (the shift-tolerant setting) pads filt_size-1 on every side instead of half of it.
        lo, hi = (filt_size - 1, filt_size - 1) if pad_more else ((filt_size - 1) // 2, filt_size // 2)
        self.pad = (lo, hi, lo, hi)
        self.stride = stride
        row = torch.tensor([float(math.comb(filt_size - 1, k)) for k in range(filt_size)])  # 1 2 1 for 3
        filt = row[:, None] * row[None, :]
        self.register_buffer("filt", (filt / filt.sum())[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            F.pad(x, self.pad, mode="reflect"), self.filt.to(x.dtype), stride=self.stride, groups=x.shape[1]
        )


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=padding)


def _vgg16_layers(shift_tolerant: bool) -> list[nn.Module]:
    """torchvision VGG16 `features` (config D); shift-tolerant: each max-pool becomes stride-1 + blur-pool."""
    layers: list[nn.Module] = []
    cin = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            if shift_tolerant:
                layers += [nn.MaxPool2d(kernel_size=2, stride=1), BlurPool2d(cin)]
            else:
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            layers += [_conv(cin, v), nn.ReLU()]
            cin = v
    return layers


def _alexnet_layers(shift_tolerant: bool) -> list[nn.Module]:
    """torchvision AlexNet `features`; shift-tolerant: stride-1 first conv, blur-pool doing every stride."""
    if not shift_tolerant:
        return [
            _conv(3, 64, 11, 4, 2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            _conv(64, 192, 5, 1, 2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            _conv(192, 384),
            nn.ReLU(),
            _conv(384, 256),
            nn.ReLU(),
            _conv(256, 256),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
        ]
    return [
        _conv(3, 64, 11, 1, 2),
        BlurPool2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 1),
        BlurPool2d(64),
        _conv(64, 192, 5, 1, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 1),
        BlurPool2d(192),
        _conv(192, 384),
        nn.ReLU(),
        _conv(384, 256),
        nn.ReLU(),
        _conv(256, 256),
        nn.ReLU(),
    ]


# Where each of the five feature taps ends, as [start, end) indices into `features`; the indices are
# kept as module names so that state-dict keys read `sliceK.<index>.weight` like the originals.
SLICE_BOUNDS = {
    ("vgg", "shift_tolerant"): (0, 4, 10, 18, 26, 34),
    ("vgg", "standard"): (0, 4, 9, 16, 23, 30),
    ("alex", "shift_tolerant"): (0, 3, 7, 11, 13, 15),
    ("alex", "standard"): (0, 2, 5, 8, 10, 12),
}


class Backbone(nn.Module):
    """Five sequential slices of a VGG16/AlexNet trunk; forward returns the five tapped activations."""

    def __init__(self, net: str, variant: str) -> None:
        super().__init__()
        st = variant == "shift_tolerant"
        layers = _vgg16_layers(st) if net == "vgg" else _alexnet_layers(st)
        bounds = SLICE_BOUNDS[(net, variant)]
        for k in range(5):
            seq = nn.Sequential()
            for i in range(bounds[k], bounds[k + 1]):
                seq.add_module(str(i), layers[i])
            self.add_module(f"slice{k + 1}", seq)
        self.bounds = bounds

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(5):
            x = getattr(self, f"slice{k + 1}")(x)
            outs.append(x)
        return outs


class ScalingLayer(nn.Module):
    """LPIPS v0.1 input normalisation ([-1, 1] -> roughly ImageNet mean/std)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)


class NetLinLayer(nn.Module):
    """1x1 conv head; the Dropout at index 0 is kept (inactive in eval) only so keys read `model.1.weight`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # In fp32: under bf16 autocast the squared norm of 512 channels loses too many bits.
    x = x.float()
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def parse_lpips_name(name: str) -> tuple[str, str]:
    """'stlpips-vgg' -> ('vgg', 'shift_tolerant'); 'lpips-alex' -> ('alex', 'standard')."""
    family, _, net = name.lower().partition("-")
    variants = {"stlpips": "shift_tolerant", "lpips": "standard"}
    if family not in variants or net not in NETS:
        raise ValueError(f"unknown LPIPS network {name!r}; choose one of {', '.join(LPIPS_NAMES)}")
    return net, variants[family]


def lpips_name(net: str, variant: str) -> str:
    return f"{'stlpips' if variant == 'shift_tolerant' else 'lpips'}-{net}"


class LPIPS(nn.Module):
    """LPIPS distance / perceptual loss. ``LPIPS(x, y)`` with x, y (B, 3, H, W) in [-1, 1] -> (B,).

    Weights are loaded at construction and frozen; the module stays in eval mode even when a parent
    calls ``.train()`` (the heads' Dropout must never be active), but gradients flow to the inputs, so
    it can be used directly as a training loss: ``loss = l1 + w * LPIPS()(recon, target).mean()``.

    ``variant="standard"`` needs the torchvision AlexNet/VGG16 ImageNet file (``backbone_weights``, else
    from torch's hub cache or downloaded there) and the ``lpips`` package's heads (or ``heads_weights``).
    """

    def __init__(
        self,
        net: str = "vgg",
        variant: str = "shift_tolerant",
        *,
        weights: str | os.PathLike | None = None,
        backbone_weights: str | os.PathLike | None = None,
        heads_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
        if variant not in VARIANTS:
            raise ValueError(f"LPIPS variant must be one of {VARIANTS}, got {variant!r}")
        self.net_type, self.variant = net, variant
        self.name = lpips_name(net, variant)
        self.scaling_layer = ScalingLayer()
        self.net = Backbone(net, variant)
        for k, ch in enumerate(CHANNELS[net]):
            self.add_module(f"lin{k}", NetLinLayer(ch))
        if variant == "shift_tolerant":
            state = _load_state(weights or stlpips_weights(net))
        else:
            state = self._standard_state(backbone_weights, heads_weights)
        self.load_state_dict(state, strict=True)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_name(cls, name: str, **kwargs) -> LPIPS:
        """Build from a result label such as 'stlpips-alex' or 'lpips-vgg'."""
        net, variant = parse_lpips_name(name)
        return cls(net, variant, **kwargs)

    def _standard_state(self, backbone: str | os.PathLike | None, heads: str | os.PathLike | None) -> dict:
        backbone = backbone or torchvision_backbone(self.net_type)
        state = torchvision_features_to_slices(_load_state(backbone), self.net.bounds)
        state.update(_load_state(heads or lpips_heads(self.net_type)))
        # The scaling constants are not stored in the lpips heads file; they are fixed by the method.
        state.update({f"scaling_layer.{k}": v for k, v in self.scaling_layer.state_dict().items()})
        return state

    def train(self, mode: bool = True) -> LPIPS:
        # Always eval: a frozen metric network; Dropout in the heads would make the loss random.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (B, 3, H, W) tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if normalize:  # [0, 1] -> [-1, 1]
            x, y = 2 * x - 1, 2 * y - 1
        # One trunk pass for both images halves the Python overhead and keeps BN-free nets exact.
        feats = self.net(self.scaling_layer(torch.cat([x, y])))
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for k, f in enumerate(feats):
            f0, f1 = _unit_normalize(f).chunk(2)
            lin = getattr(self, f"lin{k}")
            total = total + lin((f0 - f1).pow(2).to(lin.model[1].weight.dtype)).float().mean(dim=(1, 2, 3))
        return total


# A name for what training code imports: the same module, used as a loss.
PerceptualLoss = LPIPS


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"LPIPS weight file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return dict(state)


def torchvision_features_to_slices(state: dict[str, torch.Tensor], bounds: tuple[int, ...]) -> dict:
    """torchvision `features.<i>.<param>` keys -> our `net.slice<k>.<i>.<param>` (classifier dropped)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if "features" not in parts:
            continue
        idx_pos = parts.index("features") + 1
        i = int(parts[idx_pos])
        k = next((k for k in range(5) if bounds[k] <= i < bounds[k + 1]), None)
        if k is not None:
            out[f"net.slice{k + 1}.{i}.{'.'.join(parts[idx_pos + 1 :])}"] = value
    if not out:
        raise MissingWeightsError("the LPIPS backbone file has no torchvision 'features.<i>.*' keys")
    return out
