"""Training state: LR schedule, EMA, RNG states and atomic, keep-last-N checkpoints.

A checkpoint holds everything a bit-identical resume needs: model (with BN buffers), optimizers,
discriminator, EMA, grad scaler, step, data position and the RNG states. The LR is a pure function of
the step, so the schedule needs no state of its own.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dcae.errors import UserError
from dcae.train.config import OptimConfig
from dcae.utils.io import atomic_torch_save

CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup from 0, then constant or cosine decay to lr * min_lr_ratio at `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the trainable parameters (fp32), with the usual warmup
    decay_t = min(decay, (1 + t) / (10 + t)) so that short runs are not dominated by the init."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = dict(model.named_parameters())
        for name, s in self.shadow.items():
            s.lerp_(params[name].detach().float(), 1.0 - d)

    def state_dict_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state dict (buffers included) with the averaged parameters swapped in."""
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, s in self.shadow.items():
            sd[name] = s.to(sd[name].dtype)
        return sd

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the phase's trainable parameters")
        self.num_updates = int(state["num_updates"])
        for name, s in self.shadow.items():
            s.copy_(state["shadow"][name])


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """All RNG states, as tensors, ints and tuples only: checkpoints then load with weights_only=True."""
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoint files
def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(state: dict[str, Any], folder: Path, step: int, keep_last: int) -> Path:
    """Atomic write (temp file + rename), then delete all but the newest `keep_last` checkpoints."""
    path = atomic_torch_save(state, checkpoint_path(folder, step))
    for _, old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def remove_stale_temp_files(folder: Path) -> None:
    """A SIGKILL during a save leaves `.step_*.pt.*.tmp` behind; it is never a valid checkpoint."""
    if folder.is_dir():
        for p in folder.glob(".step_*.tmp"):
            p.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint; weights_only: a checkpoint from elsewhere cannot run code when loaded."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read training checkpoint {path}: {exc}") from exc
