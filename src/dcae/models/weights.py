"""Reading and writing DC-AE weights: the original format, the diffusers format, single files and the Hub.

This module knows configurations, not the model class: `load` and `infer_config` take the class to
build (`model_class(config)`), so that `DCAE.from_pretrained` / `save_pretrained` (dcae.models.autoencoder)
can use it without an import cycle.

Formats, detected automatically:
- original (`mit-han-lab/dc-ae-*`): `config.json` = {"model_name": ...} (ours adds "dcae_config" for
  user-defined shapes) + `model.safetensors`;
- diffusers (`mit-han-lab/dc-ae-*-diffusers`): AutoencoderDC `config.json` +
  `diffusion_pytorch_model.safetensors`, possibly sharded with an `.index.json`;
- a single `.safetensors` / `.pt` / `.pth` file in either key scheme, including the reference training
  checkpoints (`{"state_dict": ..., "ema": ...}`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dcae.errors import UnknownModelError, UserError, WeightsError, brief
from dcae.models.config import DCAEConfig, get_config, is_model_name, list_models
from dcae.models.convert import (
    ConversionError,
    DiffusersConfigError,
    diffusers_to_original,
    from_diffusers_config,
    original_to_diffusers,
    to_diffusers_config,
)
from dcae.utils.io import atomic_save_safetensors, atomic_write_json

ORIGINAL_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ----------------------------------------------------------------------------- reading files
def read_state_dict(path: str | os.PathLike, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of one weight file; corrupt or truncated files raise WeightsError naming the file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise WeightsError(f"cannot read weights from {path}: {brief(exc)}") from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        if prefer_ema and isinstance(obj.get("ema"), dict) and obj["ema"]:
            ema = obj["ema"]
            # reference checkpoints keep {decay: state_dict}; take the first one
            first = next(iter(ema.values()))
            return first if isinstance(first, dict) else ema
        return obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not contain a state dict")
    return obj


def read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    index = json.loads(index_path.read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(read_state_dict(index_path.parent / shard))
    return out


def fingerprint(module: nn.Module) -> str:
    """A short hash of a model's weights and buffers (names, dtypes, shapes, values): what makes a cache or a
    checkpoint say which weights it was made with, so that weights replaced at the same path are noticed."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        t = t.detach().to("cpu").reshape(-1).contiguous()  # 0-d buffers (BatchNorm counters) too
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def key_scheme(state_dict: dict[str, Any], source: str = "weights") -> str:
    keys = list(state_dict)
    if any(k.startswith(("encoder.project_in", "encoder.stages", "decoder.project_out")) for k in keys):
        return "original"
    if any(k.startswith(("encoder.conv_in", "encoder.down_blocks", "decoder.up_blocks")) for k in keys):
        return "diffusers"
    raise WeightsError(f"{source}: not a DC-AE state dict (first keys: {keys[:3]})")


# ----------------------------------------------------------------------------- shapes -> config
def infer_config(
    state_dict: dict[str, torch.Tensor], source: str = "weights", *, model_class: Callable[[DCAEConfig], nn.Module]
) -> DCAEConfig:
    """The zoo configuration whose key set and shapes match a single-file state dict (the expected shapes
    are those of `model_class(config)`, built on the meta device).

    Several released models share shapes (in/mix, sana 1.0/1.1); where they also share the scaling
    factor any of them is right, otherwise the caller must say which one (`model_name=`).
    """
    diffusers_keys = key_scheme(state_dict, source) == "diffusers"
    matches = []
    for name in list_models():
        with torch.device("meta"):
            model = model_class(get_config(name))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        # diffusers names are ambiguous for a few layouts: read them against each candidate's keys
        try:
            sd = diffusers_to_original(state_dict, expected) if diffusers_keys else state_dict
        except ConversionError:  # keys no DC-AE has (another diffusers model family)
            continue
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        if _strip_bn_counters(expected) == _strip_bn_counters(shapes):
            matches.append(model.config)
    if not matches:
        raise WeightsError(f"{source}: the weights match no known DC-AE configuration; pass a config")
    if len({m.scaling_factor for m in matches}) > 1:
        names = ", ".join(m.name for m in matches)
        raise UserError(
            f"{source}: the weights fit several released models ({names}) that differ only in their scaling "
            "factor; say which one with model_name=... (CLI: --model-name)"
        )
    return matches[0]


