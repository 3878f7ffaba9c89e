"""diffusers `AutoencoderDC` configs <-> DCAEConfig, every field honoured or refused by name.

`AutoencoderDC.__init__` (diffusers 0.42) takes the 19 arguments of `DIFFUSERS_DEFAULTS`; a config.json
leaves out those at their default. Reading one:
- per-stage fields may be one string (every stage) or a list; like diffusers, the first N entries of a
  longer list are used (N = number of stages, e.g. the 6-entry default `qkv_multiscales` of a 2-stage
  model), and a shorter list is refused (diffusers would fail with an IndexError);
- what diffusers hard-codes is mirrored: encoder blocks use RMS norm and SiLU, EfficientViT blocks
  ignore `decoder_act_fns` and norm their GLUMBConv with RMS norm whatever the stage's (attention) norm
  (`DCAEConfig.evit_local_norm`), the decoder head norm is RMS norm;
- anything dcae would build differently from diffusers is refused with the field, its value and what
  is supported, never silently replaced by a default.
"""

from __future__ import annotations

from typing import Any

from dcae.models.config import DCAEConfig
from dcae.models.layers import evit_block_type, evit_scales

_W6 = (128, 256, 512, 512, 1024, 1024)
_S6 = ((), (), (), (5,), (5,), (5,))

# AutoencoderDC.__init__'s arguments and defaults (tests compare this with the installed diffusers).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": _W6,
    "decoder_block_out_channels": _W6,
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": _S6,
    "decoder_qkv_multiscales": _S6,
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}

# Fields this AutoencoderDC does not take but that describe what it hard-codes (the encoder's norm and
# activation): accepted at exactly that value, refused otherwise.
FIXED_FIELDS: dict[str, str] = {"encoder_norm_types": "rms_norm", "encoder_act_fns": "silu"}

_NORMS = {"rms_norm": "trms2d", "batch_norm": "bn2d"}
# diffusers' get_activation (lower-cased names); "swish" is SiLU.
_ACTS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "mish": "mish"}
_BLOCKS = ("ResBlock", "EfficientViTBlock")


class DiffusersConfigError(ValueError):
    """A diffusers AutoencoderDC config that dcae cannot build exactly; the message names every field."""


