"""Training configuration: small dataclasses, loaded from YAML, with dotted `key=value` overrides.

Where the defaults come from (DC-AE paper, arXiv 2410.10733, Sec. 3.3 / appendix; see docs/training.md):
- three phases "low-resolution full training", "high-resolution latent adaptation", "low-resolution
  head refinement", with their trainable sets and losses: the paper;
- optimizer figures (AdamW lr 6.4e-5 wd 0.1 / lr 1.6e-5 wd 1e-3 / lr 5.4e-5 betas (0.5, 0.9)): the paper;
- LPIPS weight, PatchGAN discriminator, hinge loss, adaptive GAN weight x0.5: not published by the
  authors; taken from taming-transformers / latent-diffusion autoencoders (LPIPS weight 1.0), which a
  community DC-AE reproduction follows (it uses LPIPS weight 0.25; set `loss.perceptual_weight=0.25`);
- resolutions, steps and batch sizes: ours (the paper trains at 256 px, adapts at 512/1024 px).

The shared names (out_dir, seed, mixed_precision, grad_accum, phaseN.batch_size as the global batch,
num_workers, ema_decay, ema_warmup, checkpoint.*, log.*) are the diffusion trainer's too; the keys they
replaced still load, with a warning (RENAMED).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcae.models.config import expand_residual
from dcae.runtime import config as runtime_config
from dcae.runtime.config import CheckpointConfig, ConfigError, ParallelConfig, parallel_problems
from dcae.runtime.config import LogConfig as _LogConfig
from dcae.runtime.schedule import SCHEDULES
from dcae.utils import numbers as num
from dcae.utils.numbers import fields_problems, items_problems

# Old key -> new key (dotted). Configs, overrides and the configs that checkpoints recorded are read through it.
RENAMED = {"data.num_workers": "num_workers"}

PHASE_NAMES = {
    1: "low-resolution full training",
    2: "high-resolution latent adaptation",
    3: "low-resolution head refinement",
}
# `{last}` expands to the index of the innermost stage (the one next to the latent).
INNER_STAGE_PATTERNS = {
    "encoder_inner_stage": "encoder.stages.{last}.*",
    "decoder_inner_stage": "decoder.stages.{last}.*",
}


@dataclass
class ModelConfig:
    name: str | None = None  # a zoo name (random init), e.g. dc-ae-f32c32-in-1.0
    config: dict[str, Any] | None = None  # DCAEConfig fields (a `base: <zoo name>` key starts from a zoo entry)
    init: str | None = None  # weights to fine-tune: anything DCAE.from_pretrained accepts (folder, file, Hub id)
    gradient_checkpointing: bool = False
    # DC-AE 1.5 structured latent: each micro-batch reconstructs from only the first k latent channels, k drawn
    # uniformly from this list (e.g. [16, 32, 64, 128]), so that every prefix of channels stays a usable latent
    # while fine-tuning. None: always all channels. Needs a model with a channel-sliceable latent.
    latent_channel_choices: list[int] | None = None


@dataclass
class DataConfig:
    # Folders (searched recursively), webdataset-style .tar shards (globs allowed), image files, or
    # "skimage:astronaut,coffee" (scikit-image's bundled photos, for offline demos and tests).
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    holdout: int = 0  # with no `val`: the last N train files (sorted by name) are held out for validation
    crop: str = "random"  # random | center
    resize: bool = True  # resize the short side to resolution * U(scale_range) before cropping
    scale_range: tuple[float, float] = (1.0, 1.0)
    hflip: float = 0.5  # probability of a horizontal flip


@dataclass
class OptimConfig:
    lr: float = 6.4e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (decays to lr * min_lr_ratio at the last step)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables (ours, the paper does not say)


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0  # taming/LDM use 1.0; a community DC-AE reproduction 0.25
    perceptual_net: str = "stlpips-vgg"  # stlpips-vgg | stlpips-alex | lpips-vgg | lpips-alex
    gan_weight: float = 0.0  # 0 = no GAN; phase 3 uses 0.5 (taming's disc_weight)
    gan_adaptive: bool = True  # scale by |grad rec| / |grad gan| at the last decoder layer (taming)
    gan_adaptive_max: float = 1e4  # clamp of that ratio (taming)
    disc_start: int = 0  # phase step from which the discriminator trains and the GAN loss applies
    # Steps over which the generator's GAN weight ramps linearly up to its full value, starting at disc_start
    # (step disc_start gets 1/gan_warmup of it); 0 = full weight at once. The discriminator is not ramped.
    gan_warmup: int = 0


@dataclass
class DiscConfig:
    """pix2pix / taming NLayerDiscriminator (PatchGAN)."""

    layers: int = 3
    channels: int = 64
    norm: str = "bn"  # bn | none
    lr: float | None = None  # None: the phase's generator lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0


@dataclass
class PhaseConfig:
    resolution: int = 256
    batch_size: int = 8  # global: images per optimizer step over all processes and accumulation steps
    steps: int = 1000  # optimizer steps
    max_minutes: float | None = None  # stop early after this much wall time (demos)
    trainable: dict[str, str] = field(default_factory=lambda: {"all": "*"})  # name -> glob ("re:" = regex)
    trainable_inner_stages: bool = False  # also train encoder.stages.{last}.* and decoder.stages.{last}.*
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)


def _phase1() -> PhaseConfig:
    # Paper: all parameters, L1 + perceptual, no GAN; AdamW lr 6.4e-5, wd 0.1, betas (0.9, 0.999).
    return PhaseConfig(resolution=256, optim=OptimConfig(lr=6.4e-5, weight_decay=0.1, betas=(0.9, 0.999)))


def _phase2() -> PhaseConfig:
    # Paper: only the layers next to the latent (optionally the innermost stages); lr 1.6e-5, wd 1e-3.
    return PhaseConfig(
        resolution=512,
        batch_size=4,
        trainable={"encoder_out": "encoder.project_out.*", "decoder_in": "decoder.project_in.*"},
        optim=OptimConfig(lr=1.6e-5, weight_decay=1e-3, betas=(0.9, 0.999)),
    )


def _phase3() -> PhaseConfig:
    # Paper: only the decoder head (norm, act, conv), L1 + perceptual + GAN; lr 5.4e-5, betas (0.5, 0.9).
    # Weight decay is not given for phase 3; we keep phase 2's small 1e-3. GAN settings: taming.
    return PhaseConfig(
        resolution=256,
        trainable={"decoder_head": "decoder.project_out.*"},
        optim=OptimConfig(lr=5.4e-5, weight_decay=1e-3, betas=(0.5, 0.9)),
        loss=LossConfig(gan_weight=0.5),
    )


@dataclass
class LogConfig(_LogConfig):  # every (CSV / TensorBoard rows), tensorboard: the runtime's
    image_every: int = 500  # reconstruction grid of the fixed validation batch (0 = start and end only)
    progress: bool = True  # tqdm bar


@dataclass
class ValConfig:
    every: int = 0  # held-out PSNR/SSIM during a phase (0 = only at the end of each phase)
    resolutions: list[int] = field(default_factory=list)  # evaluated at each phase end; [] = the phase's own
    max_images: int = 100
    batch_size: int = 8
    grid_images: int = 8
    lpips: bool = False  # also report LPIPS (the loss network) on the held-out set, at phase ends and every `every`
    at_start: bool = True  # evaluate before the first phase of a command (the "before" numbers)


@dataclass
class DecoderRecipeConfig:
    """Train a new decoder against the frozen encoder of --init (see dcae.train.decoder)."""

    student: dict[str, Any] | None = None  # base: <zoo name> and/or decoder_* DCAEConfig fields; None: off
    distill_weight: float = 0.0  # > 0: + weight * L1(student output, teacher decoder output)


@dataclass
class TrainConfig:
    out_dir: str = "runs/dcae"
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    grad_accum: int = 1  # micro-batches per optimizer step (each phaseN.batch_size is split into them)
    num_workers: int = 2  # DataLoader worker processes (0 = load in the training process)
    ema_decay: float = 0.9999  # 0 = no EMA; the exported result of each phase uses the EMA weights
    ema_warmup: bool = True  # decay min(ema_decay, (1+k)/(10+k)) at the k-th update: a useful EMA in short runs too
    find_unused_parameters: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    phase1: PhaseConfig = field(default_factory=_phase1)
    phase2: PhaseConfig = field(default_factory=_phase2)
    phase3: PhaseConfig = field(default_factory=_phase3)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # fsdp: phases without the GAN are sharded
    val: ValConfig = field(default_factory=ValConfig)
    decoder: DecoderRecipeConfig = field(default_factory=DecoderRecipeConfig)

    def phase(self, n: int) -> PhaseConfig:
        return getattr(self, f"phase{n}")

    def to_dict(self) -> dict[str, Any]:
        return runtime_config.to_dict(self)


# ----------------------------------------------------------------------------- loading
def load_config(source: str | Path | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file (or a packaged name such as 'tiny'), a dict, or defaults, then
    `key.sub=value` overrides (values parsed as YAML, converted to the field's type); see dcae.runtime.config."""
    return runtime_config.load_config(
        TrainConfig, source, overrides, packaged_configs(), finish=_finish, renamed=RENAMED
    )