def _strip_bn_counters(shapes: dict[str, tuple]) -> dict[str, tuple]:
    return {k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}


def state_dict_problems(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Every missing, unexpected or wrong-shape key of `state_dict` against a model's own state dict, as
    short sentences (empty when it fits). BatchNorm's `num_batches_tracked` may be absent."""
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
    if wrong:
        problems.append(f"{len(wrong)} keys with the wrong shape (e.g. {'; '.join(wrong[:3])})")
    return problems


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Name every missing, unexpected or wrong-shape key before loading."""
    problems = state_dict_problems(model.state_dict(), state_dict)
    if problems:
        raise WeightsError(f"weights in {source} do not fit {model.config.name!r}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- the Hub
def hub_snapshot(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local folder with the repo's config and weights, from the Hub cache or the network.

    Offline and not cached fails fast with a message that says what to do instead. `allow_patterns`: the files
    to fetch (default: the JSON files and safetensors weights, what an autoencoder needs).
    """
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or ["*.json", "*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass  # not cached: try the network below
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserError(
            f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it where the Hub "
            f"is reachable (`huggingface-cli download {repo_id}`) and pass the local folder instead"
        )
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise UserError(
            f"cannot download {repo_id} from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:160]}) and it "
            f"is not cached. Download it where the Hub is reachable (`huggingface-cli download {repo_id}`) and "
            "pass the local folder, or set HF_ENDPOINT to a mirror."
        ) from exc


# ----------------------------------------------------------------------------- loading
def _find_weights(folder: Path) -> Path:
    for candidate in (
        ORIGINAL_WEIGHTS,
        DIFFUSERS_WEIGHTS,
        f"{DIFFUSERS_WEIGHTS}.index.json",
        f"{ORIGINAL_WEIGHTS}.index.json",
        "diffusion_pytorch_model.bin",
        "pytorch_model.bin",
    ):
        if (folder / candidate).exists():
            return folder / candidate
    raise WeightsError(
        f"{folder} holds no DC-AE weights (looked for {ORIGINAL_WEIGHTS}, {DIFFUSERS_WEIGHTS} and sharded variants)"
    )


def _config_from_json(folder: Path) -> DCAEConfig | None:
    """The configuration a folder's config.json describes, in any of the formats; None without one."""
    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        d: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(d, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(d).__name__}")
    try:
        if "dcae_config" in d:
            return DCAEConfig.from_dict(d["dcae_config"])
        if "model_name" in d:
            return get_config(d["model_name"])
        if "_class_name" in d or "latent_channels" in d:
            cfg = from_diffusers_config(d, name=folder.name.removesuffix("-diffusers"))
            return _zoo_match(cfg) or cfg
    except UnknownModelError as exc:
        raise UnknownModelError(f"{path}: {exc}") from None
    except (ValueError, TypeError, LookupError, ArithmeticError, AttributeError, RecursionError) as exc:
        # DiffusersConfigError, an invalid dcae_config, or fields of the wrong type or length
        raise WeightsError(f"{path}: {type(exc).__name__}: {brief(exc)}") from None
    return None


def _zoo_match(cfg: DCAEConfig) -> DCAEConfig | None:
    """The zoo entry with the same shape and scaling factor as a diffusers config, to keep its name/Hub ids."""
    for name in list_models():
        z = get_config(name)
        same = {k: v for k, v in z.to_dict().items() if k not in ("name", "hub_id", "hub_id_diffusers", "extra")}
        mine = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "hub_id", "hub_id_diffusers", "extra")}
        if same == mine:
            return z
    return None


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local path for `source`: an existing path, a zoo name (-> its Hub repo) or a Hub id."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = str(source)
    if is_model_name(name):  # a zoo name or alias: its Hub repo (an alias may live elsewhere)
        cfg = get_config(name)
        return hub_snapshot(cfg.hub_id, revision)
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return hub_snapshot(name, revision)
    try:
        get_config(name)  # raises UnknownModelError with the closest match
    except UnknownModelError as exc:
        raise UnknownModelError(f"{name!r} is neither a local path, a Hub id nor a known model. {exc}") from None
    raise UnknownModelError(name)