class _Reader:
    """Reads the fields of one config, collecting every problem before raising."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.d = d
        self.problems: list[str] = []

    def get(self, key: str) -> Any:
        return self.d.get(key, DIFFUSERS_DEFAULTS[key])

    def refuse(self, key: str, value: Any, why: str) -> None:
        self.problems.append(f"{key} = {value!r}: {why}")

    def positive_int(self, key: str) -> int:
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            self.refuse(key, v, "expected a positive integer")
            return 1
        return v

    def flag(self, key: str) -> bool:
        v = self.get(key)
        if not isinstance(v, bool):
            self.refuse(key, v, "expected true or false")
            return True
        return v

    def int_list(self, key: str, minimum: int) -> tuple[int, ...]:
        v = self.get(key)
        ok = isinstance(v, (list, tuple)) and len(v) > 0
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in v)
        if not ok:
            self.refuse(key, v, f"expected a non-empty list of integers >= {minimum}")
            return ()
        return tuple(v)

    def per_stage(self, key: str, n: int) -> tuple[Any, ...]:
        """One value per stage: a string for all, or the first n entries of a list (as diffusers indexes it)."""
        v = self.get(key)
        if isinstance(v, str) or v is None:
            return (v,) * n
        if not isinstance(v, (list, tuple)) or len(v) < n:
            self.refuse(key, v, f"expected a string or a list with an entry for each of the {n} stages")
            return (None,) * n
        return tuple(v[:n])

    def choice(self, key: str, value: Any, allowed: dict[str, str], what: str) -> str:
        """Exact names, as diffusers compares them (`== "interpolate"`, `get_normalization`)."""
        if not isinstance(value, str) or value not in allowed:
            self.refuse(key, value, f"{what}; supported: {', '.join(map(repr, allowed))}")
            return next(iter(allowed.values()))
        return allowed[value]

    def act(self, key: str, value: Any) -> str:
        # diffusers' get_activation lower-cases the name first
        return self.choice(key, value.lower() if isinstance(value, str) else value, _ACTS, "unknown activation")


def from_diffusers_config(d: dict[str, Any], name: str = "custom") -> DCAEConfig:
    """The DCAEConfig that builds exactly the model an AutoencoderDC config describes (missing fields take
    diffusers' defaults); DiffusersConfigError lists every field that cannot be honoured."""
    r = _Reader(d)
    _check_fields(r)
    n_enc = len(r.int_list("encoder_block_out_channels", 1))
    n_dec = len(r.int_list("decoder_block_out_channels", 1))
    fields: dict[str, Any] = dict(
        name=name,
        in_channels=r.positive_int("in_channels"),
        latent_channels=r.positive_int("latent_channels"),
        attention_head_dim=r.positive_int("attention_head_dim"),
        encoder_widths=r.int_list("encoder_block_out_channels", 1),
        decoder_widths=r.int_list("decoder_block_out_channels", 1),
        encoder_depths=_depths(r, "encoder_layers_per_block", n_enc),
        decoder_depths=_depths(r, "decoder_layers_per_block", n_dec),
        encoder_block_types=_block_types(r, "encoder", n_enc),
        decoder_block_types=_block_types(r, "decoder", n_dec),
        encoder_norm="trms2d",  # fixed in diffusers' Encoder
        encoder_act="silu",
        encoder_downsample=_downsample(r),
        decoder_upsample=r.choice(
            "upsample_block_type",
            r.get("upsample_block_type"),
            {"pixel_shuffle": "pixel_shuffle", "interpolate": "interpolate"},
            "unknown upsampling",
        ),
        encoder_out_shortcut=r.flag("encoder_out_shortcut"),
        decoder_in_shortcut=r.flag("decoder_in_shortcut"),
        decoder_head_norm="trms2d",  # diffusers' Decoder.norm_out is always an RMSNorm
        decoder_head_act=r.act("decoder_conv_act_fn", r.get("decoder_conv_act_fn")),
        scaling_factor=_scaling_factor(r),
    )
    fields["decoder_norms"], fields["decoder_acts"] = _decoder_norms_acts(r, fields["decoder_block_types"], n_dec)
    evit_norms = {n for k, n in zip(fields["decoder_block_types"], fields["decoder_norms"]) if k != "ResBlock"}
    # Only where it differs from the stage norm, so that released configs stay equal to the zoo's.
    fields["evit_local_norm"] = "trms2d" if evit_norms - {"trms2d"} else None
    # Without bottleneck shortcuts the model has the DC-AE 1.5 layout; slicing is harmless at full width.
    fields["encoder_sliceable_out"] = not fields["encoder_out_shortcut"]
    fields["decoder_sliceable_in"] = not fields["decoder_in_shortcut"]
    _check_heads(r, fields)
    if r.problems:
        raise DiffusersConfigError("unsupported AutoencoderDC config: " + "; ".join(r.problems))
    try:
        return DCAEConfig(**fields)
    except ValueError as exc:
        raise DiffusersConfigError(f"unsupported AutoencoderDC config: {exc}") from None


def _check_fields(r: _Reader) -> None:
    class_name = r.d.get("_class_name", "AutoencoderDC")
    if class_name != "AutoencoderDC":
        r.refuse("_class_name", class_name, "not a DC-AE; expected 'AutoencoderDC'")
    for key, value in r.d.items():
        if key.startswith("_") or key in DIFFUSERS_DEFAULTS:
            continue
        if key in FIXED_FIELDS:
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, (list, tuple)) or any(v != FIXED_FIELDS[key] for v in values):
                r.refuse(key, value, f"diffusers' AutoencoderDC encoder always uses {FIXED_FIELDS[key]!r}")
        else:
            r.refuse(
                key, value, "not an argument of diffusers' AutoencoderDC; supported: " + ", ".join(DIFFUSERS_DEFAULTS)
            )


