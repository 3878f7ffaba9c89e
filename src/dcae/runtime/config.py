"""One typed config loader for every trainer: dataclasses filled from YAML, `base:` inheritance, dotted
`key=value` overrides, values converted to each field's declared type.

    cfg = load_config(TrainConfig, "run.yaml", ["optim.lr=2e-4"], packaged={"tiny": path})

- A YAML file may start from another: `base: other.yaml` (relative to the file) or a packaged name; the
  file's mappings are merged into the base's, key by key, and its other values replace the base's.
- Unknown or mistyped fields are refused with the file and the field named (and a close match suggested).
- YAML 1.1 reads `6.4e-5` as a string and a bare `no` as False: numbers are converted, and a boolean given
  to a string field is read back as the word (`mixed_precision: no` -> "no").
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dcae.errors import UserError, brief

T = TypeVar("T")


class ConfigError(UserError):
    """A config that cannot be used: unknown keys, wrong types, impossible values."""


def load_config(
    cls: type[T],
    source: str | Path | dict | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    packaged: dict[str, Path] | None = None,
    finish: Callable[[T], None] | None = None,
) -> T:
    """A `cls` dataclass from a YAML file (or a name in `packaged`), a dict, or defaults, then overrides, then
    `finish(cfg)` (the trainer's expansion and validation). Any error of these steps names the file."""
    path = None if source is None or isinstance(source, dict) else resolve_path(source, packaged or {})
    data = read_with_bases(path, packaged or {}) if path is not None else dict(source or {})
    try:
        cfg = _apply(_build(cls, data, ""), overrides)
        if finish is not None:
            finish(cfg)
    except UserError as exc:
        if path is None:
            raise
        raise type(exc)(f"{path}: {exc}") from None
    return cfg


def _apply(cfg: T, overrides) -> T:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: {yaml_problem(exc)}") from None
        set_dotted(cfg, key.strip(), parsed)
    return cfg


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


def read_with_bases(path: Path, packaged: dict[str, Path], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping merged onto its `base:` chain (the base first, then each file that names it)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself ({' -> '.join(map(str, seen))})")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    relative = path.parent / base
    try:
        base_path = relative if relative.is_file() else resolve_path(base, packaged)
    except ConfigError as exc:
        raise ConfigError(f"{path}: base: {exc}") from None
    return merge(read_with_bases(base_path, packaged, (*seen, path.resolve())), data)


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
