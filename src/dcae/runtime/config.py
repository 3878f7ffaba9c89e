"""One typed config loader for every trainer: dataclasses filled from YAML, `base:` inheritance, dotted
`key=value` overrides, values converted to each field's declared type.

    cfg = load_config(TrainConfig, "run.yaml", ["optim.lr=2e-4"], packaged={"tiny": path})

- A YAML file may start from another: `base: other.yaml` (relative to the file) or a packaged name; the
  file's mappings are merged into the base's, key by key, and its other values replace the base's.
- Unknown or mistyped fields are refused with the file and the field named (and a close match suggested).
- YAML 1.1 reads `6.4e-5` as a string and a bare `no` as False: numbers are converted, and a boolean given
  to a string field is read back as the word (`mixed_precision: no` -> "no").
- Renamed keys keep working: `renamed={"log_every": "log.every", ...}` (dotted old name -> dotted new name)
  moves each old key of every file (before the files of a `base:` chain are merged, so a file may override
  an old key of its base with the new one) and of the overrides to its new place, with one
  `dcae: warning:` line per old key on stderr. An old and a new key in the same file, or in the same
  override list, is an error naming both. `rename_keys(data, renamed)` does the same silently (checkpoints).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dcae.errors import UserError, brief

T = TypeVar("T")


class ConfigError(UserError):
    """A config that cannot be used: unknown keys, wrong types, impossible values."""


# ----------------------------------------------------------------------------- sections every trainer has
@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps between checkpoints; the last step always writes one
    keep_last: int = 3  # older checkpoints are deleted


@dataclass
class LogConfig:
    every: int = 10  # steps between CSV / TensorBoard rows
    tensorboard: bool = True  # also log to tensorboard/ when the tensorboard package is installed


STRATEGIES = ("ddp", "fsdp")


@dataclass
class ParallelConfig:
    """How several processes share a run (dcae.runtime.sharding). ddp: every process holds the whole model,
    optimizer and EMA; fsdp: FSDP2 shards them over the processes, one transformer block (or autoencoder
    stage) gathered at a time, and checkpoints become folders written with torch.distributed.checkpoint."""

    strategy: str = "ddp"  # ddp | fsdp
    reshard_after_forward: bool = True  # fsdp: free each gathered block after its forward (ZeRO-3); false: ZeRO-2
    timeout_s: int = 1800  # collective timeout of the process group (multi-node: raise it for slow first steps)


def parallel_problems(p: ParallelConfig, mixed_precision: str) -> list[str]:
    """What is wrong with a `parallel:` section, one phrase each (the trainers' validation joins them)."""
    problems = []
    if p.strategy not in STRATEGIES:
        problems.append(f"parallel.strategy must be one of {', '.join(STRATEGIES)}, got {p.strategy!r}")
    elif p.strategy == "fsdp" and mixed_precision == "fp16":
        problems.append("parallel.strategy=fsdp trains in bf16 or fp32 (mixed_precision bf16 or no), not fp16")
    if isinstance(p.timeout_s, bool) or not isinstance(p.timeout_s, int) or p.timeout_s < 1:
        problems.append(f"parallel.timeout_s must be a whole number of seconds >= 1, got {p.timeout_s!r}")
    return problems


def load_config(
    cls: type[T],
    source: str | Path | dict | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    packaged: dict[str, Path] | None = None,
    finish: Callable[[T], None] | None = None,
    renamed: dict[str, str] | None = None,
) -> T:
    """A `cls` dataclass from a YAML file (or a name in `packaged`), a dict, or defaults, then overrides, then
    `finish(cfg)` (the trainer's expansion and validation). Any error of these steps names the file.
    `renamed`: old dotted key -> new dotted key, applied to each file, the dict and the overrides."""
    renames = Renames(renamed or {})
    path = None if source is None or isinstance(source, dict) else resolve_path(source, packaged or {})
    if path is not None:
        data = read_with_bases(path, packaged or {}, renames=renames)
    else:
        data = renames.apply(dict(source or {}), "config dict")
    try:
        cfg = _apply(_build(cls, data, ""), renames.overrides(overrides))
        if finish is not None:
            finish(cfg)
    except UserError as exc:
        if path is None:
            raise
        raise type(exc)(f"{path}: {exc}") from None
    return cfg


def _apply(cfg: T, overrides: list[tuple[str, Any]]) -> T:
    for key, value in overrides:
        set_dotted(cfg, key, value)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` -> (key, value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: {yaml_problem(exc)}") from None
    return key.strip(), parsed


# ----------------------------------------------------------------------------- renamed keys
class Renames:
    """Old config keys moved to their new places: {"log_every": "log.every", ...} (both dotted). `warn`:
    print one `dcae: warning:` line per old key met (once per key for this object), on the main process."""

    def __init__(self, renamed: dict[str, str], warn: bool = True) -> None:
        self.renamed, self.warn, self.warned = dict(renamed), warn, set()

    def _met(self, old: str, where: str) -> None:
        if not self.warn or old in self.warned:
            return
        self.warned.add(old)
        if os.environ.get("RANK", "0") == "0":  # one line per run, not one per process of a launcher
            print(f"dcae: warning: config key {old!r} is now {self.renamed[old]!r} ({where})", file=sys.stderr)

    def apply(self, data: dict, where: str) -> dict:
        """A copy of the mapping `data` with every old key moved to its new place."""
        out = copy.deepcopy(data)
        for old, new in self.renamed.items():
            found, value = _pop_dotted(out, old)
            if not found:
                continue
            if _get_dotted(out, new)[0]:
                raise ConfigError(f"{where}: config keys {old!r} and {new!r} both given ({old!r} is the old name "
                                  f"of {new!r}): keep only {new!r}")  # fmt: skip
            try:
                _put_dotted(out, new, value)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc} (cannot move {old!r} there)") from None
            self._met(old, where)
        return out

    def overrides(self, items: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
        """`key=value` strings -> (key, value) pairs in the new names; an override given under its old and its
        new name is an error."""
        pairs: list[tuple[str, Any, str | None]] = []  # (key, value, the old name it was given as)
        for item in items:
            key, value = parse_override(item)
            pairs += self._override(key, value)
        direct = [(key, value) for key, value, old in pairs if old is None]
        for new, _, old in pairs:
            for key, value in direct if old is not None else ():
                inside = new.startswith(key + ".") and _get_dotted(value, new[len(key) + 1 :])[0]
                if key == new or key.startswith(new + ".") or inside:
                    raise ConfigError(f"overrides {old!r} and {key!r} both given ({old!r} is the old name of "
                                      f"{new!r}): keep only {new!r}")  # fmt: skip
        return [(key, value) for key, value, _ in pairs]

    def _override(self, key: str, value: Any) -> list[tuple[str, Any, str | None]]:
        for old, new in self.renamed.items():
            if key == old or key.startswith(old + "."):
                self._met(old, "override")
                return [(new + key[len(old) :], value, old)]
        if not isinstance(value, dict):
            return [(key, value, None)]
        # A whole section given as a mapping (optim={lr: 1e-4, ema_decay: 0.99}): its old keys move out.
        value, moved = copy.deepcopy(value), []
        for old, new in self.renamed.items():
            if old.startswith(key + "."):
                found, v = _pop_dotted(value, old[len(key) + 1 :])
                if found:
                    self._met(old, "override")
                    moved.append((new, v, old))
        return [(key, value, None), *moved]


def rename_keys(data: dict, renamed: dict[str, str]) -> dict:
    """A copy of `data` (e.g. the config a checkpoint recorded) in the new names, without warnings."""
    return Renames(renamed, warn=False).apply(data, "config")


def _get_dotted(data: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False, None
        data = data[part]
    return True, data


def _pop_dotted(data: Any, key: str) -> tuple[bool, Any]:
    parent, _, last = key.rpartition(".")
    found, section = _get_dotted(data, parent) if parent else (True, data)
    if not found or not isinstance(section, dict) or last not in section:
        return False, None
    return True, section.pop(last)


def _put_dotted(data: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for i, part in enumerate(parents):
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"config key {'.'.join(parents[: i + 1])!r} is not a section")
    data[last] = value


def resolve_path(source: str | Path, packaged: dict[str, Path]) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    if str(source) in packaged:
        return packaged[str(source)]
    names = f" or one of the packaged configs: {', '.join(packaged)}" if packaged else ""
    raise ConfigError(f"config file {source} does not exist (not found as a YAML file{names})")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: where, what, and in which construct."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(exc, "problem", None) or brief(exc)
    context = getattr(exc, "context", None)
    return f"invalid YAML{where}: {what}" + (f" ({context})" if context else "")


def read_with_bases(
    path: Path, packaged: dict[str, Path], seen: tuple[Path, ...] = (), renames: Renames | None = None
) -> dict[str, Any]:
    """The file's mapping merged onto its `base:` chain (the base first, then each file that names it); each
    file's old keys moved to their new names first (`renames`)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself ({' -> '.join(map(str, seen))})")
    data = read_yaml(path)
    base = data.pop("base", None)
    if renames is not None:
        data = renames.apply(data, str(path))
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    relative = path.parent / base
    try:
        base_path = relative if relative.is_file() else resolve_path(base, packaged)
    except ConfigError as exc:
        raise ConfigError(f"{path}: base: {exc}") from None
    return merge(read_with_bases(base_path, packaged, (*seen, path.resolve()), renames), data)


def merge(base: dict, top: dict) -> dict:
    """`top` over `base`: mappings merge key by key, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else copy.deepcopy(v)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain Python (lists, not tuples), as YAML and checkpoints store it."""
    return _plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- building and setting
def _build(cls: type, data: Any, where: str) -> Any:
    """Dataclass `cls` from a mapping, recursively; unknown keys are errors with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    obj = cls()
    for key, value in data.items():
        set_field(obj, str(key), value, where)
    return obj


def set_field(obj: Any, key: str, value: Any, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    path = f"{where}.{key}" if where else key
    if key not in hints:
        close = difflib.get_close_matches(key, list(hints), n=1)
        hint = f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {path!r}{hint}; valid: {', '.join(hints)}")
    tp = hints[key]
    if dataclasses.is_dataclass(tp):
        # Merge into the existing default so that a partial mapping keeps the other defaults.
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        sub = getattr(obj, key)
        for k, v in value.items():
            set_field(sub, str(k), v, path)
        return
    setattr(obj, key, coerce(value, tp, path))


def set_dotted(cfg: Any, key: str, value: Any) -> None:
    """cfg.<a>.<b>... = value; inside a dict-typed field (e.g. model.overrides.depth) the dict is extended."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[:i])
        if isinstance(obj, dict):
            obj = obj.setdefault(part, {})
            if not isinstance(obj, dict):
                raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is not a section (cannot set {key})")
            continue
        hints = typing.get_type_hints(type(obj))
        if part not in hints:
            set_field(obj, part, None, where)  # raises the unknown-key error
        sub = getattr(obj, part)
        if sub is None and _is_dict_type(hints[part]):
            sub = {}
            setattr(obj, part, sub)
        if not (dataclasses.is_dataclass(sub) or isinstance(sub, dict)):
            raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is not a section (cannot set {key})")
        obj = sub
    if isinstance(obj, dict):
        obj[parts[-1]] = value
    else:
        set_field(obj, parts[-1], value, ".".join(parts[:-1]))


def _is_dict_type(tp: Any) -> bool:
    return any(typing.get_origin(a) is dict or a is dict for a in _union_args(tp))


def _union_args(tp: Any) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def coerce(value: Any, tp: Any, path: str) -> Any:
    """`value` as type `tp`, or a ConfigError naming the field."""
    args = _union_args(tp)
    if len(args) > 1:  # Optional[...] and other unions
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    try:
        return _convert(value, tp, path)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}") from None
    except LookupError:
        raise ConfigError(f"{path}: unsupported field type {tp}") from None


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(float(value)) if isinstance(value, str) else int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / yes / off / on as a boolean
            return "no" if value is False else "yes"
        return str(value)
    if tp is tuple or origin is tuple:
        items, inner = _as_list(value), typing.get_args(tp)
        if not inner or (len(inner) == 2 and inner[1] is Ellipsis):
            return tuple(coerce(v, inner[0], path) for v in items) if inner else tuple(items)
        if len(items) != len(inner):
            raise ValueError
        return tuple(coerce(v, t, path) for v, t in zip(items, inner))
    if tp is list or origin is list:
        inner = typing.get_args(tp)
        return [coerce(v, inner[0], path) for v in _as_list(value)] if inner else _as_list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError
        inner = typing.get_args(tp)
        return {str(k): (coerce(v, inner[1], f"{path}.{k}") if inner else v) for k, v in value.items()}
    raise LookupError(tp)


def _as_list(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):  # "0.9,0.999" on the command line
        return [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
    if value is None:
        return []
    return [value]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