def _depths(r: _Reader, key: str, n: int) -> tuple[int, ...]:
    """Layers per stage. Only the first stage may be empty: diffusers then folds it into the stem/head
    (a x2 conv), which is what dcae builds; an empty stage elsewhere loses its down/upsampling there."""
    depths = r.per_stage(key, n)
    if n == 0:
        return ()
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in depths):
        r.refuse(key, r.get(key), "expected a list of non-negative integers")
        return (1,) * n
    if any(x == 0 for x in depths[1:]) or (n < 2 and depths[0] == 0):
        r.refuse(key, r.get(key), "only the first stage may have 0 layers")
    return tuple(depths)


def _block_types(r: _Reader, side: str, n: int) -> tuple[str, ...]:
    kinds = r.per_stage(f"{side}_block_types", n)
    scales = r.per_stage(f"{side}_qkv_multiscales", n)
    out = []
    for i, (kind, s) in enumerate(zip(kinds, scales)):
        if kind not in _BLOCKS:
            r.refuse(f"{side}_block_types[{i}]", kind, f"unknown block type; supported: {', '.join(_BLOCKS)}")
            out.append("ResBlock")
        elif kind == "ResBlock":
            out.append("ResBlock")  # diffusers ignores qkv_multiscales there
        elif not isinstance(s, (list, tuple)) or not all(isinstance(k, int) and k >= 1 and k % 2 for k in s):
            r.refuse(f"{side}_qkv_multiscales[{i}]", s, "expected a list of odd kernel sizes (e.g. [] or [5])")
            out.append("EViTGLU")
        else:
            out.append(evit_block_type(tuple(s)))
    return tuple(out)


def _downsample(r: _Reader) -> str:
    v = r.get("downsample_block_type")
    # diffusers builds a strided conv for anything but "pixel_unshuffle"; its converter writes "Conv".
    return r.choice(
        "downsample_block_type",
        v,
        {"pixel_unshuffle": "pixel_unshuffle", "conv": "conv", "Conv": "conv"},
        "unknown downsampling",
    )


def _decoder_norms_acts(r: _Reader, kinds: tuple[str, ...], n: int) -> tuple[tuple, tuple]:
    norms, acts = r.per_stage("decoder_norm_types", n), r.per_stage("decoder_act_fns", n)
    out_norms, out_acts = [], []
    for i, (kind, norm, act) in enumerate(zip(kinds, norms, acts)):
        if kind == "ResBlock":
            out_norms.append(r.choice(f"decoder_norm_types[{i}]", norm, _NORMS, "not a channel norm dcae builds"))
            out_acts.append(None if act is None else r.act(f"decoder_act_fns[{i}]", act))
            continue
        # EfficientViT block: this norm is the attention's; its GLUMBConv always has RMS norm (evit_local_norm)
        # and SiLU, whatever decoder_act_fns says.
        out_norms.append(r.choice(f"decoder_norm_types[{i}]", norm, _NORMS, "not a channel norm dcae builds"))
        out_acts.append("silu")
    return tuple(out_norms), tuple(out_acts)


def _scaling_factor(r: _Reader) -> float:
    v = r.get("scaling_factor")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        r.refuse("scaling_factor", v, "expected a positive number")
        return 1.0
    return float(v)


def _check_heads(r: _Reader, fields: dict[str, Any]) -> None:
    """diffusers makes width // attention_head_dim heads; a width that is not a whole number of heads gives
    attention narrower than the block, which dcae does not build."""
    dim = fields["attention_head_dim"]
    for side, key in (("encoder", "encoder_block_out_channels"), ("decoder", "decoder_block_out_channels")):
        for i, (kind, width) in enumerate(zip(fields[f"{side}_block_types"], fields[f"{side}_widths"])):
            if kind != "ResBlock" and width % dim:
                r.refuse(
                    "attention_head_dim",
                    dim,
                    f"{key}[{i}] = {width} (an EfficientViTBlock stage) is not a multiple of it",
                )


