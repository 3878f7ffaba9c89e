"""The released DC-AE class-conditional ImageNet 512x512 diffusion models (DC-Gen `c2i_model_zoo`).

Each name maps to our DiT or UViT built with the released structural options (`released_layout`: the
checkpoints' key names; UViT `adaptive_channel` for the DC-AE 1.5 models), wrapped so that the state dict
carries the checkpoints' `diffusion_model.` prefix. A release is a Hub repo `mit-han-lab/<name>` or a local
folder with `config.json` = {"model_name": NAME} and `model.safetensors`.

Families and the samplers they were evaluated with (DC-Gen's configs):
- dit:  DiT-XL, eps + learned sigma, DDPM 250 respaced steps; the network sees the integer step index.
- sit:  DiT-XL backbone, flow (SiT linear path, velocity), dopri5; t in [0, 1] with 0 = noise, unscaled.
- uvit: UViT-S/H/2B, eps, U-ViT's DPM-Solver (30 evaluations); the network sees continuous t x 1000.
- usit: UViT backbone with the SiT transport (as sit).
- usit_dcae15: usit on DC-AE 1.5 latents with adaptive channels (any leading subset of the 128).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from dcae.diffusion.conditioning import Condition
from dcae.diffusion.nets import DiT, UViT
from dcae.errors import UnknownModelError, UserError, WeightsError
from dcae.models.weights import hub_snapshot, state_dict_problems

HUB_ORG = "mit-han-lab"
PREFIX = "diffusion_model."
NULL_CLASS = 1000  # ImageNet: classes 0..999, row 1000 of the label table is the unconditional class


@dataclass(frozen=True)
class Family:
    backbone: str  # "dit" or "uvit"
    prediction: str  # "eps" or "velocity"
    sampler: str  # default sampler ("ddpm", "dpm-solver", "dopri5")
    steps: int  # default number of steps (DDPM: respaced steps; DPM-Solver: evaluations; dopri5: output grid)
    learn_sigma: bool = False
    adaptive_channel: bool = False


FAMILIES = {
    "dit": Family("dit", "eps", "ddpm", 250, learn_sigma=True),
    "sit": Family("dit", "velocity", "dopri5", 250),
    "uvit": Family("uvit", "eps", "dpm-solver", 30),
    "usit": Family("uvit", "velocity", "dopri5", 250),
    "usit_dcae15": Family("uvit", "velocity", "dopri5", 250, adaptive_channel=True),
}

# (depth, hidden size, heads) of the released sizes
_SIZES = {"xl": (28, 1152, 16), "s": (12, 512, 8), "h": (28, 1152, 16), "2b": (28, 2048, 32), "3b": (56, 2048, 32)}
# autoencoder -> (scaling factor, latent channels, latent size at 512 px)
_AUTOENCODERS = {
    "dc-ae-f32c32-in-1.0": (0.3189, 32, 16),
    "dc-ae-f64c128-in-1.0": (0.2889, 128, 8),
    "dc-ae-f64c128-1.5": (0.5935, 128, 8),
}
# The guidance scales the DC-Gen README gives for evaluation: 1.3 for DiT-XL, 1.5 for all others.
_CFG = {"dit": 1.3}


@dataclass(frozen=True)
class ReleasedModel:
    name: str
    family: str
    size: str
    autoencoder: str

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def hub_id(self) -> str:
        return f"{HUB_ORG}/{self.name}"

    @property
    def scaling_factor(self) -> float:
        return _AUTOENCODERS[self.autoencoder][0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        _, c, s = _AUTOENCODERS[self.autoencoder]
        return (c, s, s)

    @property
    def cfg_scale(self) -> float:
        return _CFG.get(self.family, 1.5)

    def model_kwargs(self) -> dict:
        depth, hidden, heads = _SIZES[self.size]
        c, s, _ = self.latent_shape
        kw = dict(input_size=s, patch_size=1, in_channels=c, hidden_size=hidden, depth=depth, num_heads=heads,
                  mlp_ratio=4.0, num_classes=1000, learn_sigma=self.spec.learn_sigma, released_layout=True)  # fmt: skip
        if self.spec.backbone == "uvit":
            kw.update(qkv_bias=False, mlp_time_embed=False, adaptive_channel=self.spec.adaptive_channel)
        return kw


def _entries() -> dict[str, ReleasedModel]:
    f32, f64, f64_15 = "dc-ae-f32c32-in-1.0", "dc-ae-f64c128-in-1.0", "dc-ae-f64c128-1.5"
    rows = [
        ("dc-ae-f32c32-in-1.0-dit-xl-in-512px", "dit", "xl", f32),
        ("dc-ae-f32c32-in-1.0-dit-xl-in-512px-trainbs1024", "dit", "xl", f32),
        ("dc-ae-f32c32-in-1.0-sit-xl-in-512px", "sit", "xl", f32),
        ("dc-ae-f32c32-in-1.0-uvit-s-in-512px", "uvit", "s", f32),
        ("dc-ae-f32c32-in-1.0-uvit-h-in-512px", "uvit", "h", f32),
        ("dc-ae-f32c32-in-1.0-uvit-2b-in-512px", "uvit", "2b", f32),
        ("dc-ae-f64c128-in-1.0-uvit-h-in-512px", "uvit", "h", f64),
        ("dc-ae-f64c128-in-1.0-uvit-h-in-512px-train2000k", "uvit", "h", f64),
        ("dc-ae-f64c128-in-1.0-uvit-2b-in-512px", "uvit", "2b", f64),
        ("dc-ae-f64c128-in-1.0-uvit-2b-in-512px-train2000k", "uvit", "2b", f64),
        ("dc-ae-f32c32-in-1.0-usit-h-in-512px", "usit", "h", f32),
        ("dc-ae-f32c32-in-1.0-usit-2b-in-512px", "usit", "2b", f32),
        ("dc-ae-f64c128-1.5-usit-2b-in-512px", "usit_dcae15", "2b", f64_15),
        ("dc-ae-f64c128-1.5-usit-3b-in-512px", "usit_dcae15", "3b", f64_15),
    ]
    return {n: ReleasedModel(n, fam, size, ae) for n, fam, size, ae in rows}


RELEASED = _entries()


def list_released() -> list[str]:
    return list(RELEASED)


def get_released(name: str) -> ReleasedModel:
    """A released name or its Hub id (`mit-han-lab/<name>`)."""
    key = name.strip().removeprefix(f"{HUB_ORG}/")
    if key not in RELEASED:
        raise UnknownModelError(
            f"unknown released diffusion model {name!r}; `dcae models` lists them: {', '.join(RELEASED)}"
        )
    return RELEASED[key]


class ReleasedDiffusion(nn.Module):
    """A released model: `diffusion_model` is our DiT / UViT; the attributes say how to sample it."""

    def __init__(self, release: ReleasedModel, network: nn.Module | None = None) -> None:
        super().__init__()
        self.release = release
        cls = DiT if release.spec.backbone == "dit" else UViT
        self.diffusion_model = network if network is not None else cls(**release.model_kwargs())

    @property
    def in_channels(self) -> int:
        return self.diffusion_model.in_channels

    @property
    def num_classes(self) -> int:
        return self.diffusion_model.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition | torch.Tensor) -> torch.Tensor:
        """The network on its own time scale (see the module docstring)."""
        return self.diffusion_model(x, t, cond)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, cond: Condition, scale: float) -> torch.Tensor:
        return forward_with_cfg(self.diffusion_model, x, t, cond, scale)


def forward_with_cfg(net, x: torch.Tensor, t: torch.Tensor, cond: Condition, scale: float) -> torch.Tensor:
    """DC-Gen's guidance wrapper on a batch [cond rows; uncond rows]: it runs the network on the first half
    duplicated, guides the first `C` output channels (C = input channels) and writes the guided tensor into
    both halves; further output channels (learned variance) pass through, each half keeping its own."""
    half = x[: len(x) // 2]
    return combine_cfg(net(torch.cat([half, half]), t, cond), x.shape[1], scale)


def combine_cfg(out: torch.Tensor, channels: int, scale: float) -> torch.Tensor:
    """The guidance step of `forward_with_cfg` on the raw output of the doubled batch."""
    cond, uncond = out[:, :channels].chunk(2)
    guided = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), out[:, channels:]], dim=1)


def network_from_config(config: dict) -> DiT | UViT:
    """Our DiT / UViT from a DC-Gen pipeline config (its `model` key names the section: "dit" or "uvit"),
    e.g. a merged released config or a small test config with the same structural options."""
    kind = config["model"]
    c = config[kind]
    # options no release uses (their key layout is unknown): refused by name rather than guessed
    unsupported = {k: c[k] for k in ("post_norm", "patch_ffn_depth", "mlp_time_embed", "patch_kernel_size",
                                     "cfg_channels", "unconditional") if c.get(k)}  # fmt: skip
    if c.get("act_layer", "gelu") != "gelu":
        unsupported["act_layer"] = c["act_layer"]
    if kind not in ("dit", "uvit") or unsupported:
        raise UserError(f"unsupported DC-Gen model settings: model={kind!r} {unsupported}")
    kw = dict(input_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
              hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
              num_classes=c["num_classes"], released_layout=True)  # fmt: skip
    if kind == "dit":
        return DiT(learn_sigma=c["learn_sigma"], **kw)
    return UViT(qkv_bias=c["qkv_bias"], adaptive_channel=c["adaptive_channel"], **kw)


def build_released(name: str, device: str | torch.device = "cpu") -> ReleasedDiffusion:
    """The released architecture with random weights (device="meta": no memory, for checking shapes)."""
    release = get_released(name)
    with torch.device(device):
        model = ReleasedDiffusion(release)
    return model.eval()


# ----------------------------------------------------------------------------- loading
def _read_folder(folder: Path) -> tuple[str, Path, dict | None]:
    """(model name, weights file, optional DC-Gen config) of a release folder. The config is our extension:
    `"config"` may hold a DC-Gen pipeline config (as `network_from_config` takes) for a smaller variant of
    the released structure, e.g. a test model; released folders hold only the name."""
    config, weights = folder / "config.json", folder / "model.safetensors"
    if not config.is_file():
        raise UserError(f"{folder}: no config.json (a released diffusion model folder has config.json + "
                        "model.safetensors)")  # fmt: skip
    try:
        meta = json.loads(config.read_text())
        name = str(meta["model_name"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f'{config}: expected JSON {{"model_name": NAME}} ({type(exc).__name__}: {exc})') from exc
    if not weights.is_file():
        raise UserError(f"{folder}: no model.safetensors next to config.json")
    return name, weights, meta.get("config")


def resolve_released(source: str | os.PathLike) -> tuple[ReleasedModel, Path | str, dict | None]:
    """(release, weights file, config) for a local folder; (release, Hub repo id, None) for a released name
    or a Hub id `<org>/<released name>` (the releases live under mit-han-lab; a copy elsewhere works too)."""
    path = Path(source)
    if path.is_dir():
        name, weights, config = _read_folder(path)
        return get_released(name), weights, config
    text = str(source).strip()
    parts = text.split("/")
    if path.suffix in (".json", ".safetensors") or len(parts) > 2 or path.exists():
        raise UserError(f"{source}: no diffusion model folder there (config.json + model.safetensors)")
    if len(parts) == 2:
        if parts[1] not in RELEASED:
            raise UnknownModelError(
                f"{source}: neither a folder nor the Hub id of a released diffusion model (<org>/<name>); "
                f"`dcae models` lists the names: {', '.join(RELEASED)}"
            )
        return RELEASED[parts[1]], text, None
    release = get_released(text)
    return release, release.hub_id, None


def check_released_state_dict(model: ReleasedDiffusion, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict: the exact key set and shapes of the released model, else an error naming the file and keys."""
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        hint = _family_hint(state, model.release)
        raise WeightsError(f"weights in {source} do not fit {model.release.name!r}: " + "; ".join(problems) + hint)


