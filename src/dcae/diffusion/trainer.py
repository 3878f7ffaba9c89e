"""Training a latent diffusion model on `dcae latents` output: `dcae diffusion train CONFIG.yaml [key=value ...]`.

One loop, nanoGPT-style: accelerate for devices / multi-GPU / bf16, AdamW with linear warmup, gradient
clipping, an fp32 EMA of the weights, atomic checkpoints (keep the last N) from which a killed run resumes
exactly: model, optimizer, EMA, step, RNG and data position. Every step draws its noise from a generator
seeded by (seed, step, rank), and the data order is a fixed permutation per epoch, so a resumed run repeats
the uninterrupted one bit for bit (same hardware and settings).

Outputs in `out/`: config.yaml, log.csv, loss.png, checkpoints/step_XXXXXXX.pt, samples/step_XXXXXXX.png.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dcae.errors import UserError
from dcae.train.state import load_checkpoint as read_checkpoint
from dcae.train.state import rng_state, set_rng_state
from dcae.utils.runtime import make_accelerator

# ----------------------------------------------------------------------------- configuration


@dataclass
class ModelConfig:
    name: str = "DiT-S/1"  # see dcae.diffusion.models.list_diffusion_models()
    learn_sigma: bool = False  # DDPM only: improved-DDPM learned variance (DiT)
    grad_checkpointing: bool = False
    overrides: dict = field(default_factory=dict)  # e.g. {depth: 4, hidden_size: 256} for small runs


@dataclass
class DiffusionConfig:
    objective: str = "flow"  # "flow" (velocity, linear path) or "ddpm" (epsilon)
    t_sampling: str = "logit_normal"  # flow: "uniform" or "logit_normal"
    beta_schedule: str = "linear"  # ddpm: "linear" (DiT) or "scaled_linear" (U-ViT)
    label_dropout: float = 0.1  # classifier-free guidance


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1+step)/(10+step)): a useful EMA in short runs too


@dataclass
class SampleConfig:
    every: int = 5000  # steps between sample grids (0: only at the end)
    num: int = 8
    classes: list | None = None  # default: 0, 1, ..., num-1 (modulo the class count)
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
    ckpt_every: int = 5000
    keep_last: int = 3
    resume: str = "auto"  # "auto" (latest checkpoint in out/), "none", or a checkpoint path
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.mixed_precision in (False, None):  # YAML reads a bare `no` as False
            self.mixed_precision = "no"
        if self.resume in (False, None):
            self.resume = "none"


def _from_dict(cls, d: dict, where: str = ""):
    """Build a config dataclass (sections nested) from a dict, refusing unknown keys by name."""
    if not isinstance(d, dict):
        raise UserError(f"config{' ' + where if where else ''}: expected a mapping, got {d!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; valid: {', '.join(names)}")
    sections = _SECTIONS if cls is TrainConfig else {}
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        key = f"{where}.{k}" if where else k
        kwargs[k] = _from_dict(sections[k], v, k) if k in sections else _coerce(v, types[k], key)
    return cls(**kwargs)


def _coerce(value, type_name: str, key: str):
    """YAML reads '3e-4' as a string and `no` as False: convert to the field's declared type, or refuse."""
    base = type_name.replace(" | None", "")
    if value is None and "None" in type_name:
        return None
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if base == "bool" and isinstance(value, bool):
            return value
        if base == "str" and isinstance(value, (str, bool)):
            return value
        if base in ("list", "dict") and isinstance(value, {"list": list, "dict": dict}[base]):
            return value
    except (TypeError, ValueError):
        pass
    raise UserError(f"config key {key}: expected {base}, got {value!r}")


_SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "optim": OptimConfig, "sample": SampleConfig}


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`optim.lr=2e-4 model.overrides.depth=4 sample.classes=[1,2]`: values are parsed as YAML."""
    import yaml

    d = copy.deepcopy(d)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value")
        node = d
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return d


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    import yaml

    d = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise UserError(f"config file {path} does not exist")
        d = yaml.safe_load(path.read_text()) or {}
    cfg = _from_dict(TrainConfig, apply_overrides(d, overrides or []))
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    problems = []
    if not cfg.data:
        problems.append("data (a folder written by `dcae latents`) is required")
    if cfg.diffusion.objective not in ("flow", "ddpm"):
        problems.append(f"diffusion.objective must be flow or ddpm, got {cfg.diffusion.objective!r}")
    if cfg.model.learn_sigma and cfg.diffusion.objective != "ddpm":
        problems.append("model.learn_sigma needs diffusion.objective=ddpm")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        problems.append(f"mixed_precision must be no, bf16 or fp16, got {cfg.mixed_precision!r}")
    for name in ("batch_size", "grad_accum", "max_steps", "log_every", "keep_last"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1")
    if problems:
        raise UserError("invalid training config: " + "; ".join(problems))


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- building blocks


def make_process(d: DiffusionConfig, learn_sigma: bool = False):
    from dcae.diffusion.ddpm import GaussianDiffusion
    from dcae.diffusion.flow import FlowMatching

    if d.objective == "flow":
        return FlowMatching(t_sampling=d.t_sampling, label_dropout=d.label_dropout)
    return GaussianDiffusion(beta_schedule=d.beta_schedule, learn_sigma=learn_sigma, label_dropout=d.label_dropout)


def build_model(model_args: dict) -> torch.nn.Module:
    from dcae.diffusion.models import create_diffusion_model

    a = dict(model_args)
    return create_diffusion_model(a.pop("name"), **{**a.pop("overrides", {}), **a})


def _step_seed(seed: int, step: int, slot: int) -> int:
    """Seed of the noise of one micro-batch: slot = rank * accumulation steps + micro-batch index, so a
    run on 1 process with 2 accumulation steps draws exactly what 2 processes without accumulation draw."""
    return (seed * 1_000_003 + step) * 4096 + slot


def accumulate_gradients(accelerator, train_model, model, process, x, y, null_class: int, gen, seeds: list[int]):
    """Backward of the mean loss over this process's batch in len(seeds) micro-batches (DDP syncs gradients
    only on the last); micro-batch k draws its noise from `gen` seeded with seeds[k]. Returns the mean loss."""
    accum, total = len(seeds), 0.0
    xs, ys = x.chunk(accum), (y.chunk(accum) if y is not None else [None] * accum)
    for k, (xk, yk) in enumerate(zip(xs, ys)):
        sync = accelerator.no_sync(model) if k < accum - 1 else contextlib.nullcontext()
        gen.manual_seed(seeds[k])
        with sync, accelerator.autocast():
            loss = process.loss(train_model, xk, yk, null_class=null_class, generator=gen).mean() / accum
        accelerator.backward(loss)
        total = total + loss.detach()
    return total


def data_batches(ds, batch_size: int, seed: int, rank: int, world: int, start_step: int, num_workers: int = 0):
    """Yield this process's (latents, labels) for steps start_step, start_step + 1, ...: global batch b of an
    epoch is perm[b*B:(b+1)*B] of a permutation seeded by (seed, epoch); rank r takes its r-th slice."""
    per_proc = batch_size // world
    steps_per_epoch = len(ds) // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"the dataset has {len(ds)} latents, fewer than one batch of {batch_size}: lower batch_size")
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        ds.set_epoch(epoch)
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        batches = [
            perm[b * batch_size + rank * per_proc : b * batch_size + (rank + 1) * per_proc]
            for b in range(offset, steps_per_epoch)
        ]
        yield from torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=num_workers, pin_memory=torch.cuda.is_available()
        )
        epoch, offset = epoch + 1, 0


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = [p.detach().float() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def list_checkpoints(out: str | Path) -> list[Path]:
    return sorted((Path(out) / "checkpoints").glob("step_*.pt"))


def latest_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest one in a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise UserError(f"no checkpoint found at {path} (expected a .pt file or a run folder with checkpoints/)")
    return ckpts[-1]


def load_checkpoint(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(model in eval mode, diffusion process, checkpoint metadata) from a training checkpoint or run folder."""
    path = latest_checkpoint(path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt:
        raise UserError(f"{path} is not a `dcae diffusion train` checkpoint")
    model = build_model(ckpt["model_args"])
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    model.to(device).eval()
    process = make_process(DiffusionConfig(**ckpt["config"]["diffusion"]), ckpt["model_args"]["learn_sigma"])
    meta = {k: ckpt[k] for k in ("step", "config", "model_args", "latents")}
    meta["path"] = str(path)
    return model, process, meta


def _complete_row(row: dict, fields: list[str]) -> bool:
    """False for the half-written last line a killed run can leave in log.csv."""
    try:
        return all(row.get(k) not in (None, "") for k in fields) and int(row["step"]) >= 0
    except ValueError:
        return False


def write_loss_plot(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcae.utils.io import atomic_path

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if _complete_row(r, ["step", "loss"])]
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [float(r["loss"]) for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


class _AutoencoderCache:
    """Loads the autoencoder recorded in the latent index once, on first use; warns (once) if it cannot."""

    def __init__(self, source: str | None, device: torch.device) -> None:
        self.source, self.device, self.model, self.failed = source, device, None, False

    def get(self):
        if self.model is None and not self.failed and self.source:
            try:
                from dcae.models import DCAE

                self.model = DCAE.from_pretrained(self.source).to(self.device).eval()
            except Exception as exc:  # sampling grids are a convenience; training goes on
                print(
                    f"dcae: cannot load autoencoder {self.source!r} to decode samples ({exc}); "
                    "samples are saved as latents",
                    file=sys.stderr,
                )
                self.failed = True
        return self.model


@torch.no_grad()
def sample_grid(
    model,
    process,
    num_classes: int,
    scfg: SampleConfig,
    latent_shape,
    device,
    autoencoder=None,
    scaling_factor: float = 1.0,
) -> torch.Tensor:
    """Sample scfg.num latents with fixed seeds; decoded images in [-1, 1] or latents when no autoencoder."""
    from dcae.diffusion.sampling import sample

    g = torch.Generator().manual_seed(scfg.seed)
    noise = torch.randn(scfg.num, *latent_shape, generator=g).to(device)
    y = None
    if num_classes > 0:
        classes = scfg.classes or list(range(scfg.num))
        y = torch.tensor([int(classes[i % len(classes)]) % num_classes for i in range(scfg.num)], device=device)
    solver = scfg.solver if scfg.solver != "auto" else ("heun" if process.prediction == "velocity" else "dpm++")
    z = sample(
        model,
        process,
        noise,
        y=y,
        null_class=num_classes,
        steps=scfg.steps,
        solver=solver,
        cfg_scale=scfg.cfg_scale,
        generator=torch.Generator(device).manual_seed(scfg.seed),
    )
    if autoencoder is None:
        return z
    return autoencoder.decode(z / scaling_factor).float().clamp(-1, 1)


# ----------------------------------------------------------------------------- the training loop


LOG_FIELDS = ["step", "loss", "grad_norm", "lr", "img_per_s", "elapsed_s"]
# What a checkpoint records of the latent folder: enough to decode samples and to know the data.
LATENT_META_KEYS = ("model", "model_config", "scaling_factor", "resolution", "latent_shape", "num_classes",
                    "class_names", "class_ids", "spatial_compression")  # fmt: skip


@dataclass
class _Run:
    """Everything one training run holds: config, accelerator, data, model, EMA, optimizer, output paths."""

    cfg: TrainConfig
    accelerator: object
    ds: object
    model_args: dict
    model: torch.nn.Module  # prepared (DDP-wrapped under several processes)
    raw_model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    process: object

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def save_checkpoint(self, step: int) -> Path:
        """Atomic checkpoint (every process's RNG state included), keep-last-N, and the loss plot."""
        from dcae.utils.io import atomic_torch_save

        acc, path = self.accelerator, self.out / "checkpoints" / f"step_{step:07d}.pt"
        rng = acc.gather_for_metrics([rng_state()], use_gather_object=True) if acc.num_processes > 1 else [rng_state()]
        if self.main:
            ckpt = {
                "model": self.raw_model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(),
                "step": step,
                "rng": rng,
                "config": config_to_dict(self.cfg),
                "model_args": self.model_args,
                "latents": {k: self.ds.index.get(k) for k in LATENT_META_KEYS},
            }
            atomic_torch_save(ckpt, path)
            for old in list_checkpoints(self.out)[: -self.cfg.keep_last]:
                old.unlink()
            if (self.out / "log.csv").exists():
                write_loss_plot(self.out / "log.csv", self.out / "loss.png")
        acc.wait_for_everyone()
        return path

    def save_samples(self, step: int, autoencoders: _AutoencoderCache) -> None:
        """A grid of fixed-seed EMA samples, decoded (or saved as latents when no autoencoder loads)."""
        from dcae.data.images import make_grid, save_image

        if self.main:
            ae = autoencoders.get()
            scaling = float(self.ds.index.get("scaling_factor", 1.0))
            with self.accelerator.autocast():
                imgs = sample_grid(self.ema, self.process, self.ds.num_classes, self.cfg.sample,
                                   self.ds.latent_shape, self.accelerator.device, ae, scaling)  # fmt: skip
            path = self.out / "samples" / f"step_{step:07d}"
            if ae is not None:
                save_image(make_grid(list(imgs), nrow=min(8, len(imgs))), path.with_suffix(".png"))
            else:
                from safetensors.torch import save_file

                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({"latents": imgs.cpu().contiguous()}, str(path.with_suffix(".safetensors")))
        self.accelerator.wait_for_everyone()

    def start_log(self, step: int) -> None:
        """config.yaml, and log.csv without the rows past `step` (the lost steps of an interrupted run)."""
        import yaml

        from dcae.utils.io import atomic_write_text

        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        csv_path, rows = self.out / "log.csv", []
        if csv_path.exists() and step > 0:
            with open(csv_path) as f:
                rows = [r for r in csv.DictReader(f) if _complete_row(r, LOG_FIELDS) and int(r["step"]) <= step]
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def log(self, row: dict) -> None:
        if self.main:
            with open(self.out / "log.csv", "a", newline="") as f:
                csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)


def _setup(cfg: TrainConfig) -> tuple[_Run, int]:
    """Build (or resume) a run; returns it and the step it starts at."""
    from dcae.diffusion.latents import LatentDataset
    from dcae.diffusion.models import set_grad_checkpointing

    validate_config(cfg)
    accelerator = make_accelerator(cfg.mixed_precision)
    rank, world, accum = accelerator.process_index, accelerator.num_processes, cfg.grad_accum
    if cfg.batch_size % (world * accum):
        raise UserError(
            f"batch_size {cfg.batch_size} is not divisible by the {world} processes x {accum} accumulation steps"
        )
    torch.manual_seed(cfg.seed + rank)
    ds = LatentDataset(cfg.data, use_flip=cfg.use_flip, seed=cfg.seed)
    C, H, W = ds.latent_shape
    if H != W:
        raise UserError(f"latents must be square, got {H}x{W}")
    model_args = {
        "name": cfg.model.name,
        "in_channels": C,
        "input_size": H,
        "num_classes": ds.num_classes,
        "learn_sigma": cfg.model.learn_sigma,
        "overrides": dict(cfg.model.overrides),
    }
    model = build_model(model_args)
    set_grad_checkpointing(model, cfg.model.grad_checkpointing)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    process = make_process(cfg.diffusion, cfg.model.learn_sigma)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    # Resume before `prepare`, so every process starts from the same weights.
    step = _resume(cfg, model_args, model, ema, opt, rank, accelerator.is_main_process)
    if accelerator.is_main_process:
        print(
            f"{world} process(es) ({accelerator.distributed_type}, {accelerator.device}, mixed precision "
            f"{accelerator.mixed_precision}); {len(ds)} latents, batch {cfg.batch_size} = {world} x {accum} x "
            f"{cfg.batch_size // (world * accum)}",
            file=sys.stderr,
        )
    ema.to(accelerator.device)
    model, opt = accelerator.prepare(model, opt)
    run = _Run(cfg, accelerator, ds, model_args, model, accelerator.unwrap_model(model), ema, opt, process)
    return run, step


def _resume(cfg: TrainConfig, model_args: dict, model, ema, opt, rank: int, main: bool) -> int:
    """Load the checkpoint `cfg.resume` asks for (newest in `out` for "auto"); the step to continue from."""
    resume_from = None
    if cfg.resume == "auto":
        resume_from = next(reversed(list_checkpoints(cfg.out)), None)
    elif cfg.resume not in ("none", ""):
        resume_from = latest_checkpoint(cfg.resume)
    if resume_from is None:
        return 0
    ckpt = read_checkpoint(resume_from)
    if ckpt["model_args"] != model_args:
        raise UserError(
            f"{resume_from} was trained with {ckpt['model_args']}, this config builds {model_args}; "
            "use another `out` folder or resume=none"
        )
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    if main:
        print(f"resuming from {resume_from} (step {int(ckpt['step'])})", file=sys.stderr)
    return int(ckpt["step"])


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume) according to cfg; returns {'step', 'loss', 'checkpoint'}."""
    from tqdm.auto import tqdm

    run, step = _setup(cfg)
    acc, model, opt = run.accelerator, run.model, run.opt
    device, rank, world, accum = acc.device, acc.process_index, acc.num_processes, cfg.grad_accum
    num_classes = run.ds.num_classes
    train_model = torch.compile(model) if cfg.compile else model
    run.start_log(step)
    autoencoders = _AutoencoderCache(run.ds.index.get("model") if cfg.sample.decode else None, device)

    batches = data_batches(run.ds, cfg.batch_size, cfg.seed, rank, world, step, cfg.num_workers)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not progress or not run.main)  # fmt: skip
    window_loss, window_n, window_t0, t_start = 0.0, 0, time.perf_counter(), time.perf_counter()
    last_loss, last_ckpt = float("nan"), None
    gen = torch.Generator(device)
    train_model.train()
    while step < cfg.max_steps:
        x, y = next(batches)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True) if num_classes > 0 else None
        lr = cfg.optim.lr * min(1.0, (step + 1) / cfg.optim.warmup_steps) if cfg.optim.warmup_steps else cfg.optim.lr
        for group in opt.param_groups:
            group["lr"] = lr
        seeds = [_step_seed(cfg.seed, step, rank * accum + k) for k in range(accum)]
        loss = accumulate_gradients(acc, train_model, model, run.process, x, y, num_classes, gen, seeds)
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = cfg.optim.ema_decay
        if cfg.optim.ema_warmup:
            decay = min(decay, (1 + step) / (10 + step))
        update_ema(run.ema, run.raw_model, decay)
        step += 1
        window_loss += loss.detach()
        window_n += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean_loss = acc.reduce(window_loss / window_n, reduction="mean").item()
            if not np.isfinite(mean_loss):  # checked here, not every step: no GPU sync per step
                from dcae.errors import NonFiniteError

                raise NonFiniteError(
                    f"training loss became {mean_loss} by step {step}; lower optim.lr, "
                    f"raise optim.warmup_steps or check the latents (resume from a checkpoint)"
                )
            img_s = window_n * cfg.batch_size / max(time.perf_counter() - window_t0, 1e-9)
            last_loss = mean_loss
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s:.1f}")
            run.log({"step": step, "loss": f"{mean_loss:.6f}", "grad_norm": f"{float(grad_norm):.4f}",
                     "lr": f"{lr:.3e}", "img_per_s": f"{img_s:.2f}",
                     "elapsed_s": f"{time.perf_counter() - t_start:.1f}"})  # fmt: skip
            window_loss, window_n = 0.0, 0
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            last_ckpt = run.save_checkpoint(step)
        if (cfg.sample.every and step % cfg.sample.every == 0) or step == cfg.max_steps:
            run.save_samples(step, autoencoders)
        if window_n == 0:  # restart the throughput clock after logging, checkpointing or sampling
            window_t0 = time.perf_counter()
    bar.close()
    if last_ckpt is None and run.main:
        last_ckpt = next(reversed(list_checkpoints(cfg.out)), None)
    return {"step": step, "loss": last_loss, "checkpoint": str(last_ckpt) if last_ckpt else None}
