"""Which parameters a phase trains: named glob/regex patterns over parameter names.

Everything not matched gets requires_grad=False, and BatchNorm layers without trainable parameters
run in eval mode, so their running statistics stay frozen too (otherwise phase 2 at a new resolution
would silently re-estimate the decoder's BN statistics it is not supposed to touch).
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict

from torch import nn

from dcae.train.config import INNER_STAGE_PATTERNS, ConfigError, PhaseConfig


def phase_patterns(phase: PhaseConfig, model: nn.Module) -> dict[str, str]:
    """The phase's named patterns, with the inner-stage flag applied and `{last}` expanded."""
    patterns = dict(phase.trainable)
    if phase.trainable_inner_stages:
        patterns.update({k: v for k, v in INNER_STAGE_PATTERNS.items() if k not in patterns})
    last = len(model.encoder.stages) - 1  # the innermost stage is the last index (decoder runs it first)
    return {name: p.replace("{last}", str(last)) for name, p in patterns.items()}


def matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_trainable(model: nn.Module, patterns: dict[str, str]) -> dict[str, list[str]]:
    """{pattern name: [parameter names]}; a pattern that matches nothing is a config error (a typo)."""
    names = [n for n, _ in model.named_parameters()]
    selected: dict[str, list[str]] = {}
    for label, pattern in patterns.items():
        try:
            hit = [n for n in names if matches(pattern, n)]
        except re.error as exc:
            raise ConfigError(f"trainable pattern {label}: invalid regex {pattern!r}: {exc}") from exc
        if not hit:
            close = sorted({n.rsplit(".", 2)[0] for n in names})[:8]
            raise ConfigError(
                f"trainable pattern {label}={pattern!r} matches no parameter (names look like {', '.join(close)}, ...)"
            )
        selected[label] = hit
    return selected


def apply_trainable(model: nn.Module, selected: dict[str, list[str]]) -> list[str]:
    """Set requires_grad from the selection; returns the trainable names in model order."""
    chosen = {n for names in selected.values() for n in names}
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except BatchNorm layers whose parameters are all frozen: eval (statistics frozen)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if not any(p.requires_grad for p in params):
                m.eval()


def summary(model: nn.Module, selected: dict[str, list[str]], max_lines: int = 64) -> str:
    """Human-readable list of trainable parameters with counts, and trainable/frozen totals."""
    numel = {n: p.numel() for n, p in model.named_parameters()}
    lines = []
    for label, names in selected.items():
        lines.append(f"  [{label}] {len(names)} tensors, {sum(numel[n] for n in names):,} parameters")
        if len(names) <= max_lines:
            lines += [f"    {n}  {numel[n]:,}" for n in names]
        else:  # phase 1 of a real model has hundreds of tensors: group them by block
            groups: dict[str, int] = defaultdict(int)
            for n in names:
                groups[_group(n)] += numel[n]
            lines += [f"    {g}.*  {c:,}" for g, c in groups.items()]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    lines.append(f"  trainable: {trainable:,} parameters in {tensors} tensors; frozen: {frozen:,}")
    return "\n".join(lines)


def full_list(model: nn.Module) -> str:
    return "\n".join(
        f"{'T' if p.requires_grad else '-'} {n} {tuple(p.shape)} {p.numel()}" for n, p in model.named_parameters()
    )


def _group(name: str) -> str:
    parts = name.split(".")
    # encoder.stages.3.op_list.1.* -> group per block; encoder.project_in.* -> per module
    return ".".join(parts[:5]) if len(parts) > 5 and parts[1] == "stages" else ".".join(parts[:2])