def _family_hint(state: dict, release: ReleasedModel) -> str:
    """Name the likely mix-up when the file holds the other backbone's keys."""
    dit_like = any(k.startswith(PREFIX + "x_embedder.") for k in state)
    uvit_like = any(k.startswith(PREFIX + "patch_embed.") for k in state)
    found = "DiT / SiT" if dit_like else "UViT / USiT" if uvit_like else None
    want = "DiT / SiT" if release.spec.backbone == "dit" else "UViT / USiT"
    if found and found != want:
        return f" (the file holds a {found} checkpoint; {release.name} is a {want} model)"
    return ""


def _network_for(release: ReleasedModel, config: dict, source: Path) -> nn.Module:
    """A smaller network from a folder's DC-Gen config; it must keep the release's structural options."""
    try:
        network = network_from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{source}: unusable DC-Gen config ({type(exc).__name__}: {exc})") from exc
    spec = release.spec
    same = isinstance(network, DiT) == (spec.backbone == "dit") and network.learn_sigma == spec.learn_sigma
    if not same or getattr(network, "adaptive_channel", False) != spec.adaptive_channel:
        raise UserError(f"{source}: the config's model does not have the structure of {release.name} "
                        f"({release.family})")  # fmt: skip
    return network


def load_released(
    source: str | os.PathLike, device: str | torch.device = "cpu", revision: str | None = None
) -> ReleasedDiffusion:
    """A released model from its name, Hub id or local folder, in eval mode, weights checked strictly."""

    release, weights, config = resolve_released(source)
    if isinstance(weights, str):  # a Hub repo id
        folder = hub_snapshot(weights, revision)
        name, weights, config = _read_folder(folder)
        if get_released(name) != release:
            raise UserError(f"{folder / 'config.json'} names {name!r}, not {release.name!r}")
    try:
        # Straight to the device; safetensors knows "cpu" but not "cpu:0" (what a CPU torchrun process gets).
        dev = torch.device(device)
        state = load_file(str(weights), device="cpu" if dev.type == "cpu" else str(dev))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{weights}: not a readable safetensors file ({exc})") from exc
    with torch.device("meta"):
        network = _network_for(release, config, weights.parent / "config.json") if config else None
        model = ReleasedDiffusion(release, network)
    check_released_state_dict(model, state, str(weights))
    model.load_state_dict(state, assign=True)
    model.diffusion_model.pos_embed.requires_grad_(False)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- listing
