"""Training a latent diffusion model on a latent cache (`dcae latents`: class labels, or `dcae t2i cache`: captions):
`dcae diffusion train CONFIG.yaml [key=value ...]` and `dcae t2i train CONFIG.yaml [key=value ...]`.

One loop, nanoGPT-style, on the shared training runtime (dcae.runtime): accelerate for devices / multi-GPU /
bf16, AdamW with the runtime's learning-rate schedule, gradient clipping, the runtime's fp32 EMA, atomic
checkpoints (keep the last N) from which a killed run resumes exactly: model, optimizer, EMA, step, RNG and
data position. Every step draws its noise from a generator seeded by (seed, step, rank), and the data order
is a fixed permutation per epoch, so a resumed run repeats the uninterrupted one bit for bit (same hardware
and settings).

Outputs in `out/`: config.yaml, log.csv, loss.png, checkpoints/step_XXXXXXX.pt, samples/step_XXXXXXX.png.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dcae.data.images import make_grid, save_image
from dcae.diffusion.cache import CacheDataset
from dcae.diffusion.conditioning import Condition, Conditioning, chunk
from dcae.diffusion.nets import set_grad_checkpointing, transformer_blocks
from dcae.diffusion.t2i import finetune
from dcae.diffusion.train import augmented
from dcae.diffusion.train import checkpoint as run_ckpt
from dcae.diffusion.train.config import TrainConfig, config_to_dict, validate_config
from dcae.diffusion.train.data import data_batches, open_cache
from dcae.diffusion.train.plan import memory_plan
from dcae.diffusion.train.samples import AutoencoderCache, grid_condition, sample_grid
from dcae.errors import NonFiniteError, UserError
from dcae.runtime import batch as global_batch
from dcae.runtime import checkpoint as ckpt
from dcae.runtime import sharding
from dcae.runtime.accelerator import make_accelerator
from dcae.runtime.config import dump_yaml
from dcae.runtime.ema import EMA
from dcae.runtime.log import Logger, plot_curves, read_log
from dcae.runtime.schedule import lr_at, set_lr
from dcae.utils.devices import match_inductor_to_aten_isa
from dcae.utils.io import atomic_save_safetensors, atomic_write_text, check_output_dir

LOG_COLUMNS = ("step", "loss", "grad_norm", "lr", "img_per_s", "elapsed_s")


def _step_seed(seed: int, step: int, slot: int) -> int:
    """Seed of the noise of one micro-batch: slot = rank * accumulation steps + micro-batch index, so a
    run on 1 process with 2 accumulation steps draws exactly what 2 processes without accumulation draw."""
    return (seed * 1_000_003 + step) * 4096 + slot


def accumulate_gradients(accelerator, train_model, model, process, x, cond: Condition | None, gen, seeds: list[int]):
    """Backward of the mean loss over this process's batch in len(seeds) micro-batches (DDP syncs gradients
    only on the last); micro-batch k draws its noise from `gen` seeded with seeds[k]. Returns the mean loss."""
    accum, total = len(seeds), 0.0
    for k, (xk, ck) in enumerate(zip(x.chunk(accum), chunk(cond, accum))):
        sync = contextlib.nullcontext()
        if k < accum - 1:  # FSDP: no reduce-scatter; DDP: no all-reduce
            sync = sharding.no_sync(model) if sharding.is_sharded(model) else accelerator.no_sync(model)
        gen.manual_seed(seeds[k])
        with sync, accelerator.autocast():
            loss = process.loss(train_model, xk, ck, generator=gen).mean() / accum
        accelerator.backward(loss)
        total = total + loss.detach()
    return total


@dataclass
class _Run:
    """Everything one training run holds: config, accelerator, data, model, EMA, optimizer, output paths."""

    cfg: TrainConfig
    accelerator: object
    ds: CacheDataset
    conditioning: Conditioning
    grid_cond: Condition | None
    model_args: dict
    model: torch.nn.Module  # prepared (DDP-wrapped under several processes)
    raw_model: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    process: object
    template: torch.nn.Module | None = None  # parallel.strategy=fsdp: the unsharded network, without storage

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def save_checkpoint(self, step: int) -> Path:
        """Atomic checkpoint (every process's RNG state included), keep-last-N, and the loss plot."""
        path = run_ckpt.checkpoint_path(self.out, step)
        info = {"step": step, "rng": ckpt.all_rng_states(self.accelerator), "config": config_to_dict(self.cfg),
                "model_args": self.model_args, "latents": self.ds.index.summary()}  # fmt: skip
        if self.template is not None:  # sharded: a folder, every process writes its shards
            path = sharding.save(path.with_suffix(""), self.raw_model, self.opt, self.ema.shadow, info,
                                 self.cfg.checkpoint.keep_last, self.main)  # fmt: skip
        elif self.main:
            state = {"model": self.raw_model.state_dict(), "ema": self.ema.state_dict_for(self.raw_model),
                     "optimizer": self.opt.state_dict(), **info}  # fmt: skip
            ckpt.save_checkpoint(state, path, self.cfg.checkpoint.keep_last)
        if self.main:
            plot_curves({"train": read_log(self.out / "log.csv")}, self.out / "loss.png", "diffusion training")
        self.accelerator.wait_for_everyone()
        return path

    def ema_model(self) -> torch.nn.Module | None:
        """A copy of the network with the EMA weights, in eval mode, for sampling. Sharded: gathered into an
        unsharded copy on the main process (None on the others; every process must call it)."""
        if self.template is not None:
            model = sharding.full_model(self.template, self.raw_model, self.ema.shadow, self.main,
                                        self.accelerator.device)  # fmt: skip
            return model.eval() if model is not None else None
        model = copy.deepcopy(self.raw_model)  # a copy draws no random numbers, unlike a new network
        model.load_state_dict(self.ema.state_dict_for(self.raw_model))
        return model.eval()

    def save_samples(self, step: int, autoencoders: AutoencoderCache) -> None:
        """A grid of fixed-seed EMA samples, decoded (or saved as latents when no autoencoder loads)."""

        ema_model = self.ema_model() if self.main or self.template is not None else None
        if self.main:
            ae = autoencoders.get()
            scaling = self.ds.index.scaling_factor
            with self.accelerator.autocast():
                imgs = sample_grid(ema_model, self.process, self.grid_cond, self.cfg.sample,
                                   self.ds.latent_shape, self.accelerator.device, ae, scaling)  # fmt: skip
            path = self.out / "samples" / f"step_{step:0{run_ckpt.DIGITS}d}"
            if ae is not None:
                save_image(make_grid(list(imgs), nrow=min(8, len(imgs))), path.with_suffix(".png"))
            else:
                atomic_save_safetensors({"latents": imgs}, path.with_suffix(".safetensors"))
        self.accelerator.wait_for_everyone()


def _setup(cfg: TrainConfig) -> tuple[_Run, int]:
    """Build (or resume) a run; returns it and the step it starts at."""
    validate_config(cfg)
    check_output_dir(cfg.out_dir, "out_dir")  # before anything is loaded: a file there is one error line
    accelerator = make_accelerator(cfg.mixed_precision, timeout_s=cfg.parallel.timeout_s)
    rank, world, accum = accelerator.process_index, accelerator.num_processes, cfg.grad_accum
    global_batch.micro_batch(cfg.batch_size, world, accum)  # or a one-line error naming batch_size
    torch.manual_seed(cfg.seed + rank)
    ds = open_cache(cfg.data, seed=cfg.seed, use_flip=cfg.use_flip)
    model_args = _model_args(cfg, ds)
    if cfg.finetune.pretrained or cfg.finetune.lora.rank or cfg.finetune.trainable:  # pretrained, LoRA, frozen
        model_args, model = finetune.pretrained_model(cfg, ds, model_args)
    else:
        model = run_ckpt.build_model(model_args)
    set_grad_checkpointing(model, cfg.model.gradient_checkpointing)
    template = None
    if cfg.parallel.strategy == "fsdp":  # before the EMA and the optimizer: they hold the shards
        template = sharding.meta_copy(model)  # the unsharded network without storage, for sample grids
        sharding.shard(model, transformer_blocks(model), cfg.mixed_precision, cfg.parallel.reshard_after_forward,
                       accelerator.device)  # fmt: skip
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
    process = run_ckpt.make_process(cfg.diffusion, cfg.model.learn_sigma)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    # Resume before `prepare`, so every process starts from the same weights.
    step = _resume(cfg, model_args, model, ema, opt, rank, accelerator.is_main_process)
    if accelerator.is_main_process:
        print(memory_plan(cfg, model_args, ds.latent_shape, ds.conditioning, world).describe(), file=sys.stderr)
        print(
            f"{world} process(es) ({accelerator.distributed_type}, {accelerator.device}, mixed precision "
            f"{accelerator.mixed_precision}); {len(ds)} latents, {global_batch.describe(cfg.batch_size, world, accum)}",
            file=sys.stderr,
        )
    ema.to(accelerator.device)
    if template is None:
        model, opt = accelerator.prepare(model, opt)
    conditioning = ds.conditioning
    main = accelerator.is_main_process
    grid_cond = grid_condition(conditioning, cfg.sample, accelerator.device) if main else None
    run = _Run(cfg, accelerator, ds, conditioning, grid_cond, model_args, model, accelerator.unwrap_model(model),
               ema, opt, process, template)  # fmt: skip
    return run, step


def _model_args(cfg: TrainConfig, ds: CacheDataset) -> dict:
    """What builds the network, recorded in every checkpoint (and compared on resume): the name, sizes and
    overrides of the config, the latent channels and size and the conditioning of the cache."""
    C, H, W = ds.latent_shape
    augmented.check(cfg.augmented, C)
    return {"name": cfg.model.name, "in_channels": C, "input_size": H, "learn_sigma": cfg.model.learn_sigma,
            "overrides": augmented.model_overrides(cfg.model.overrides, cfg.augmented),
            "conditioning": ds.conditioning.spec()}  # fmt: skip


def _resume(cfg: TrainConfig, model_args: dict, model, ema: EMA, opt, rank: int, main: bool) -> int:
    """Load the checkpoint `cfg.resume` asks for (newest in `out` for "auto"); the step to continue from."""
    resume_from = None
    if cfg.resume == "auto":
        resume_from = next(reversed(run_ckpt.list_checkpoints(cfg.out_dir)), None)
    elif cfg.resume not in ("none", ""):
        resume_from = run_ckpt.latest_checkpoint(cfg.resume)
    if resume_from is None:
        return 0
    folder = sharding.is_checkpoint(resume_from)  # sharded: read in place, resharded, below
    state = sharding.load_meta(resume_from) if folder else ckpt.load_checkpoint(resume_from)
    with ckpt.restoring(resume_from):
        if run_ckpt.normalized_model_args(state["model_args"]) != model_args:
            raise UserError(
                f"{resume_from} was trained with {state['model_args']}, this config builds {model_args}; "
                "use another `out` folder or resume=none"
            )
        if folder:
            sharding.load(resume_from, model, opt, ema.shadow)
        elif sharding.is_sharded(model):
            sharding.load_full(model, opt, ema.shadow, state)
        else:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])  # the averaged weights as a model state dict
            opt.load_state_dict(state["optimizer"])
        ema.num_updates = step = ckpt.counter(state, "step")
        ckpt.restore_rng(state["rng"], rank)
    if main:
        print(f"resuming from {resume_from} (step {step})", file=sys.stderr)
    return step


