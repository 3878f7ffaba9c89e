"""A diffusion run's checkpoints (`out/checkpoints/step_XXXXXXX.pt`) and the model and process they describe.

A checkpoint holds: model and EMA weights (each a full state dict), optimizer, step, every process's RNG
state, the config, the model's arguments (`model_args`, with `num_classes` saying its conditioning) and what
the latents index says about the data (`latents`: the autoencoder that decodes samples, class names, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dcae.diffusion.conditioning import Conditioning, from_record
from dcae.diffusion.nets import create_diffusion_model
from dcae.diffusion.processes.ddpm import GaussianDiffusion
from dcae.diffusion.processes.flow import FlowMatching
from dcae.diffusion.train.config import DiffusionConfig
from dcae.errors import UserError, brief
from dcae.runtime import checkpoint as ckpt

DIGITS = 7  # step_0000100.pt
# What a checkpoint records of the latent folder: enough to decode samples and to know the data.
LATENT_META_KEYS = ("model", "model_config", "scaling_factor", "resolution", "latent_shape", "num_classes",
                    "class_names", "class_ids", "spatial_compression", "text_encoder", "max_tokens",
                    "caption_channels")  # fmt: skip


def checkpoint_path(out: str | Path, step: int) -> Path:
    return ckpt.checkpoint_path(Path(out) / "checkpoints", step, DIGITS)


def list_checkpoints(out: str | Path) -> list[Path]:
    """A run folder's checkpoints, oldest first."""
    return ckpt.list_checkpoints(Path(out) / "checkpoints")


def latest_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest one in a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"no checkpoint found at {path} (expected a .pt file or a run folder with checkpoints/)")
    return found[-1]


def make_process(d: DiffusionConfig, learn_sigma: bool = False) -> FlowMatching | GaussianDiffusion:
    if d.objective == "flow":
        return FlowMatching(t_sampling=d.t_sampling, cond_dropout=d.label_dropout)
    return GaussianDiffusion(beta_schedule=d.beta_schedule, learn_sigma=learn_sigma, cond_dropout=d.label_dropout)


def build_model(model_args: dict) -> torch.nn.Module:
    a = dict(model_args)
    a.pop("conditioning", None)  # text models: recorded for readers, built from the overrides
    return create_diffusion_model(a.pop("name"), **{**a.pop("overrides", {}), **a})


def conditioning_of(meta: dict) -> Conditioning:
    """The conditioning of a checkpoint's model (from `load_checkpoint`'s metadata)."""
    return from_record(meta["model_args"])


def load_checkpoint(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(model in eval mode, diffusion process, checkpoint metadata) from a training checkpoint or run folder."""
    path = latest_checkpoint(path)
    state = ckpt.load_checkpoint(path)
    if not isinstance(state, dict) or "model_args" not in state:
        raise UserError(f"{path} is not a `dcae diffusion train` checkpoint")
    try:  # what the checkpoint records builds the model, the process and the metadata, or it is damaged
        model = build_model(state["model_args"])
        model.load_state_dict(state["ema" if use_ema else "model"])
        process = make_process(DiffusionConfig(**state["config"]["diffusion"]), state["model_args"]["learn_sigma"])
        meta = {k: state[k] for k in ("step", "config", "model_args", "latents")}
        if type(meta["step"]) is not int or not isinstance(meta["latents"], dict | None):
            raise ValueError("step or latents of the wrong type")
        conditioning_of(meta)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, UserError) as exc:
        raise UserError(
            f"{path}: damaged `dcae diffusion train` checkpoint ({type(exc).__name__}: {brief(exc)})"
        ) from None
    model.to(device).eval()
    meta["path"] = str(path)
    return model, process, meta
