"""The diffusion trainer's config: small dataclasses, loaded by dcae.runtime.config (YAML with `base:`,
dotted overrides, typed fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcae.errors import UserError
from dcae.runtime import config as runtime_config
from dcae.runtime.schedule import SCHEDULES


@dataclass
class ModelConfig:
    name: str = "DiT-S/1"  # see dcae.diffusion.nets.list_diffusion_models()
    learn_sigma: bool = False  # DDPM only: improved-DDPM learned variance (DiT)
    grad_checkpointing: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 4, hidden_size: 256} for small runs


@dataclass
class DiffusionConfig:
    objective: str = "flow"  # "flow" (velocity, linear path) or "ddpm" (epsilon)
    t_sampling: str = "logit_normal"  # flow: "uniform" or "logit_normal"
    beta_schedule: str = "linear"  # ddpm: "linear" (DiT) or "scaled_linear" (U-ViT)
    label_dropout: float = 0.1  # classifier-free guidance: the share of conditions dropped to the null one


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (decays to lr * min_lr_ratio at max_steps)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1+step)/(10+step)): a useful EMA in short runs too


@dataclass
class SampleConfig:
    every: int = 5000  # steps between sample grids (0: only at the end)
    num: int = 8
    classes: list[Any] | None = None  # default: 0, 1, ..., num-1 (modulo the class count)
    prompts: list[str] | None = None  # text models: the grid's prompts in turn (default: a few fixed ones)
    steps: int = 50
    solver: str = "auto"  # auto: heun for flow, dpm++ for ddpm
    cfg_scale: float = 1.5
    decode: bool = True  # decode through the autoencoder recorded in the latent index
    seed: int = 0


@dataclass
class TrainConfig:
    data: str = ""  # folder written by `dcae latents`
    out: str = "runs/diffusion"
    seed: int = 0
    batch_size: int = 256  # global batch (all processes and accumulation steps together)
    grad_accum: int = 1  # micro-batches per optimizer step: the same step in less memory
    max_steps: int = 400_000
    mixed_precision: str = "bf16"  # "no", "bf16" or "fp16"
    compile: bool = False  # torch.compile the model (GPU)
    num_workers: int = 4
    use_flip: bool = True  # use flipped latents when the folder has them
    log_every: int = 50
    tensorboard: bool = True  # also log to out/tensorboard when the tensorboard package is installed
    ckpt_every: int = 5000
    keep_last: int = 3
    resume: str = "auto"  # "auto" (latest checkpoint in out/), "none", or a checkpoint path
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    return runtime_config.load_config(TrainConfig, path, overrides or [], finish=validate_config)


def validate_config(cfg: TrainConfig) -> None:
    if cfg.resume in ("no", "false", "None", "null"):  # YAML reads a bare `resume: no` as a boolean
        cfg.resume = "none"
    problems = []
    if not cfg.data:
        problems.append("data (a folder written by `dcae latents`) is required")
    if cfg.diffusion.objective not in ("flow", "ddpm"):
        problems.append(f"diffusion.objective must be flow or ddpm, got {cfg.diffusion.objective!r}")
    if cfg.model.learn_sigma and cfg.diffusion.objective != "ddpm":
        problems.append("model.learn_sigma needs diffusion.objective=ddpm")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        problems.append(f"mixed_precision must be no, bf16 or fp16, got {cfg.mixed_precision!r}")
    if cfg.optim.schedule not in SCHEDULES:
        problems.append(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}")
    for name in ("batch_size", "grad_accum", "max_steps", "log_every", "keep_last"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1")
    if problems:
        raise UserError("invalid training config: " + "; ".join(problems))


def config_to_dict(cfg: TrainConfig) -> dict:
    return runtime_config.to_dict(cfg)