def load(
    model_class: Callable[[DCAEConfig], nn.Module],
    source: str | os.PathLike,
    model_name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    prefer_ema: bool = False,
) -> nn.Module:
    """Build the right `model_class(config)` for `source` and load its weights with strict key and shape
    checks; in eval mode. What `DCAE.from_pretrained` does."""
    path = resolve_source(source, revision)
    if path.is_dir():
        weights = _find_weights(path)
        folder = path
    elif path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json"):
        weights, folder = path, path.parent
    else:
        raise WeightsError(f"{path}: expected a folder or a weight file ({', '.join(WEIGHT_SUFFIXES)})")
    origin = str(weights)
    sd = read_sharded(weights) if weights.name.endswith(".index.json") else read_state_dict(weights, prefer_ema)
    scheme = key_scheme(sd, origin)  # another family's weights fail here, named
    if model_name is not None:
        cfg = get_config(model_name)
    else:
        cfg = _config_from_json(folder) or infer_config(sd, source=origin, model_class=model_class)

    try:
        model = model_class(cfg)
    except (ValueError, TypeError, LookupError, ArithmeticError, AttributeError, RuntimeError) as exc:
        # shapes or settings the layers cannot build (channels that do not divide, a width of None, ...)
        raise WeightsError(f"{folder / 'config.json'}: cannot build {cfg.name!r}: {brief(exc)}") from None
    if scheme == "diffusers":
        try:
            sd = diffusers_to_original(sd, model.state_dict().keys())
        except ConversionError as exc:
            raise WeightsError(f"{origin}: {exc}") from exc
    check_state_dict(model, sd, origin)
    model.load_state_dict(sd, strict=False)  # only BN counters may be absent; checked above
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


# ----------------------------------------------------------------------------- saving
def save(model: nn.Module, directory: str | os.PathLike, format: str = "original", overwrite: bool = False) -> Path:
    """Write a loadable folder of a model with a `config` (DCAEConfig) and its state dict. Both files are
    written atomically; an existing folder with weights is refused unless `overwrite`."""
    directory = Path(directory)
    if format not in ("original", "diffusers"):
        raise UserError(f"unknown format {format!r} (expected 'original' or 'diffusers')")
    weights_name = ORIGINAL_WEIGHTS if format == "original" else DIFFUSERS_WEIGHTS
    if (directory / weights_name).exists() and not overwrite:
        raise UserError(f"{directory / weights_name} already exists (pass overwrite=True / --overwrite)")
    sd = {k: v for k, v in model.state_dict().items()}
    cfg = model.config
    if format == "original":
        config = {"model_name": cfg.name, "dcae_config": cfg.to_dict()}
    else:
        try:
            config = to_diffusers_config(cfg)
        except DiffusersConfigError as exc:
            raise UserError(f"{cfg.name} cannot be saved in the diffusers format: {exc}") from exc
        config["_diffusers_version"] = _diffusers_version()
        sd = original_to_diffusers(sd, cfg)
    atomic_save_safetensors(sd, directory / weights_name, metadata={"format": "pt"})
    atomic_write_json(directory / "config.json", config)
    return directory


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:
        return "0.32.0"
