"""Weight-format conversion between the original DC-AE key scheme (ours) and diffusers' `AutoencoderDC`.

The mapping is one declarative table of key templates, read in either direction. Placeholders:
`{s}` stage index, `{i}` op index, `{k}` multi-scale branch, `{p}` parameter/buffer name. Two entries
need a tensor transform as well (`qkv` is split into to_q/to_k/to_v; 1x1 convs become Linear weights).

Converting diffusers -> original is ambiguous for a few keys (a strided-conv downsample and a
pixel-unshuffle one both become `down_blocks.S.I.conv`); there the key that the target model
actually has wins, so the reverse direction takes the expected key set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from dcae.models.config import DCAEConfig

_P = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"


@dataclass(frozen=True)
class Rule:
    original: str
    diffusers: str
    transform: str | None = None  # "qkv" or "linear"


def _coder_rules(side: str, blocks: str) -> list[Rule]:
    o = f"{side}.stages.{{s}}.op_list.{{i}}"
    d = f"{side}.{blocks}.{{s}}.{{i}}"
    return [
        # ResBlock
        Rule(f"{o}.main.conv1.conv.{{p}}", f"{d}.conv1.{{p}}"),
        Rule(f"{o}.main.conv2.conv.{{p}}", f"{d}.conv2.{{p}}"),
        Rule(f"{o}.main.conv2.norm.{{p}}", f"{d}.norm.{{p}}"),
        # EfficientViT block: context module (LiteMLA) ...
        Rule(f"{o}.context_module.main.qkv.conv.weight", f"{d}.attn.to_qkv.weight", "qkv"),
        Rule(f"{o}.context_module.main.aggreg.{{k}}.0.weight", f"{d}.attn.to_qkv_multiscale.{{k}}.proj_in.weight"),
        Rule(f"{o}.context_module.main.aggreg.{{k}}.1.weight", f"{d}.attn.to_qkv_multiscale.{{k}}.proj_out.weight"),
        Rule(f"{o}.context_module.main.proj.conv.weight", f"{d}.attn.to_out.weight", "linear"),
        Rule(f"{o}.context_module.main.proj.norm.{{p}}", f"{d}.attn.norm_out.{{p}}"),
        # ... and local module (GLUMBConv)
        Rule(f"{o}.local_module.main.inverted_conv.conv.{{p}}", f"{d}.conv_out.conv_inverted.{{p}}"),
        Rule(f"{o}.local_module.main.depth_conv.conv.{{p}}", f"{d}.conv_out.conv_depth.{{p}}"),
        Rule(f"{o}.local_module.main.point_conv.conv.{{p}}", f"{d}.conv_out.conv_point.{{p}}"),
        Rule(f"{o}.local_module.main.point_conv.norm.{{p}}", f"{d}.conv_out.norm.{{p}}"),
        # down/up-sampling blocks with residual shortcut: pixel-(un)shuffle conv or interpolate conv ...
        Rule(f"{o}.main.conv.conv.{{p}}", f"{d}.conv.{{p}}"),
        # ... or strided conv (SANA encoder)
        Rule(f"{o}.main.conv.{{p}}", f"{d}.conv.{{p}}"),
    ]


RULES: tuple[Rule, ...] = (
    # encoder stem: pixel-unshuffle conv, or a plain conv when stage 0 has blocks
    Rule("encoder.project_in.conv.conv.{p}", "encoder.conv_in.conv.{p}"),
    Rule("encoder.project_in.conv.{p}", "encoder.conv_in.{p}"),
    *_coder_rules("encoder", "down_blocks"),
    # bottleneck: with residual shortcut, or without (DC-AE 1.5, channel-sliceable)
    Rule("encoder.project_out.main.op_list.0.conv.{p}", "encoder.conv_out.{p}"),
    Rule("encoder.project_out.op_list.0.conv.{p}", "encoder.conv_out.{p}"),
    Rule("decoder.project_in.main.conv.{p}", "decoder.conv_in.{p}"),
    Rule("decoder.project_in.conv.{p}", "decoder.conv_in.{p}"),
    *_coder_rules("decoder", "up_blocks"),
    # decoder head: norm -> act -> conv (or pixel-shuffle conv)
    Rule("decoder.project_out.op_list.0.{p}", "decoder.norm_out.{p}"),
    Rule("decoder.project_out.op_list.2.conv.conv.{p}", "decoder.conv_out.conv.{p}"),
    Rule("decoder.project_out.op_list.2.conv.{p}", "decoder.conv_out.{p}"),
)

_QKV = ("to_q", "to_k", "to_v")


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name in ("s", "i", "k"):
        pattern = pattern.replace(re.escape(f"{{{name}}}"), rf"(?P<{name}>\d+)")
    pattern = pattern.replace(re.escape("{p}"), _P)
    return re.compile(pattern + "$")


_COMPILED = [(rule, _compile(rule.original), _compile(rule.diffusers)) for rule in RULES]


class ConversionError(ValueError):
    pass


def original_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (original-format) state dict -> diffusers AutoencoderDC keys and shapes."""
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in state_dict.items():
        for rule, orig, _ in _COMPILED:
            m = orig.match(key)
            if m is None:
                continue
            new_key = rule.diffusers.format(**m.groupdict())
            if rule.transform == "qkv":
                for name, part in zip(_QKV, value.chunk(3, dim=0)):
                    out[new_key.replace("to_qkv", name)] = part.flatten(1)
            elif rule.transform == "linear":
                out[new_key] = value.flatten(1)
            else:
                out[new_key] = value
            break
        else:
            unmatched.append(key)
    if unmatched:
        raise ConversionError(f"no diffusers name for {len(unmatched)} keys, e.g. {unmatched[:5]}")
    return out


