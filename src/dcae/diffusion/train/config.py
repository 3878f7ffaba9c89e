"""The diffusion trainer's config: small dataclasses, loaded by dcae.runtime.config (YAML with `base:`,
dotted overrides, typed fields). The shared names (out_dir, seed, mixed_precision, grad_accum, batch_size as
the global batch, num_workers, ema_decay, ema_warmup, checkpoint.*, log.*, model.gradient_checkpointing) are the
autoencoder trainer's too; the keys they replaced still load, with a warning (RENAMED)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcae.errors import UserError
from dcae.runtime import config as runtime_config
from dcae.runtime.config import CheckpointConfig, LogConfig, ParallelConfig, parallel_problems
from dcae.runtime.schedule import SCHEDULES
from dcae.utils import numbers as num
from dcae.utils.numbers import field_problems, fields_problems, items_problems

# Old key -> new key (dotted). Configs, overrides and the configs that checkpoints recorded are read through it.
RENAMED = {
    "out": "out_dir",
    "log_every": "log.every",
    "tensorboard": "log.tensorboard",
    "ckpt_every": "checkpoint.every",
    "keep_last": "checkpoint.keep_last",
    "optim.ema_decay": "ema_decay",
    "optim.ema_warmup": "ema_warmup",
    "diffusion.label_dropout": "diffusion.cond_dropout",
    "model.grad_checkpointing": "model.gradient_checkpointing",
}


@dataclass
class ModelConfig:
    name: str = "DiT-S/1"  # see dcae.diffusion.nets.list_diffusion_models()
    learn_sigma: bool = False  # DDPM only: improved-DDPM learned variance (DiT)
    gradient_checkpointing: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 4, hidden_size: 256} for small runs


@dataclass
class DiffusionConfig:
    objective: str = "flow"  # "flow" (velocity, linear path) or "ddpm" (epsilon)
    t_sampling: str = "logit_normal"  # flow: "uniform" or "logit_normal"
    beta_schedule: str = "linear"  # ddpm: "linear" (DiT) or "scaled_linear" (U-ViT)
    # Classifier-free guidance: the share of conditions (class labels, captions) dropped to the null one.
    cond_dropout: float = 0.1


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (decays to lr * min_lr_ratio at max_steps)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


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
class AugmentedConfig:
    """DC-AE 1.5's augmented diffusion training on a structured latent (dcae.diffusion.train.augmented): each
    micro-batch's loss is the mean of the losses on `subsets` leading channel subsets latent[:, :c], c drawn
    uniformly from `channels`, plus the whole latent when `include_full`. Empty `channels`: off. On, the network
    is built with adaptive channels (model overrides gain adaptive_channel: true)."""

    channels: list[int] = field(default_factory=list)  # e.g. [16, 32, 48] for a 64-channel latent
    subsets: int = 1  # subsets drawn per micro-batch (with replacement)
    include_full: bool = True  # also the loss on all channels, every micro-batch


@dataclass
class LoraSettings:
    """LoRA through peft (dcae.diffusion.train.lora): rank 0 trains every weight (full fine-tuning)."""

    rank: int = 0
    alpha: float | None = None  # peft's lora_alpha (None: the rank, so the update is B A unscaled)
    dropout: float = 0.0
    # SANA's attention projections, as diffusers' train_dreambooth_lora_sana.py (feed-forward: conv_inverted,
    # conv_point are 1x1 convolutions that peft adapts too)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class FinetuneConfig:
    """Start from a pretrained model (dcae.diffusion.t2i.finetune) instead of random weights."""

    pretrained: str = ""  # a SANA pipeline folder or Hub id, a transformer folder, or one of our runs / checkpoints
    # Only these modules (fnmatch patterns of module names, e.g. [patch_embed, proj_out]) train, besides any LoRA
    # adapters; the rest is frozen. Empty: all weights train (LoRA: only the adapters).
    trainable: list[str] = field(default_factory=list)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class TrainConfig:
    data: str = ""  # folder written by `dcae latents` or `dcae t2i cache`
    out_dir: str = "runs/diffusion"
    seed: int = 0
    batch_size: int = 256  # global batch (all processes and accumulation steps together)
    grad_accum: int = 1  # micro-batches per optimizer step: the same step in less memory
    max_steps: int = 400_000
    mixed_precision: str = "bf16"  # "no", "bf16" or "fp16"
    compile: bool = False  # torch.compile the model (GPU)
    num_workers: int = 4  # DataLoader worker processes (0 = load in the training process)
    use_flip: bool = True  # use flipped latents when the folder has them
    ema_decay: float = 0.9999  # the EMA of the weights that samples and exports use
    ema_warmup: bool = True  # decay min(ema_decay, (1+k)/(10+k)) at the k-th update: a useful EMA in short runs too
    resume: str = "auto"  # "auto" (latest checkpoint in out_dir), "none", or a checkpoint path
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=5000, keep_last=3))
    log: LogConfig = field(default_factory=lambda: LogConfig(every=50, tensorboard=True))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    augmented: AugmentedConfig = field(default_factory=AugmentedConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    return runtime_config.load_config(TrainConfig, path, overrides or [], finish=_finish, renamed=RENAMED)


def _finish(cfg: TrainConfig) -> None:
    validate_config(cfg)
    warn_long_warmup(cfg)


def warn_long_warmup(cfg: TrainConfig) -> None:
    """One warning line (first process only) when the learning-rate warm-up does not end before the run does."""
    o = cfg.optim
    if o.warmup_steps >= cfg.max_steps and os.environ.get("RANK", "0") == "0":
        when = (
            f"reaches optim.lr={o.lr:g} only at the last step"
            if o.warmup_steps == cfg.max_steps
            else f"never reaches optim.lr={o.lr:g}"
        )
        warnings.warn(f"optim.warmup_steps={o.warmup_steps} >= max_steps={cfg.max_steps}: the whole run is "
                      f"learning-rate warm-up (the rate {when})", stacklevel=2)  # fmt: skip


# The numeric fields and what each may be (dcae.utils.numbers: the command line's options use the same kinds).
NUMBERS = {
    "seed": num.SEED,
    "batch_size": num.COUNT,
    "grad_accum": num.COUNT,
    "max_steps": num.COUNT,
    "num_workers": num.WORKERS,
    "ema_decay": num.FRACTION,
    "checkpoint.every": num.COUNT,
    "checkpoint.keep_last": num.COUNT,
    "log.every": num.COUNT,
    "diffusion.cond_dropout": num.PROBABILITY,
    "optim.lr": num.POSITIVE,
    "optim.weight_decay": num.NONNEGATIVE,
    "optim.warmup_steps": num.NONNEGATIVE_INT,
    "optim.min_lr_ratio": num.PROBABILITY,
    "optim.grad_clip": num.NONNEGATIVE,
    "sample.every": num.NONNEGATIVE_INT,
    "sample.num": num.Kind(integer=True, lo=1, hi=1024),  # one grid of images, decoded at once
    "sample.steps": num.COUNT,
    "sample.cfg_scale": num.GUIDANCE,
    "sample.seed": num.SEED,
    "augmented.subsets": num.COUNT,
    "finetune.lora.rank": num.NONNEGATIVE_INT,
    "finetune.lora.dropout": num.PROBABILITY,
}
# model.overrides: what a number given for one of the networks' arguments may be (other numbers: finite).
OVERRIDE_NUMBERS = {"mlp_ratio": num.POSITIVE, "norm_eps": num.POSITIVE, "interpolation_scale": num.POSITIVE,
                    "dropout": num.FRACTION}  # fmt: skip


def _override_problems(overrides: dict[str, Any]) -> list[str]:
    """Counts among model.overrides (depth, hidden_size, heads, ...) are whole numbers of 1 .. 65536; other
    numbers finite (and of their kind where OVERRIDE_NUMBERS knows it)."""
    problems: list[str] = []
    for key, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        kind = OVERRIDE_NUMBERS.get(key) or (num.WIDTH if isinstance(value, int) else num.FINITE)
        field_problems(problems, f"model.overrides.{key}", value, kind)
    return problems


def validate_config(cfg: TrainConfig) -> None:
    if cfg.resume in ("no", "false", "None", "null"):  # YAML reads a bare `resume: no` as a boolean
        cfg.resume = "none"
    problems = []
    if not cfg.data:
        problems.append("data (a folder written by `dcae latents` or `dcae t2i cache`) is required")
    if cfg.diffusion.objective not in ("flow", "ddpm"):
        problems.append(f"diffusion.objective must be flow or ddpm, got {cfg.diffusion.objective!r}")
    if cfg.model.learn_sigma and cfg.diffusion.objective != "ddpm":
        problems.append("model.learn_sigma needs diffusion.objective=ddpm")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        problems.append(f"mixed_precision must be no, bf16 or fp16, got {cfg.mixed_precision!r}")
    if cfg.optim.schedule not in SCHEDULES:
        problems.append(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}")
    problems += fields_problems(cfg, NUMBERS)
    betas = cfg.optim.betas
    if len(betas) != 2:
        problems.append(f"optim.betas must be two numbers (Adam's beta1, beta2), got {betas}")
    problems += items_problems("optim.betas", betas[:2], num.FRACTION)
    problems += _override_problems(cfg.model.overrides)
    problems += parallel_problems(cfg.parallel, cfg.mixed_precision)
    problems += items_problems("augmented.channels", cfg.augmented.channels, num.WIDTH)
    if cfg.augmented.channels and cfg.model.learn_sigma:
        problems.append("augmented.channels needs model.learn_sigma=false (the output channels follow the input)")
    lora = cfg.finetune.lora
    if lora.alpha is not None:
        field_problems(problems, "finetune.lora.alpha", lora.alpha, num.POSITIVE)
    if lora.rank and not lora.target_modules:
        problems.append("finetune.lora.target_modules is empty: name the layers LoRA adapts (e.g. to_q, to_k)")
    if problems:
        raise UserError("invalid training config: " + "; ".join(problems))


def config_to_dict(cfg: TrainConfig) -> dict:
    return runtime_config.to_dict(cfg)


def recorded_config(config: dict) -> dict:
    """The config a checkpoint recorded, in today's names (checkpoints of older versions use the old ones)."""
    return runtime_config.rename_keys(config, RENAMED)
