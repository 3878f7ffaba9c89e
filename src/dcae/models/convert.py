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

# The config half of the conversion lives in its own module; re-exported here.
from dcae.models.diffusers_config import DiffusersConfigError, from_diffusers_config, to_diffusers_config

__all__ = [
    "ConversionError",
    "DiffusersConfigError",
    "diffusers_to_original",
    "from_diffusers_config",
    "original_to_diffusers",
    "to_diffusers_config",
]

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
    # encoder stem: pixel-unshuffle conv, or a plain conv when stage 0 has blocks, or (the last rule, read
    # only with a config or expected keys) a stride-2 conv when stage 0 is empty and downsampling is "conv"
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
    Rule("encoder.project_in.conv.{p}", "encoder.conv_in.conv.{p}"),
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


def _strided_stem(config: DCAEConfig | None) -> bool:
    """diffusers wraps a stride-2 stem conv in a DCDownBlock2d (`conv_in.conv`); ours is a plain ConvLayer."""
    return config is not None and config.encoder_depths[0] == 0 and config.encoder_downsample == "conv"


def original_to_diffusers(
    state_dict: dict[str, torch.Tensor], config: DCAEConfig | None = None
) -> dict[str, torch.Tensor]:
    """Our (original-format) state dict -> diffusers AutoencoderDC keys and shapes. `config` is needed only
    for a model whose empty first stage folds into a stride-2 stem conv."""
    strided = _strided_stem(config)
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in state_dict.items():
        for rule, orig, _ in _COMPILED:
            if strided and rule.diffusers.startswith("encoder.conv_in.{p}"):
                continue
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
