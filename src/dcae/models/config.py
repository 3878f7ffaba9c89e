"""DC-AE configuration: a small dataclass, loadable from YAML/JSON, plus the zoo of released models."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dcae.errors import UnknownModelError, UserError, brief
from dcae.models.layers import evit_scales

STAGE_TUPLES = (
    "encoder_widths",
    "encoder_depths",
    "encoder_block_types",
    "decoder_widths",
    "decoder_depths",
    "decoder_block_types",
    "decoder_norms",
    "decoder_acts",
)

# The residual-autoencoding switches: the stage shortcuts and the bottleneck ones.
SHORTCUTS = ("encoder_downsample_shortcut", "decoder_upsample_shortcut", "encoder_out_shortcut", "decoder_in_shortcut")


def _is_bool(cfg: DCAEConfig, name: str) -> bool:
    return isinstance(getattr(cfg, name), bool)


def expand_residual(d: dict[str, Any]) -> dict[str, Any]:
    """A mapping of DCAEConfig fields in which the shorthand `residual: false` (no residual autoencoding)
    stands for the four shortcut switches off; `residual: true` changes nothing."""
    d = dict(d)
    residual = d.pop("residual", True)
    if not isinstance(residual, bool):
        raise ValueError(f"residual must be true or false, got {residual!r}")
    if residual:
        return d
    kept_on = [name for name in SHORTCUTS if d.get(name) is True]
    if kept_on:
        raise ValueError(f"residual: false contradicts {', '.join(f'{n}: true' for n in kept_on)}")
    return {**d, **dict.fromkeys(SHORTCUTS, False)}


@dataclass
class DCAEConfig:
    """Shape of a DC-AE. One entry per stage in the per-stage tuples; compression = 2 ** (stages - 1).

    A stage with depth 0 at the start of the encoder folds into the stem (a pixel-unshuffle conv),
    and mirrors into the decoder head.
    """

    name: str = "custom"
    in_channels: int = 3
    latent_channels: int = 32
    encoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple[int, ...] = (0, 4, 8, 2, 2, 2)
    encoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EViTGLU",) * 3
    encoder_norm: str = "trms2d"
    encoder_act: str = "silu"
    encoder_downsample: str = "pixel_unshuffle"  # or "conv" (stride-2, SANA)
    # Residual autoencoding, one switch per parameter-free shortcut (see `without_residual`): off, the learned
    # layers and the parameter count stay the same. Stage downsampling: + space-to-channel, channel averaging.
    encoder_downsample_shortcut: bool = True
    encoder_out_shortcut: bool = True  # residual autoencoding at the bottleneck
    encoder_sliceable_out: bool = False  # DC-AE 1.5 structured latent
    decoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_depths: tuple[int, ...] = (0, 5, 10, 2, 2, 2)
    decoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EViTGLU",) * 3
    decoder_norms: tuple[str, ...] = ("bn2d",) * 3 + ("trms2d",) * 3
    decoder_acts: tuple[str, ...] = ("relu",) * 3 + ("silu",) * 3
    decoder_upsample: str = "pixel_shuffle"  # or "interpolate" (SANA)
    decoder_upsample_shortcut: bool = True  # stage upsampling: + channel duplicating, channel-to-space
    decoder_in_shortcut: bool = True
    decoder_sliceable_in: bool = False
    decoder_head_norm: str = "trms2d"
    decoder_head_act: str = "relu"
    # Channels per attention head in EfficientViT blocks (32 in every release; diffusers' test model uses 2).
    attention_head_dim: int = 32
    # Norm of the EfficientViT blocks' local module (GLUMBConv). None: the stage's norm, as in the original
    # code; diffusers' AutoencoderDC always uses "trms2d" there, whatever the stage's (attention) norm.
    evit_local_norm: str | None = None
    scaling_factor: float = 1.0
    # Where the released weights live (None for user-defined models).
    hub_id: str | None = None
    hub_id_diffusers: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in STAGE_TUPLES:
            value = getattr(self, name)
            if isinstance(value, str):
                n = len(self.encoder_widths if name.startswith("encoder") else self.decoder_widths)
                value = (value,) * n
            setattr(self, name, tuple(value))
        self.validate()

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.encoder_widths) - 1)

    def validate(self) -> None:
        n_enc, n_dec = len(self.encoder_widths), len(self.decoder_widths)
        problems = []
        for name in STAGE_TUPLES:
            n = n_enc if name.startswith("encoder") else n_dec
            if len(getattr(self, name)) != n:
                problems.append(f"{name} has {len(getattr(self, name))} entries, expected {n}")
        if n_enc != n_dec:
            problems.append(f"encoder has {n_enc} stages but decoder has {n_dec}")
        if self.encoder_depths and self.encoder_depths[-1] == 0:
            problems.append("the last encoder stage must have depth > 0")
        problems += self._attention_problems()
        problems += self._shortcut_problems()
        if self.encoder_out_shortcut and self.encoder_widths[-1] % self.latent_channels:
            problems.append(
                f"encoder_out_shortcut needs the last width ({self.encoder_widths[-1]}) divisible by "
                f"latent_channels ({self.latent_channels})"
            )
        if self.decoder_in_shortcut and self.decoder_widths[-1] % self.latent_channels:
            problems.append(
                f"decoder_in_shortcut needs the last width ({self.decoder_widths[-1]}) divisible by "
                f"latent_channels ({self.latent_channels})"
            )
        if problems:
            raise ValueError(f"invalid DCAEConfig {self.name!r}: " + "; ".join(problems))

    def _shortcut_problems(self) -> list[str]:
        """Switches that are not booleans, and stage shortcuts whose channels do not average/duplicate evenly."""
        problems = [f"{n} must be true or false, got {getattr(self, n)!r}" for n in SHORTCUTS if not _is_bool(self, n)]
        for side, flag in (("encoder", "encoder_downsample_shortcut"), ("decoder", "decoder_upsample_shortcut")):
            widths, depths = getattr(self, f"{side}_widths"), getattr(self, f"{side}_depths")
            for i in range(min(len(widths), len(depths)) - 1):
                # stages i and i+1 meet through a x2 space-to-channel: 4 * widths[i] against widths[i+1] channels
                if getattr(self, flag) is True and depths[i] > 0 and (4 * widths[i]) % widths[i + 1]:
                    problems.append(
                        f"{flag} needs 4 x {side}_widths[{i}] ({4 * widths[i]}) divisible by {side}_widths[{i + 1}] "
                        f"({widths[i + 1]}); or set it to false"
                    )
        return problems

    def _attention_problems(self) -> list[str]:
        """Unknown block types, and attention stages whose width is not a whole number of heads."""
        problems = []
        for side in ("encoder", "decoder"):
            for i, (kind, width) in enumerate(
                zip(getattr(self, f"{side}_block_types"), getattr(self, f"{side}_widths"))
            ):
                scales = None if kind == "ResBlock" else evit_scales(kind)
                if kind != "ResBlock" and scales is None:
                    problems.append(f"{side}_block_types[{i}] = {kind!r} is not 'ResBlock' or 'EViT[S<k>...]GLU'")
                elif scales and any(k < 1 or k % 2 == 0 for k in scales):
                    # an even kernel with k // 2 padding changes the feature size
                    problems.append(f"{side}_block_types[{i}] = {kind!r}: multi-scale kernels must be odd")
                elif kind != "ResBlock" and (self.attention_head_dim < 1 or width % self.attention_head_dim):
                    problems.append(
                        f"{side} stage {i} (width {width}) is not a whole number of attention heads of "
                        f"attention_head_dim {self.attention_head_dim}"
                    )
        return problems

    def without_residual(self) -> DCAEConfig:
        """The same network without residual autoencoding ("plain", the paper's baseline): every shortcut off,
        the same learned layers and parameters. Not a released model, so no Hub ids."""
        return dataclasses.replace(
            self,
            **dict.fromkeys(SHORTCUTS, False),
            name=self.name if self.name.endswith("-plain") else f"{self.name}-plain",
            hub_id=None,
            hub_id_diffusers=None,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DCAEConfig:
        d = expand_residual(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DCAEConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> DCAEConfig:
        """Load from .yaml/.yml/.json. A file may name a zoo model and override fields: {base: name, ...};
        `residual: false` turns every residual-autoencoding shortcut off (see `without_residual`)."""

        path = Path(path)
        try:
            text = path.read_text()
            d = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
            if not isinstance(d, dict):
                raise ValueError("expected a mapping of DCAEConfig fields")
            base = d.pop("base", None)
            if base is not None:
                d = expand_residual(d)
                return dataclasses.replace(get_config(base), **{**d, "hub_id": None, "hub_id_diffusers": None})
            return cls.from_dict(d)
        except UnknownModelError as exc:
            raise UnknownModelError(f"{path}: {exc}") from None
        except (OSError, ValueError, TypeError, LookupError, ArithmeticError, AttributeError, yaml.YAMLError) as exc:
            raise UserError(f"{path}: not a usable DCAEConfig ({type(exc).__name__}: {brief(exc)})") from None


# ----------------------------------------------------------------------------- the zoo
_ZOO: dict[str, DCAEConfig] = {}


def register(cfg: DCAEConfig) -> DCAEConfig:
    _ZOO[cfg.name] = cfg
    return cfg


def _in_mix(name: str, n_evit: int, latent: int, widths: tuple[int, ...], scaling: float) -> DCAEConfig:
    return DCAEConfig(
        name=name,
        latent_channels=latent,
        encoder_widths=widths,
        encoder_depths=(0, 4, 8) + (2,) * n_evit,
        encoder_block_types=("ResBlock",) * 3 + ("EViTGLU",) * n_evit,
        decoder_widths=widths,
        decoder_depths=(0, 5, 10) + (2,) * n_evit,
        decoder_block_types=("ResBlock",) * 3 + ("EViTGLU",) * n_evit,
        decoder_norms=("bn2d",) * 3 + ("trms2d",) * n_evit,
        decoder_acts=("relu",) * 3 + ("silu",) * n_evit,
        scaling_factor=scaling,
        hub_id=f"mit-han-lab/{name}",
        hub_id_diffusers=f"mit-han-lab/{name}-diffusers",
    )


_W6 = (128, 256, 512, 512, 1024, 1024)
for _name, _scale in [("dc-ae-f32c32-in-1.0", 0.3189), ("dc-ae-f32c32-mix-1.0", 0.4552)]:
    register(_in_mix(_name, 3, 32, _W6, _scale))
# f32c32-in trained at 256 px (same architecture), published in the original format only. Its scaling
# factor is not published with it: 1.0 until measured (`dcae eval` reports the implied factor).
register(dataclasses.replace(_in_mix("dc-ae-f32c32-in-1.0-256px", 3, 32, _W6, 1.0), hub_id_diffusers=None))
for _name, _scale in [("dc-ae-f64c128-in-1.0", 0.2889), ("dc-ae-f64c128-mix-1.0", 0.4538)]:
    register(_in_mix(_name, 4, 128, _W6 + (2048,), _scale))
for _name, _scale in [("dc-ae-f128c512-in-1.0", 0.4883), ("dc-ae-f128c512-mix-1.0", 0.3620)]:
    register(_in_mix(_name, 5, 512, _W6 + (2048, 2048), _scale))

_SANA_ENCODER = dict(
    encoder_widths=_W6,
    encoder_depths=(2, 2, 2, 3, 3, 3),
    encoder_block_types=("ResBlock",) * 3 + ("EViTS5GLU",) * 3,
    encoder_downsample="conv",
)
for _name in ("dc-ae-f32c32-sana-1.0", "dc-ae-f32c32-sana-1.1"):
    register(
        DCAEConfig(
            name=_name,
            latent_channels=32,
            **_SANA_ENCODER,
            decoder_widths=_W6,
            decoder_depths=(3, 3, 3, 3, 3, 3),
            decoder_block_types=("ResBlock",) * 3 + ("EViTS5GLU",) * 3,
            decoder_norms=("trms2d",) * 6,
            decoder_acts=("silu",) * 6,
            decoder_upsample="interpolate",
            scaling_factor=0.41407,
            hub_id=f"mit-han-lab/{_name}",
            hub_id_diffusers=f"mit-han-lab/{_name}-diffusers",
        )
    )
register(
    DCAEConfig(
        name="dc-ae-lite-f32c32-sana-1.1",
        latent_channels=32,
        **_SANA_ENCODER,
        decoder_widths=_W6,
        decoder_depths=(0, 3, 5, 4, 4, 4),
        decoder_block_types=("ResBlock",) * 6,
        decoder_norms=("trms2d",) * 6,
        decoder_acts=("silu",) * 6,
        decoder_head_act="silu",
        scaling_factor=0.41407,
        hub_id="mit-han-lab/dc-ae-lite-f32c32-sana-1.1",
        hub_id_diffusers="mit-han-lab/dc-ae-lite-f32c32-sana-1.1-diffusers",
    )
)


def _v15(name: str, widths: tuple[int, ...], scaling: float) -> DCAEConfig:
    # Published (Hub organisation dc-ai, reference zoo) as dc-ae-f64c128-1.5: registered as an alias below.
    published = "dc-ae-" + name.removeprefix("dc-ae-1.5-") + "-1.5"
    n = len(widths)
    depths = (0, 5, 10) + (4,) * (n - 3)
    return DCAEConfig(
        name=name,
        latent_channels=128,
        encoder_widths=widths,
        encoder_depths=depths,
        encoder_block_types=("ResBlock",) * n,
        encoder_out_shortcut=False,
        encoder_sliceable_out=True,
        decoder_widths=widths,
        decoder_depths=depths,
        decoder_block_types=("ResBlock",) * n,
        decoder_norms=("trms2d",) * n,
        decoder_acts=("silu",) * n,
        decoder_in_shortcut=False,
        decoder_sliceable_in=True,
        decoder_head_act="silu",
        scaling_factor=scaling,
        hub_id=f"dc-ai/{published}",
        hub_id_diffusers=f"dc-ai/{published}-diffusers",
    )


# DC-AE 1.5 f32c128's scaling factor is not published with the config; 1.0 until measured (`dcae eval`
# reports the implied factor).
register(_v15("dc-ae-1.5-f32c128", _W6, 1.0))
register(_v15("dc-ae-1.5-f64c128", _W6 + (1024,), 0.5935))


# ----------------------------------------------------------------------------- other published names
@dataclass(frozen=True)
class Alias:
    """Another name a registered model is published under, with that name's own Hub home if it has one."""

    target: str
    hub_id: str | None = None
    hub_id_diffusers: str | None = None


_ALIASES: dict[str, Alias] = {}


def register_alias(alias: str, target: str, hub_id: str | None = None, hub_id_diffusers: str | None = None) -> None:
    if target not in _ZOO:
        raise KeyError(f"alias {alias!r} names an unregistered model {target!r}")
    if alias in _ZOO:
        raise KeyError(f"alias {alias!r} is already a model name")
    _ALIASES[alias] = Alias(target, hub_id, hub_id_diffusers)


# The reference zoo's names of DC-AE 1.5 (and its config.json's model_name): same Hub repos.
for _name in ("dc-ae-1.5-f32c128", "dc-ae-1.5-f64c128"):
    register_alias("dc-ae-" + _name.removeprefix("dc-ae-1.5-") + "-1.5", _name)
# DC-AE-Lite's second home.
register_alias(
    "dc-ae-lite-f32c32", "dc-ae-lite-f32c32-sana-1.1", "dc-ai/dc-ae-lite-f32c32", "dc-ai/dc-ae-lite-f32c32-diffusers"
)


def list_models() -> list[str]:
    """Names of the registered (released) configurations, without aliases (see `model_aliases`)."""
    return list(_ZOO)


def model_aliases(name: str) -> list[str]:
    """The other names a registered model is published under."""
    return [alias for alias, a in _ALIASES.items() if a.target == name]


def _resolve(name: str) -> tuple[str, Alias | None] | None:
    """(registered name, alias or None) for a name, an alias, or either without its "dc-ae-" prefix."""
    for candidate in (name, f"dc-ae-{name}"):
        if candidate in _ZOO:
            return candidate, None
        if candidate in _ALIASES:
            return _ALIASES[candidate].target, _ALIASES[candidate]
    return None


def is_model_name(name: str) -> bool:
    return _resolve(name) is not None


def get_config(name: str) -> DCAEConfig:
    """A copy of a registered configuration, by name or alias (an alias brings its own Hub ids); unknown
    names list the known ones and the closest match."""
    found = _resolve(name)
    if found is not None:
        target, alias = found
        cfg = dataclasses.replace(_ZOO[target])
        if alias is not None and alias.hub_id is not None:
            cfg.hub_id, cfg.hub_id_diffusers = alias.hub_id, alias.hub_id_diffusers
        return cfg
    names = list(_ZOO) + list(_ALIASES)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}.{hint} Known models: {', '.join(_ZOO)} (aliases: {', '.join(_ALIASES)})"
    )


def find_by_hub_id(repo_id: str) -> DCAEConfig | None:
    """The registered configuration published at a Hub repo (either format, any of its homes)."""
    for name in list(_ZOO) + list(_ALIASES):
        cfg = get_config(name)
        if repo_id in (cfg.hub_id, cfg.hub_id_diffusers):
            return cfg
    return None