# ----------------------------------------------------------------------------- DCAEConfig -> diffusers
_INV_NORMS = {v: k for k, v in _NORMS.items()}


def to_diffusers_config(cfg: DCAEConfig) -> dict[str, Any]:
    """The AutoencoderDC config.json for a DCAEConfig; DiffusersConfigError where diffusers would build a
    different model."""
    problems = _inexpressible(cfg)
    if problems:
        raise DiffusersConfigError("; ".join(problems))

    def scales(types: tuple[str, ...]) -> list[list[int]]:
        return [list(evit_scales(t) or ()) for t in types]

    def blocks(types: tuple[str, ...]) -> list[str]:
        return ["ResBlock" if t == "ResBlock" else "EfficientViTBlock" for t in types]

    return {
        "_class_name": "AutoencoderDC",
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "attention_head_dim": cfg.attention_head_dim,
        "encoder_block_types": blocks(cfg.encoder_block_types),
        "decoder_block_types": blocks(cfg.decoder_block_types),
        "encoder_block_out_channels": list(cfg.encoder_widths),
        "decoder_block_out_channels": list(cfg.decoder_widths),
        "encoder_layers_per_block": list(cfg.encoder_depths),
        "decoder_layers_per_block": list(cfg.decoder_depths),
        "encoder_qkv_multiscales": scales(cfg.encoder_block_types),
        "decoder_qkv_multiscales": scales(cfg.decoder_block_types),
        "upsample_block_type": cfg.decoder_upsample,
        "downsample_block_type": "pixel_unshuffle" if cfg.encoder_downsample == "pixel_unshuffle" else "Conv",
        "decoder_norm_types": [_INV_NORMS[n] for n in cfg.decoder_norms],
        "decoder_act_fns": list(cfg.decoder_acts),
        "encoder_out_shortcut": cfg.encoder_out_shortcut,
        "decoder_in_shortcut": cfg.decoder_in_shortcut,
        "decoder_conv_act_fn": cfg.decoder_head_act,
        "scaling_factor": cfg.scaling_factor,
    }


def _inexpressible(cfg: DCAEConfig) -> list[str]:
    problems = []
    for flag in ("encoder_downsample_shortcut", "decoder_upsample_shortcut"):
        if not getattr(cfg, flag):
            problems.append(f"{flag} = False: diffusers' AutoencoderDC always has the stage shortcuts")
    if cfg.encoder_norm != "trms2d" or cfg.encoder_act != "silu":
        problems.append("diffusers' AutoencoderDC only supports encoder norm 'trms2d' and act 'silu'")
    if cfg.evit_local_norm not in (None, "trms2d"):
        problems.append("diffusers' EfficientViT blocks always norm their GLUMBConv with RMS norm")
    if cfg.decoder_head_norm != "trms2d":
        problems.append("diffusers' AutoencoderDC only supports an RMS-norm decoder head")
    if any(d == 0 for d in cfg.encoder_depths[1:] + cfg.decoder_depths[1:]):
        problems.append("diffusers' AutoencoderDC folds only the first stage into the stem when it is empty")
    for i, (kind, norm, act) in enumerate(zip(cfg.decoder_block_types, cfg.decoder_norms, cfg.decoder_acts)):
        if norm not in _INV_NORMS:
            problems.append(f"decoder norm {norm!r} of stage {i} has no diffusers name")
        if kind != "ResBlock" and ((cfg.evit_local_norm or norm) != "trms2d" or act != "silu"):
            problems.append(
                f"diffusers' EfficientViT blocks use an RMS-norm GLUMBConv and SiLU (decoder stage {i}: "
                f"local norm {cfg.evit_local_norm or norm}, act {act})"
            )
    return problems