def _finish(cfg: TrainConfig) -> None:
    _expand_model_shorthands(cfg)
    validate(cfg)


def _expand_model_shorthands(cfg: TrainConfig) -> None:
    """model.config.residual=false (a plain autoencoder) -> the four shortcut switches off, so that the model
    is built, saved and resumed from ordinary DCAEConfig fields."""
    if isinstance(cfg.model.config, dict):
        try:
            cfg.model.config = expand_residual(cfg.model.config)
        except ValueError as exc:
            raise ConfigError(f"model.config: {exc}") from None


def packaged_configs() -> dict[str, Path]:
    """Default configs shipped inside the package: {'tiny': .../train_tiny.yaml, ...}."""
    root = Path(__file__).resolve().parents[1] / "configs"
    return {p.stem.removeprefix("train_"): p for p in sorted(root.glob("train_*.yaml"))}


# ----------------------------------------------------------------------------- checks
# The numeric fields and what each may be (dcae.utils.numbers: the command line's options use the same kinds).
NUMBERS = {
    "seed": num.SEED,
    "grad_accum": num.COUNT,
    "num_workers": num.WORKERS,
    "ema_decay": num.FRACTION,
    "data.holdout": num.NONNEGATIVE_INT,
    "data.hflip": num.PROBABILITY,
    "checkpoint.every": num.COUNT,
    "checkpoint.keep_last": num.COUNT,
    "log.every": num.COUNT,
    "log.image_every": num.NONNEGATIVE_INT,
    "val.every": num.NONNEGATIVE_INT,
    "val.max_images": num.NONNEGATIVE_INT,
    "val.batch_size": num.COUNT,
    "val.grid_images": num.NONNEGATIVE_INT,
    "decoder.distill_weight": num.NONNEGATIVE,
}
# Each phaseN's (None: the field may be left unset).
PHASE_NUMBERS = {
    "resolution": num.COUNT,
    "batch_size": num.COUNT,
    "steps": num.COUNT,
    "max_minutes": num.MINUTES,
    "optim.lr": num.POSITIVE,
    "optim.weight_decay": num.NONNEGATIVE,
    "optim.eps": num.POSITIVE,
    "optim.warmup_steps": num.NONNEGATIVE_INT,
    "optim.min_lr_ratio": num.PROBABILITY,
    "optim.grad_clip": num.NONNEGATIVE,
    "loss.l1_weight": num.NONNEGATIVE,
    "loss.l2_weight": num.NONNEGATIVE,
    "loss.perceptual_weight": num.NONNEGATIVE,
    "loss.gan_weight": num.NONNEGATIVE,
    "loss.gan_adaptive_max": num.POSITIVE,
    "loss.disc_start": num.NONNEGATIVE_INT,
    "loss.gan_warmup": num.NONNEGATIVE_INT,
    "disc.layers": num.Kind(integer=True, lo=1, hi=16),  # each layer halves the patch grid
    "disc.channels": num.WIDTH,
    "disc.lr": num.POSITIVE,
    "disc.weight_decay": num.NONNEGATIVE,
}