def _start_outputs(run: _Run, step: int) -> Logger | None:
    """config.yaml, and the log without the rows past `step` (the lost steps of an interrupted run)."""
    if not run.main:
        return None
    run.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.out / "config.yaml", dump_yaml(run.cfg))
    return Logger(run.out, LOG_COLUMNS, step if step > 0 else None, run.cfg.log.tensorboard)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume) according to cfg; returns {'step', 'loss', 'checkpoint'}."""

    run, step = _setup(cfg)
    acc, model, opt = run.accelerator, run.model, run.opt
    device, rank, accum = acc.device, acc.process_index, cfg.grad_accum
    if cfg.compile:
        match_inductor_to_aten_isa()
    train_model = torch.compile(model) if cfg.compile else model
    logger = _start_outputs(run, step)
    autoencoders = AutoencoderCache(run.ds.index if cfg.sample.decode else None, device)

    batches = data_batches(run.ds, cfg.batch_size, cfg.seed, rank, acc.num_processes, step, cfg.num_workers)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not progress or not run.main)  # fmt: skip
    window_loss, window_n, window_t0, t_start = 0.0, 0, time.perf_counter(), time.perf_counter()
    last_loss, last_ckpt = float("nan"), None
    gen = torch.Generator(device)
    trainer = augmented.training_process(run.process, cfg.augmented)  # the process, or DC-AE 1.5's averaged loss
    train_model.train()
    while step < cfg.max_steps:
        x, *rest = next(batches)
        x = x.to(device, non_blocking=True)
        cond = run.ds.condition(rest, device)
        lr = lr_at(step, cfg.max_steps, cfg.optim)
        set_lr(opt, lr)
        seeds = [_step_seed(cfg.seed, step, rank * accum + k) for k in range(accum)]
        loss = accumulate_gradients(acc, train_model, model, trainer, x, cond, gen, seeds)
        clip = cfg.optim.grad_clip or float("inf")
        grad_norm = sharding.clip_grad_norm(model.parameters(), clip) if run.template is not None else \
            acc.clip_grad_norm_(model.parameters(), clip)  # fmt: skip
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.ema.update(run.raw_model)
        step += 1
        window_loss += loss.detach()
        window_n += 1
        bar.update(1)

        if step % cfg.log.every == 0 or step == cfg.max_steps:
            mean_loss = acc.reduce(window_loss / window_n, reduction="mean").item()
            if not np.isfinite(mean_loss):  # checked here, not every step: no GPU sync per step
                raise NonFiniteError(
                    f"training loss became {mean_loss} by step {step}; lower optim.lr, "
                    f"raise optim.warmup_steps or check the latents (resume from a checkpoint)"
                )
            img_s = window_n * cfg.batch_size / max(time.perf_counter() - window_t0, 1e-9)
            last_loss = mean_loss
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s:.1f}")
            if logger is not None:
                logger.log({"step": step, "loss": mean_loss, "grad_norm": float(grad_norm), "lr": lr,
                            "img_per_s": img_s, "elapsed_s": time.perf_counter() - t_start})  # fmt: skip
            window_loss, window_n = 0.0, 0
        if step % cfg.checkpoint.every == 0 or step == cfg.max_steps:
            last_ckpt = run.save_checkpoint(step)
        if (cfg.sample.every and step % cfg.sample.every == 0) or step == cfg.max_steps:
            run.save_samples(step, autoencoders)
        if window_n == 0:  # restart the throughput clock after logging, checkpointing or sampling
            window_t0 = time.perf_counter()
    bar.close()
    sharding.release_process_group()
    if logger is not None:
        logger.close()
    if last_ckpt is None and run.main:
        last_ckpt = next(reversed(run_ckpt.list_checkpoints(cfg.out_dir)), None)
    return {"step": step, "loss": last_loss, "checkpoint": str(last_ckpt) if last_ckpt else None}
