"""A diffusion run's checkpoints (`out/checkpoints/step_XXXXXXX.pt`) and the model and process they describe.

A checkpoint holds: model and EMA weights (each a full state dict), optimizer, step, every process's RNG
state, the config, the model's arguments (`model_args`: name, sizes, overrides and the conditioning as a spec) and
the summary of the latent cache it trained on (`latents`: dcae.diffusion.cache.CacheIndex without the shards: the
autoencoder that decodes samples and its scaling factor, class names or the text encoder, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dcae.diffusion.cache import CacheIndex
from dcae.diffusion.conditioning import Conditioning, from_record, from_spec
from dcae.diffusion.nets import create_diffusion_model
from dcae.diffusion.processes.ddpm import GaussianDiffusion
from dcae.diffusion.processes.flow import FlowMatching
from dcae.diffusion.train.config import DiffusionConfig, recorded_config
from dcae.diffusion.train.lora import add_lora
from dcae.errors import UserError, brief
from dcae.runtime import checkpoint as ckpt
from dcae.runtime import sharding

DIGITS = 7  # step_0000100.pt


def checkpoint_path(out: str | Path, step: int) -> Path:
    return ckpt.checkpoint_path(Path(out) / "checkpoints", step, DIGITS)


def list_checkpoints(out: str | Path) -> list[Path]:
    """A run folder's checkpoints, oldest first."""
    return ckpt.list_checkpoints(Path(out) / "checkpoints")


def latest_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or sharded checkpoint folder, or the newest one in a run folder."""
    path = Path(path)
    if path.is_file() or sharding.is_checkpoint(path):
        return path
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"no checkpoint found at {path} (expected a .pt file or a run folder with checkpoints/)")
    return found[-1]


def make_process(d: DiffusionConfig, learn_sigma: bool = False) -> FlowMatching | GaussianDiffusion:
    if d.objective == "flow":
        return FlowMatching(t_sampling=d.t_sampling, cond_dropout=d.cond_dropout)
    return GaussianDiffusion(beta_schedule=d.beta_schedule, learn_sigma=learn_sigma, cond_dropout=d.cond_dropout)


def normalized_model_args(model_args: dict) -> dict:
    """Model arguments as this version records them: the conditioning once, as a spec. Checkpoints of earlier
    versions recorded `num_classes` instead, and a text model's caption width and token count also among the
    overrides; read that way, they resume and compare equal to what the same config builds now."""
    a = dict(model_args)
    spec = from_record(a).spec()
    a.pop("num_classes", None)
    a["overrides"] = {
        k: v for k, v in (a.get("overrides") or {}).items() if k not in ("caption_channels", "max_tokens")
    }
    a["conditioning"] = spec
    return a


def build_model(model_args: dict) -> torch.nn.Module:
    a = normalized_model_args(model_args)
    conditioning = from_spec(a.pop("conditioning"))
    lora = a.pop("lora", None)  # a LoRA run: the adapters (dcae.diffusion.train.lora) on the same network
    model = create_diffusion_model(a.pop("name"), **{**a.pop("overrides"), **a, **conditioning.network_args()})
    if lora:
        add_lora(model, lora)
    return model


def conditioning_of(meta: dict) -> Conditioning:
    """The conditioning of a checkpoint's model (from `load_checkpoint`'s metadata)."""
    return from_spec(normalized_model_args(meta["model_args"])["conditioning"])


def load_checkpoint(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(model in eval mode, diffusion process, checkpoint metadata) from a training checkpoint or run folder."""
    path = latest_checkpoint(path)
    state = sharding.load_checkpoint(path, optimizer=False)  # a sharded folder: consolidated on the CPU
    if not isinstance(state, dict) or "model_args" not in state:
        raise UserError(f"{path} is not a `dcae diffusion train` checkpoint")
    try:  # what the checkpoint records builds the model, the process and the metadata, or it is damaged
        model = build_model(state["model_args"])
        model.load_state_dict(state["ema" if use_ema else "model"])
        config = recorded_config(state["config"])  # older checkpoints: the old key names
        process = make_process(DiffusionConfig(**config["diffusion"]), state["model_args"]["learn_sigma"])
        meta = {k: state[k] for k in ("step", "config", "model_args")}
        meta["config"] = config
        if type(meta["step"]) is not int:
            raise ValueError("step of the wrong type")
        conditioning_of(meta)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, UserError) as exc:
        raise UserError(
            f"{path}: damaged `dcae diffusion train` checkpoint ({type(exc).__name__}: {brief(exc)})"
        ) from None
    # What the model was trained on: the autoencoder and its scaling factor (no default: a record without one is
    # an error naming the checkpoint), the latent size, the classes or the text encoder.
    spec = normalized_model_args(meta["model_args"])["conditioning"]
    meta["latents"] = CacheIndex.from_summary(state.get("latents"), spec, f"{path}: latents")
    model.to(device).eval()
    meta["path"] = str(path)
    return model, process, meta