def validate(cfg: TrainConfig) -> None:
    problems: list[str] = []
    m = cfg.model
    if sum(x is not None for x in (m.name, m.config)) > 1:
        problems.append("model: give either model.name or model.config, not both")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        problems.append(f"mixed_precision must be no, bf16 or fp16, got {cfg.mixed_precision!r}")
    problems += fields_problems(cfg, NUMBERS)
    choices = cfg.model.latent_channel_choices
    if choices is not None and (not choices or any(not isinstance(k, int) or k < 1 for k in choices)):
        problems.append(f"model.latent_channel_choices must be a list of positive channel counts, got {choices}")
    if cfg.data.crop not in ("random", "center"):
        problems.append(f"data.crop must be random or center, got {cfg.data.crop!r}")
    lo, hi = cfg.data.scale_range
    scales = items_problems("data.scale_range", cfg.data.scale_range, num.POSITIVE)
    problems += scales
    if not scales and lo > hi:
        problems.append(f"data.scale_range must be 0 < min <= max, got {list(cfg.data.scale_range)}")
    problems += items_problems("val.resolutions", cfg.val.resolutions, num.COUNT)
    for k in (1, 2, 3):
        p = cfg.phase(k)
        where = f"phase{k}"
        problems += fields_problems(p, PHASE_NUMBERS, f"{where}.")
        if not p.trainable and not p.trainable_inner_stages:
            problems.append(f"{where}.trainable: no parameter patterns (nothing would train)")
        o, lo_ = p.optim, p.loss
        if o.schedule not in SCHEDULES:
            problems.append(f"{where}.optim.schedule must be constant or cosine, got {o.schedule!r}")
        problems += items_problems(f"{where}.optim.betas", o.betas, num.FRACTION)
        problems += items_problems(f"{where}.disc.betas", p.disc.betas, num.FRACTION)
        if lo_.l1_weight == lo_.l2_weight == lo_.perceptual_weight == 0:
            problems.append(f"{where}.loss: no reconstruction loss (l1, l2 and perceptual weights are all 0)")
        if lo_.perceptual_net not in ("stlpips-vgg", "stlpips-alex", "lpips-vgg", "lpips-alex"):
            problems.append(f"{where}.loss.perceptual_net: unknown network {lo_.perceptual_net!r}")
        if p.disc.norm not in ("bn", "none"):
            problems.append(f"{where}.disc.norm must be bn or none, got {p.disc.norm!r}")
    problems += _decoder_recipe_problems(cfg)
    problems += parallel_problems(cfg.parallel, cfg.mixed_precision)
    if problems:
        raise ConfigError("invalid training config: " + "; ".join(problems))


def _decoder_recipe_problems(cfg: TrainConfig) -> list[str]:
    d = cfg.decoder
    if not num.NONNEGATIVE(d.distill_weight):
        return []  # named with the other numbers
    if d.student is None:
        return ["decoder.distill_weight needs decoder.student"] if d.distill_weight > 0 else []
    problems = []
    if cfg.model.name is not None or cfg.model.config is not None or cfg.model.latent_channel_choices:
        problems.append("decoder.student: the encoder comes from --init; drop model.name / config / latent choices")
    for n in (1, 2, 3):
        p = cfg.phase(n)
        outside = [v for v in p.trainable.values() if not v.startswith(("decoder.", "re:decoder\\."))]
        if outside:
            problems.append(f"phase{n}.trainable: the decoder recipe trains only decoder.*, got {outside}")
        if p.trainable_inner_stages:
            problems.append(f"phase{n}.trainable_inner_stages: would train the encoder (the recipe freezes it)")
    return problems