def released_rows() -> list[dict]:
    """One record per released model for `dcae models` (parameter counts from a meta-device build)."""
    rows, counts = [], {}
    for name, r in RELEASED.items():
        key = tuple(sorted(r.model_kwargs().items()))
        if key not in counts:  # 14 names, 9 structures
            with torch.device("meta"):
                counts[key] = sum(p.numel() for p in ReleasedDiffusion(r).parameters())
        n_params = counts[key]
        rows.append({
            "kind": "diffusion",
            "name": name,
            "hub_id": r.hub_id,
            "family": r.family,
            "backbone": {"dit": "DiT", "uvit": "UViT"}[r.spec.backbone],
            "parameters": n_params,
            "autoencoder": r.autoencoder,
            "scaling_factor": r.scaling_factor,
            "latent_shape": list(r.latent_shape),
            "sampler": r.spec.sampler,
            "steps": r.spec.steps,
            "cfg_scale": r.cfg_scale,
            "adaptive_channels": r.spec.adaptive_channel,
        })  # fmt: skip
    return rows


def print_released_table() -> None:
    rows = [("diffusion model", "family", "params", "autoencoder", "sampler", "cfg")]
    for r in released_rows():
        sampler = f"{r['sampler']} {r['steps']}" if r["sampler"] != "dopri5" else "dopri5"
        rows.append((r["name"], r["family"], f"{r['parameters'] / 1e6:.0f}M", r["autoencoder"], sampler,
                     f"{r['cfg_scale']:g}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