def diffusers_to_original(
    state_dict: dict[str, torch.Tensor], expected_keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderDC keys -> ours. `expected_keys` (the target model's keys) resolves the
    templates that two original layouts share; without it the first matching rule wins."""
    expected = set(expected_keys) if expected_keys is not None else None
    sd = dict(state_dict)
    # Re-fuse q/k/v first so that every remaining key maps one-to-one.
    for key in [k for k in sd if k.endswith(".attn.to_q.weight")]:
        prefix = key[: -len("to_q.weight")]
        parts = [sd.pop(f"{prefix}{name}.weight") for name in _QKV]
        sd[f"{prefix}to_qkv.weight"] = torch.cat(parts, dim=0)
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in sd.items():
        candidates = []
        for rule, _, diff in _COMPILED:
            m = diff.match(key)
            if m is not None:
                candidates.append((rule, rule.original.format(**m.groupdict())))
        if expected is not None:
            candidates = [c for c in candidates if c[1] in expected] or candidates
        if not candidates:
            unmatched.append(key)
            continue
        rule, new_key = candidates[0]
        if rule.transform in ("qkv", "linear"):
            value = value[:, :, None, None]
        out[new_key] = value
    if unmatched:
        raise ConversionError(f"no original-format name for {len(unmatched)} keys, e.g. {unmatched[:5]}")
    return out


# ----------------------------------------------------------------------------- configs
_NORMS = {"trms2d": "rms_norm", "bn2d": "batch_norm"}
_BLOCKS = {"ResBlock": "ResBlock", "EViTGLU": "EfficientViTBlock", "EViTS5GLU": "EfficientViTBlock"}


def to_diffusers_config(cfg: DCAEConfig) -> dict:
    """The AutoencoderDC config.json for a DCAEConfig; raises where diffusers cannot express it."""
    if cfg.encoder_norm != "trms2d" or cfg.encoder_act != "silu":
        raise ConversionError("diffusers' AutoencoderDC only supports encoder norm 'trms2d' and act 'silu'")
    if cfg.decoder_head_norm != "trms2d":
        raise ConversionError("diffusers' AutoencoderDC only supports an RMS-norm decoder head")

    def scales(types: tuple[str, ...]) -> list[list[int]]:
        return [[5] if t == "EViTS5GLU" else [] for t in types]

    return {
        "_class_name": "AutoencoderDC",
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "attention_head_dim": 32,
        "encoder_block_types": [_BLOCKS[t] for t in cfg.encoder_block_types],
        "decoder_block_types": [_BLOCKS[t] for t in cfg.decoder_block_types],
        "encoder_block_out_channels": list(cfg.encoder_widths),
        "decoder_block_out_channels": list(cfg.decoder_widths),
        "encoder_layers_per_block": list(cfg.encoder_depths),
        "decoder_layers_per_block": list(cfg.decoder_depths),
        "encoder_qkv_multiscales": scales(cfg.encoder_block_types),
        "decoder_qkv_multiscales": scales(cfg.decoder_block_types),
        "upsample_block_type": cfg.decoder_upsample,
        "downsample_block_type": "pixel_unshuffle" if cfg.encoder_downsample == "pixel_unshuffle" else "Conv",
        "decoder_norm_types": [_NORMS[n] for n in cfg.decoder_norms],
        "decoder_act_fns": list(cfg.decoder_acts),
        "encoder_out_shortcut": cfg.encoder_out_shortcut,
        "decoder_in_shortcut": cfg.decoder_in_shortcut,
        "decoder_conv_act_fn": cfg.decoder_head_act,
        "scaling_factor": cfg.scaling_factor,
    }


def from_diffusers_config(d: dict, name: str = "custom") -> DCAEConfig:
    """A DCAEConfig from an AutoencoderDC config.json (missing fields take diffusers' defaults)."""
    n_enc = len(d.get("encoder_block_out_channels", (128, 256, 512, 512, 1024, 1024)))
    n_dec = len(d.get("decoder_block_out_channels", (128, 256, 512, 512, 1024, 1024)))

    def per_stage(value, n):
        return [value] * n if isinstance(value, str) else list(value)

    def block_types(types, scales_, n):
        out = []
        for t, s in zip(per_stage(types, n), scales_):
            if t == "ResBlock":
                out.append("ResBlock")
            elif t == "EfficientViTBlock":
                if list(s) not in ([], [5]):
                    raise ConversionError(f"unsupported multi-scale kernel sizes {s}")
                out.append("EViTS5GLU" if list(s) == [5] else "EViTGLU")
            else:
                raise ConversionError(f"unsupported diffusers block type {t!r}")
        return tuple(out)

    default_scales = [[], [], [], [5], [5], [5]]
    inv_norms = {v: k for k, v in _NORMS.items()}
    sliceable_out = not d.get("encoder_out_shortcut", True)
    sliceable_in = not d.get("decoder_in_shortcut", True)
    return DCAEConfig(
        name=name,
        in_channels=d.get("in_channels", 3),
        latent_channels=d.get("latent_channels", 32),
        encoder_widths=tuple(d.get("encoder_block_out_channels", (128, 256, 512, 512, 1024, 1024))),
        encoder_depths=tuple(d.get("encoder_layers_per_block", (2, 2, 2, 3, 3, 3))),
        encoder_block_types=block_types(
            d.get("encoder_block_types", "ResBlock"), d.get("encoder_qkv_multiscales", default_scales), n_enc
        ),
        encoder_downsample="pixel_unshuffle"
        if d.get("downsample_block_type", "pixel_unshuffle") == "pixel_unshuffle"
        else "conv",
        encoder_out_shortcut=d.get("encoder_out_shortcut", True),
        # A model without bottleneck shortcuts is a DC-AE 1.5 layout; slicing is harmless at full width.
        encoder_sliceable_out=sliceable_out,
        decoder_widths=tuple(d.get("decoder_block_out_channels", (128, 256, 512, 512, 1024, 1024))),
        decoder_depths=tuple(d.get("decoder_layers_per_block", (3, 3, 3, 3, 3, 3))),
        decoder_block_types=block_types(
            d.get("decoder_block_types", "ResBlock"), d.get("decoder_qkv_multiscales", default_scales), n_dec
        ),
        decoder_norms=tuple(inv_norms[n] for n in per_stage(d.get("decoder_norm_types", "rms_norm"), n_dec)),
        decoder_acts=tuple(per_stage(d.get("decoder_act_fns", "silu"), n_dec)),
        decoder_upsample="interpolate"
        if d.get("upsample_block_type", "pixel_shuffle") == "interpolate"
        else "pixel_shuffle",
        decoder_in_shortcut=d.get("decoder_in_shortcut", True),
        decoder_sliceable_in=sliceable_in,
        decoder_head_act=d.get("decoder_conv_act_fn", "relu"),
        scaling_factor=float(d.get("scaling_factor", 1.0)),
    )
