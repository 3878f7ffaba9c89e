"""Training checkpoints: one file per saved step, written atomically, the last N kept, every process's RNG
state inside, read back with weights_only (a checkpoint from elsewhere cannot run code when loaded).

What goes in the file is the trainer's business; the file names are `step_<digits>.pt` in one folder. A run
sharded with FSDP writes folders `step_<digits>/` instead (dcae.runtime.sharding, whose load_checkpoint reads
both); they list and rotate like the files.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcae.errors import UserError, brief
from dcae.utils.io import atomic_torch_save

CKPT_RE = re.compile(r"^step_(\d+)(\.pt)?$")  # a file, or a sharded checkpoint's folder


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors, ints and tuples only (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states(accelerator) -> list[dict[str, Any]]:
    """Every process's RNG state, in rank order (a collective: all processes call it)."""
    if accelerator.num_processes > 1:
        return accelerator.gather_for_metrics([rng_state()], use_gather_object=True)
    return [rng_state()]


def restore_rng(saved: list | dict, rank: int) -> None:
    """This process's state from `all_rng_states` output (or one state, as older checkpoints hold it)."""
    if isinstance(saved, dict):
        set_rng_state(saved)
    else:
        set_rng_state(saved[rank] if rank < len(saved) else saved[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- files
def checkpoint_path(folder: Path, step: int, digits: int = 8) -> Path:
    return Path(folder) / f"step_{step:0{digits}d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder`, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], path: Path, keep_last: int) -> Path:
    """Atomic write (temp file + rename), then delete all but the newest `keep_last` in the same folder."""
    path = atomic_torch_save(state, path)
    for old in list_checkpoints(path.parent)[:-keep_last]:
        remove_checkpoint(old)
    return path


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file or a sharded checkpoint's folder."""
    if Path(path).is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


def remove_stale_temp_files(folder: Path) -> None:
    """A SIGKILL during a save leaves `.step_*.pt.*.tmp` (a sharded save: `.step_*.tmp/`) behind; it is never a
    valid checkpoint."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".step_*.tmp"):
            remove_checkpoint(p)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read training checkpoint {path}: {brief(exc)}") from exc


@contextlib.contextmanager
def restoring(path: Path):
    """Around the code that puts a checkpoint's contents back (weights, optimizer, EMA, counters, RNG): what
    fails there because a field is missing or of the wrong kind is a damaged checkpoint, named in one line."""
    try:
        yield
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise UserError(f"{path}: damaged training checkpoint ({type(exc).__name__}: {brief(exc)})") from None


def counter(state: dict, key: str) -> int:
    """A non-negative integer field of a checkpoint (a step, a count), or ValueError."""
    value = state[key]
    if type(value) is not int or value < 0:
        raise ValueError(f"{key} is {value!r}, not a count")
    return value
