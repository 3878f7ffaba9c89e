"""The training loop: the three DC-AE phases, one after the other, on top of HF accelerate.

    train(cfg, phases=[1, 2, 3])      # what `dcae train CONFIG --phase all` runs

Each phase: build the model from the previous phase's exported result (or `model.init` / a fresh init),
freeze everything but the phase's trainable patterns, then the usual loop (nanoGPT style):
    lr <- schedule(step); G forward/backward over grad_accum micro-batches; clip; step; EMA;
    D forward/backward on the same batches (phase 3); log; validate; checkpoint.
At the end: export (EMA weights) in the original and diffusers formats, held-out PSNR/SSIM as JSON,
loss curves as PNG.

Multi-GPU / multi-node: launch the same command with `accelerate launch -m dcae.cli train ...` or
`torchrun --nproc_per_node N -m dcae.cli train ...`; accelerate wraps the model in DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dcae.errors import UserError
from dcae.models import DCAE, DCAEConfig
from dcae.models.config import get_config
from dcae.runtime import batch as global_batch
from dcae.runtime import checkpoint as ckpt
from dcae.runtime import sharding
from dcae.runtime.accelerator import make_accelerator
from dcae.runtime.config import dump_yaml
from dcae.runtime.ema import EMA
from dcae.runtime.log import Logger, plot_curves, read_log
from dcae.runtime.schedule import lr_at, set_lr
from dcae.train import decoder, monitor, params
from dcae.train.config import PHASE_NAMES, PhaseConfig, TrainConfig
from dcae.train.data import (
    ImageDataset,
    Item,
    ResumableBatchSampler,
    load_val_images,
    make_loader,
    split_items,
)
from dcae.train.losses import AutoencoderLoss, PatchDiscriminator, build_perceptual
from dcae.train.sharded import phase_plan, shard_autoencoder, sharded_phase, whole
from dcae.utils.io import atomic_write_json, atomic_write_text, check_output_dir


@dataclass
class Session:
    """What all phases of one command share."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    train_items: list[Item]
    val_images: list[np.ndarray]
    grid_images: list[np.ndarray]
    init: str | None  # weights the first phase of this command starts from
    resume: bool

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        if self.main:
            tqdm.write(" ".join(str(a) for a in args))


def train(
    cfg: TrainConfig,
    phases: list[int] = (1, 2, 3),
    init: str | None = None,
    resume: bool = False,
    accelerator: Any = None,
) -> dict[str, Any]:
    """Run `phases` in order; returns {"phases": {n: metrics}, "model": path of the last export}."""
    out = check_output_dir(cfg.out_dir, "out_dir")  # before anything is loaded: a file there is one error line
    accelerator = accelerator or make_accelerator(cfg.mixed_precision, cfg.find_unused_parameters,
                                                  cfg.parallel.timeout_s)  # fmt: skip
    for n in phases:  # every phase's global batch splits into the processes and accumulation steps, or stop now
        size, processes = cfg.phase(n).batch_size, accelerator.num_processes
        global_batch.micro_batch(size, processes, cfg.grad_accum, f"phase{n}.batch_size")
    train_items, val_items = split_items(cfg.data.train, cfg.data.val, cfg.data.holdout)
    val_images, skipped = load_val_images(val_items, cfg.val.max_images) if accelerator.is_main_process else ([], 0)
    grid_images = val_images[: cfg.val.grid_images]
    if not grid_images and accelerator.is_main_process:  # no held-out set: show a few training images
        grid_images, _ = load_val_images(train_items, cfg.val.grid_images)
    s = Session(cfg, out, accelerator, train_items, val_images, grid_images, init or cfg.model.init, resume)
    if s.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        broken = len(train_items.skipped)  # tar shards that could not be read (named in a warning)
        s.print(
            f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}, {accelerator.device}, "
            f"mixed precision {accelerator.mixed_precision}); data: {len(train_items)} training images, "
            f"{len(val_images)} held out" + (f" ({skipped} unreadable)" if skipped else "")
            + (f"; {broken} unreadable shard(s) skipped" if broken else "")
        )  # fmt: skip
    results: dict[int, Any] = {}
    export = None
    for i, n in enumerate(phases):
        export, results[n] = run_phase(s, n, first=i == 0)
        accelerator.free_memory()
    if s.main:
        logs = {f"phase {n}": read_log(out / f"phase{n}" / "log.csv") for n in (1, 2, 3)}
        plot_curves({k: v for k, v in logs.items() if v}, out / "loss_curves.png", "DC-AE training", monitor.CURVES)
        atomic_write_json(out / "summary.json", {"model": str(export), "phases": results})
    accelerator.wait_for_everyone()
    sharding.release_process_group()
    return {"model": export, "phases": results}


# ----------------------------------------------------------------------------- model construction
def build_model(cfg: TrainConfig) -> DCAE:
    m = cfg.model
    if m.config is not None:
        d = dict(m.config)
        base = d.pop("base", None)
        if base is not None:
            return DCAE(dataclasses.replace(get_config(base), **d, hub_id=None, hub_id_diffusers=None))
        try:
            return DCAE(DCAEConfig.from_dict(d))
        except (TypeError, ValueError) as exc:
            raise UserError(f"model.config: {exc}") from exc
    if m.name is not None:
        return DCAE.from_config(m.name)
    raise UserError("no model: set model.name (a zoo name), model.config (DCAEConfig fields) or --init")


def starting_model(s: Session, n: int, first: bool) -> tuple[DCAE, str]:
    """Phase 1 of a fresh run: model.init or a seeded random init. A later phase: the previous phase's
    exported result; the first phase of a command started at phase 2/3 may take --init instead."""
    prev = s.out / f"phase{n - 1}" / "model"
    recipe = s.cfg.decoder.student is not None  # --init is the teacher; phases 2-3 continue the student
    if recipe and n == 1:
        return decoder.student_model(s.cfg, s.init), f"new decoder, frozen encoder of --init {s.init}"
    if first and s.init is not None and not recipe:
        return DCAE.from_pretrained(s.init), f"--init {s.init}"
    if n > 1:
        if not (prev / "config.json").is_file():
            raise UserError(
                f"phase {n} starts from phase {n - 1}'s result, but {prev} does not exist: "
                f"run phase {n - 1} first (or --phase all), or pass --init"
            )
        return DCAE.from_pretrained(prev), f"phase {n - 1} result {prev}"
    ckpt.seed_everything(s.cfg.seed)
    return build_model(s.cfg), "random init"


def last_decoder_layer(model: DCAE) -> torch.Tensor:
    """Weight of the conv that outputs pixels: where the adaptive GAN weight balances the gradients."""
    return [p for n, p in model.decoder.project_out.named_parameters() if n.endswith("weight")][-1]


# ----------------------------------------------------------------------------- one phase
@dataclass
class Phase:
    """One phase's model, optimizers, losses and files; built by `_setup_phase`."""

    n: int
    cfg: PhaseConfig
    folder: Path
    model: nn.Module  # prepared (DDP-wrapped under several processes)
    raw: DCAE
    opt: torch.optim.Optimizer
    disc: nn.Module | None
    d_opt: torch.optim.Optimizer | None
    raw_disc: nn.Module | None
    ema: EMA | None
    perceptual: nn.Module | None
    loss_fn: AutoencoderLoss
    last_layer: torch.Tensor
    trainable: list[torch.Tensor]
    trainable_names: list[str]
    distill: nn.Module | None = None  # decoder recipe: the teacher-decoder term
    template: nn.Module | None = None  # sharded (parallel.strategy=fsdp): the network without storage

    @property
    def ckpt_dir(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def export_dir(self) -> Path:
        return self.folder / "model"

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.json"


def run_phase(s: Session, n: int, first: bool) -> tuple[Path, dict[str, Any]]:
    cfg, acc = s.cfg, s.accelerator
    folder = s.out / f"phase{n}"
    if s.main:
        ckpt.remove_stale_temp_files(folder / "checkpoints")
    latest = ckpt.latest_checkpoint(folder / "checkpoints")
    if (folder / "metrics.json").is_file() and s.resume:
        s.print(f"phase {n} ({PHASE_NAMES[n]}) already complete: {folder / 'model'}")
        return folder / "model", json.loads((folder / "metrics.json").read_text())
    if (latest is not None or (folder / "metrics.json").is_file()) and not s.resume:
        raise UserError(f"{folder} holds a previous run: pass --resume to continue it, or choose another --out")

    ph = _setup_phase(s, n, first, folder)
    ck = None
    if latest is not None:  # a sharded checkpoint's folder: its metadata here, the tensors in _resume_phase
        ck = sharding.load_meta(latest) if sharding.is_checkpoint(latest) else ckpt.load_checkpoint(latest)
    step, batches, skipped, elapsed = _resume_phase(s, ph, ck, latest)
    sampler, data_iter = _phase_data(s, ph, batches)
    # RNG after the loader: creating its iterator draws a worker seed from the global generator.
    if ck is not None:
        with ckpt.restoring(latest):
            ckpt.restore_rng(ck["rng"], acc.process_index)
    else:
        ckpt.seed_everything(cfg.seed + n)

    resume_step = step if ck is not None else None
    logger = Logger(folder, monitor.LOG_COLUMNS, resume_step, cfg.log.tensorboard) if s.main else None
    start_metrics = None
    net = whole(ph.template, ph.raw, s.main, acc.device) if ck is None else None  # sharded: gathered on rank 0
    if s.main and first and ck is None and s.val_images and cfg.val.at_start:
        start_metrics = _evaluate_all(s, net, ph.cfg.resolution, ph.perceptual)
        s.print(f"held-out before phase {n}: {_fmt_metrics(start_metrics)}")
    if s.main and ck is None:
        _grid(s, net, ph.cfg.resolution, folder / "samples" / f"step_{step:08d}.png")
    del net

    params.set_train_mode(ph.model)
    if ph.disc is not None:
        ph.disc.train()

    phase, o = ph.cfg, ph.cfg.optim
    show = s.main and cfg.log.progress
    # A time-bounded phase ends by the clock, not the step count: no made-up total or ETA then.
    timed = phase.max_minutes is not None
    desc = f"phase {n} ({phase.max_minutes:.1f} min budget)" if timed else f"phase {n}"
    bar = tqdm(total=None if timed else phase.steps, initial=step, desc=desc, disable=not show, dynamic_ncols=True)
    images_per_step = phase.batch_size  # the global batch
    t_start, t_last, step_at_last = time.time() - elapsed, time.time(), step
    running: dict[str, float] = {}
    stopped_early = False
    while step < phase.steps:
        lr = lr_at(step, phase.steps, o)
        set_lr(ph.opt, lr)
        if ph.d_opt is not None:  # the discriminator follows the same schedule, relative to its own lr
            for g in ph.d_opt.param_groups:
                g["lr"] = (phase.disc.lr or o.lr) * lr / o.lr
        logs, batches, skipped = _train_step(s, ph, data_iter, step, batches, skipped)
        if ph.ema is not None:
            ph.ema.update(ph.raw)
        step += 1
        bar.update(1)

        # Logging (main process), with loss values from this process's micro-batches.
        for k, v in logs.items():
            running[k] = running.get(k, 0.0) + v
        if step % cfg.log.every == 0 or step == phase.steps:
            now = time.time()
            speed = images_per_step * (step - step_at_last) / max(now - t_last, 1e-9)
            row = {k: v / max(1, step - step_at_last) for k, v in running.items()}
            row.update(step=step, time_s=now - t_start, lr=lr, img_per_s=speed, skipped=skipped)
            running, t_last, step_at_last = {}, now, step
            _log_row(s, ph, step, row, logger)
            bar.set_postfix(
                {k: f"{row[k]:.4f}" for k in ("loss", "lpips", "d_loss") if k in row} | {"img/s": f"{speed:.1f}"}
            )
        if cfg.log.image_every and step % cfg.log.image_every == 0:
            net = whole(ph.template, ph.raw, s.main, acc.device)
            if s.main:
                _grid(s, net, phase.resolution, folder / "samples" / f"step_{step:08d}.png")
            params.set_train_mode(ph.model)

        if phase.max_minutes is not None:
            stopped_early = _time_is_up(acc, t_start, phase.max_minutes) and step < phase.steps
        if step % cfg.checkpoint.every == 0 or step == phase.steps or stopped_early:
            position = {**sampler.position(batches), "micro_batch": sampler.batch_size, "processes": acc.num_processes}
            data = {"position": position, "skipped": skipped, "elapsed": time.time() - t_start}
            _save_checkpoint(s, ph, step, data)
        if stopped_early:
            s.print(f"phase {n}: max_minutes={phase.max_minutes} reached, stopping at step {step}")
            break
    bar.close()
    if logger is not None:
        logger.close()
    del data_iter  # stops the worker processes

    summary = {"steps": step, "stopped_early": stopped_early, "train_time_s": round(time.time() - t_start, 1),
               "start": start_metrics}  # fmt: skip
    return ph.export_dir, _end_phase(s, ph, skipped, summary)


def _setup_phase(s: Session, n: int, first: bool, folder: Path) -> Phase:
    """The phase's starting model with its declared trainable set (printed and written to trainable.txt),
    optimizers (only trainable tensors go to AdamW, so weight decay cannot touch frozen ones), the
    discriminator and losses, prepared by the accelerator."""
    cfg, acc, phase = s.cfg, s.accelerator, s.cfg.phase(n)
    model, origin = starting_model(s, n, first)
    model.enable_gradient_checkpointing(cfg.model.gradient_checkpointing)
    if cfg.model.latent_channel_choices:
        try:
            model.encoder.sliceable_out(max(cfg.model.latent_channel_choices))
        except ValueError as exc:
            raise UserError(f"model.latent_channel_choices: {exc}") from exc
    selected = params.select_trainable(model, params.phase_patterns(phase, model))
    trainable_names = params.apply_trainable(model, selected)
    if cfg.decoder.student is not None:
        decoder.check_encoder_frozen(model)
    split = global_batch.describe(phase.batch_size, acc.num_processes, cfg.grad_accum)
    s.print(f"\n=== phase {n}: {PHASE_NAMES[n]} ({phase.resolution} px, {phase.steps} steps, {split}) from {origin}")
    s.print("trainable parameters:\n" + params.summary(model, selected))
    if s.main:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "trainable.txt", params.full_list(model) + "\n")

    if s.main:  # the autoencoder's memory per process (dcae.runtime.memory), before it is sharded
        micro = global_batch.micro_batch(phase.batch_size, acc.num_processes, cfg.grad_accum, f"phase{n}.batch_size")
        s.print(phase_plan(model, cfg, phase, acc.num_processes, micro).describe())
    template = shard_autoencoder(model, cfg, acc.device) if sharded_phase(cfg, phase) else None
    if cfg.parallel.strategy == "fsdp" and template is None:
        s.print(f"phase {n} has a GAN term: it trains unsharded (DDP), see dcae.train.sharded")
    o = phase.optim
    trainable = [p for p in model.parameters() if p.requires_grad]  # sharded: DTensors, so after shard
    opt = torch.optim.AdamW(trainable, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    disc = d_opt = None
    if phase.loss.gan_weight > 0:
        d = phase.disc
        torch.manual_seed(cfg.seed + 1)
        disc = PatchDiscriminator(3, d.channels, d.layers, d.norm)
        d_opt = torch.optim.AdamW(disc.parameters(), lr=d.lr or o.lr, betas=d.betas, weight_decay=d.weight_decay)
    perceptual = build_perceptual(phase.loss.perceptual_net) if phase.loss.perceptual_weight > 0 else None
    if perceptual is not None:
        perceptual.to(acc.device)
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay > 0 else None

    if template is not None:  # FSDP did the model's part; a sharded phase has no discriminator
        pass
    elif disc is not None:
        model, opt, disc, d_opt = acc.prepare(model, opt, disc, d_opt)
    else:
        model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    raw_disc = acc.unwrap_model(disc) if disc is not None else None
    if ema is not None:
        ema.to(acc.device)
    loss_fn = AutoencoderLoss(phase.loss, raw_disc, perceptual)
    return Phase(n, phase, folder, model, raw, opt, disc, d_opt, raw_disc, ema, perceptual, loss_fn,
                 last_decoder_layer(raw), trainable, trainable_names,
                 decoder.distiller(cfg, s.init, acc.device), template)  # fmt: skip


def _resume_phase(s: Session, ph: Phase, ck: dict | None, path: Path | None) -> tuple[int, int, int, float]:
    """Load a checkpoint's model, optimizers, discriminator, EMA and grad scaler; (step, batches consumed,
    skipped images, elapsed seconds), all zero for a fresh phase."""
    if ck is None:
        return 0, 0, 0, 0.0
    with ckpt.restoring(path):
        if sharding.is_checkpoint(path):  # model, optimizer and EMA resharded to this run's processes
            sharding.load(path, ph.raw, ph.opt, ph.ema.shadow if ph.ema is not None else {})
        elif ph.template is not None:
            sharding.load_full(ph.raw, ph.opt, ph.ema.shadow if ph.ema is not None else {}, ck)
        else:
            ph.raw.load_state_dict(ck["model"])
            ph.opt.load_state_dict(ck["optimizer"])
        if ph.disc is not None:
            ph.raw_disc.load_state_dict(ck["disc"])
            ph.d_opt.load_state_dict(ck["disc_optimizer"])
        if ph.ema is not None and not sharding.is_checkpoint(path) and ph.template is None:
            ph.ema.load_state_dict(ck["ema"])
        if ph.ema is not None:
            ph.ema.num_updates = int(ck["ema"]["num_updates"])
        scaler = s.accelerator.scaler
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        position = (ckpt.counter(ck, "step"), ckpt.counter(ck["data"], "batches_consumed"), ckpt.counter(ck, "skipped"),
                    float(ck["elapsed"]))  # fmt: skip
        _check_data_split(s, ph, ck, path)
    s.print(f"resumed phase {ph.n} from {path} (step {position[0]}, data position {ck['data']})")
    return position


def _micro_batch(s: Session, ph: Phase) -> int:
    """Images per micro-batch per process: the phase's global batch over the processes and accumulation steps."""
    acc = s.accelerator
    return global_batch.micro_batch(ph.cfg.batch_size, acc.num_processes, s.cfg.grad_accum, f"phase{ph.n}.batch_size")


def _check_data_split(s: Session, ph: Phase, ck: dict, path: Path) -> None:
    """The data position counts this process's micro-batches, each a slice of (micro-batch x processes)
    consecutive images: it points at the same images only if that product is the one the checkpoint was
    written with. Checkpoints from before batch_size meant the global batch record neither: their config's
    batch_size was per process and micro-batch, their RNG list has one entry per process."""
    data = ck["data"]
    if "micro_batch" in data:
        micro, processes = ckpt.counter(data, "micro_batch"), ckpt.counter(data, "processes")
    else:
        micro = ckpt.counter(ck["config"][f"phase{ph.n}"], "batch_size")
        processes = len(ck["rng"]) if isinstance(ck["rng"], list) else 1
    acc, accum = s.accelerator, s.cfg.grad_accum
    now = _micro_batch(s, ph)
    if micro * processes == now * acc.num_processes:
        return
    raise UserError(
        f"{path}: written with micro-batches of {micro} images on {processes} process(es), this run makes "
        f"{global_batch.describe(ph.cfg.batch_size, acc.num_processes, accum)}: the saved data position would point "
        f"at other images; resume with phase{ph.n}.batch_size / grad_accum = {micro * processes} (e.g. "
        f"phase{ph.n}.batch_size={micro * processes * accum}; batch_size is now the global batch of all processes "
        "and accumulation steps)"
    )


def _phase_data(s: Session, ph: Phase, batches: int):
    """(sampler, iterator) of the phase's data; the position (epoch, batch) follows from `batches` consumed."""
    cfg, acc = s.cfg, s.accelerator
    dataset = ImageDataset(
        s.train_items,
        ph.cfg.resolution,
        seed=cfg.seed * 1000 + ph.n,
        crop=cfg.data.crop,
        resize=cfg.data.resize,
        scale_range=cfg.data.scale_range,
        hflip=cfg.data.hflip,
    )
    sampler = ResumableBatchSampler(
        len(dataset), _micro_batch(s, ph), dataset.seed, acc.process_index, acc.num_processes, start_batch=batches
    )
    return sampler, iter(make_loader(dataset, sampler, cfg.num_workers, pin_memory=acc.device.type == "cuda"))


def _log_row(s: Session, ph: Phase, step: int, row: dict, logger) -> None:
    """Held-out PSNR/SSIM when due, then the row to the CSV/TensorBoard log (main process)."""
    cfg = s.cfg
    due = cfg.val.every and step % cfg.val.every == 0
    net = whole(ph.template, ph.raw, s.main, s.accelerator.device) if due else None  # sharded: all take part
    if due and s.main and s.val_images:
        lp = ph.perceptual if cfg.val.lpips else None
        m = monitor.evaluate(net, s.val_images, ph.cfg.resolution, cfg.val.batch_size, s.accelerator.device, lp)
        row.update(val_psnr=m["psnr"], val_ssim=m["ssim"], **({"val_lpips": m["lpips"]} if lp is not None else {}))
        params.set_train_mode(ph.model)
    if logger is not None:
        logger.log(row)


def _save_checkpoint(s: Session, ph: Phase, step: int, data: dict) -> None:
    """Everything an exact resume needs; data: the sampler position, skipped images, elapsed seconds."""
    acc = s.accelerator
    ck = {
        "phase": ph.n,
        "step": step,
        "disc": ph.raw_disc.state_dict() if ph.raw_disc is not None else None,
        "disc_optimizer": ph.d_opt.state_dict() if ph.d_opt is not None else None,
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        "data": data["position"],
        "skipped": data["skipped"],
        "elapsed": data["elapsed"],
        "rng": ckpt.all_rng_states(acc),
        "config": s.cfg.to_dict(),
    }
    path = ckpt.checkpoint_path(ph.ckpt_dir, step)
    if ph.template is not None:  # a folder: model, optimizer and EMA shards from every process, the rest in meta
        ema = {"decay": ph.ema.decay, "num_updates": ph.ema.num_updates} if ph.ema is not None else None
        shadow = ph.ema.shadow if ph.ema is not None else {}
        sharding.save(path.with_suffix(""), ph.raw, ph.opt, shadow, {**ck, "ema": ema}, s.cfg.checkpoint.keep_last,
                      s.main)  # fmt: skip
    elif s.main:
        ck.update(model=ph.raw.state_dict(), optimizer=ph.opt.state_dict(),
                  ema=ph.ema.state_dict() if ph.ema is not None else None)  # fmt: skip
        ckpt.save_checkpoint(ck, path, s.cfg.checkpoint.keep_last)
    acc.wait_for_everyone()


def _end_phase(s: Session, ph: Phase, skipped: int, summary: dict) -> dict[str, Any]:
    """Export (EMA weights when enabled), evaluate, plot; metrics.json is written last: it marks the phase
    as complete."""
    acc = s.accelerator
    if ph.template is not None:  # gathered on the main process (every process takes part)
        shadow = ph.ema.shadow if ph.ema is not None else {}
        net = sharding.full_model(ph.template, ph.raw, shadow, s.main, acc.device)
        final_sd = net.state_dict() if s.main else None
    else:
        final_sd = ph.ema.state_dict_for(ph.raw) if ph.ema is not None else ph.raw.state_dict()
    skipped_total = int(acc.reduce(torch.tensor(skipped, device=acc.device), reduction="sum").item())
    result: dict[str, Any] = {}
    if s.main:
        result = _finish_phase(s, ph.n, ph.raw.config, final_sd, ph.folder, ph.export_dir, ph.perceptual)
        result.update(
            steps=summary["steps"],
            stopped_early=summary["stopped_early"],
            weights="ema" if ph.ema is not None else "raw",
            skipped_images=skipped_total,
            train_time_s=summary["train_time_s"],
            start=summary["start"],
            trainable_parameters=sum(p.numel() for p in ph.trainable),
            trainable_tensors=len(ph.trainable_names),
        )
        atomic_write_json(ph.metrics_path, result)
    acc.wait_for_everyone()
    return result


def _train_step(s: Session, ph: Phase, data_iter, step: int, batches: int, skipped: int):
    """One optimizer step: grad_accum micro-batches for G, then the same batches for D (phase 3).

    D is updated after G (not interleaved) so that with fp16 the grad scaler unscales each optimizer's
    gradients exactly once. During the G pass D's parameters are frozen (its gradients from the
    generator loss are not wanted), and the unwrapped D is called so DDP does not expect a reduction.
    """
    acc, accum = s.accelerator, s.cfg.grad_accum
    model, opt, disc, d_opt, raw_disc, loss_fn = ph.model, ph.opt, ph.disc, ph.d_opt, ph.raw_disc, ph.loss_fn
    gan = loss_fn.gan_active(step)
    logs: dict[str, torch.Tensor] = defaultdict(float)
    pairs = []
    if raw_disc is not None:
        raw_disc.requires_grad_(False)
    for micro in range(accum):
        x, n_skipped = next(data_iter)
        x = x.to(acc.device, non_blocking=True)
        skipped += n_skipped
        batches += 1
        sync = contextlib.nullcontext()
        if micro < accum - 1:
            sync = sharding.no_sync(model) if ph.template is not None else acc.no_sync(model)
        with sync:
            with acc.autocast():
                slot = acc.process_index * accum + micro  # the same draw on n processes as on 1 with accumulation
                rec = model(x, latent_channels=_latent_channels(s.cfg, step, slot))
                loss, parts = loss_fn.generator(x, rec, step, ph.last_layer, disc=raw_disc)
                if ph.distill is not None:
                    loss = loss + ph.distill(x, rec, ph.raw.encoder)  # logged within "loss"
                    parts["loss"] = loss.detach()
            acc.backward(loss / accum)
        for k, v in parts.items():
            logs[k] = logs[k] + v / accum
        if gan:
            pairs.append((x, rec.detach()))
    if ph.cfg.optim.grad_clip > 0:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if ph.template is not None:
            sharding.clip_grad_norm(trainable, ph.cfg.optim.grad_clip)
        else:
            acc.clip_grad_norm_(trainable, ph.cfg.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)

    if gan:
        raw_disc.requires_grad_(True)
        for micro, (x, rec) in enumerate(pairs):
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(disc)
            with sync:
                with acc.autocast():
                    d_loss, d_parts = loss_fn.discriminator(disc, x, rec)
                acc.backward(d_loss / accum)
            for k, v in d_parts.items():
                logs[k] = logs[k] + v / accum
        d_opt.step()
        d_opt.zero_grad(set_to_none=True)
    return {k: float(v) for k, v in logs.items()}, batches, skipped


def _latent_channels(cfg: TrainConfig, step: int, slot: int) -> int | None:
    """DC-AE 1.5 structured latent: the channels this micro-batch reconstructs from (None: all). A function
    of the step and of the micro-batch's slot in the global batch (rank x grad_accum + micro), so a resumed
    run, and a run on more processes with less accumulation, draw the same ones."""
    choices = cfg.model.latent_channel_choices
    return random.Random(f"{cfg.seed}/{step}/{slot}").choice(choices) if choices else None


def _time_is_up(acc, t_start: float, minutes: float) -> bool:
    # All processes must agree, or one would wait forever for the others' gradients.
    up = torch.tensor(float(time.time() - t_start > minutes * 60), device=acc.device)
    return bool(acc.reduce(up, reduction="sum").item() > 0)


def _grid(s: Session, model: nn.Module, resolution: int, path: Path) -> None:
    if s.grid_images:
        monitor.save_recon_grid(model, s.grid_images, resolution, path, s.accelerator.device, s.cfg.val.batch_size)


def _evaluate_all(s: Session, model: nn.Module, resolution: int, perceptual: nn.Module | None) -> list[dict]:
    resolutions = s.cfg.val.resolutions or [resolution]
    lp = perceptual if s.cfg.val.lpips else None
    return [
        monitor.evaluate(model, s.val_images, r, s.cfg.val.batch_size, s.accelerator.device, lpips=lp)
        for r in resolutions
    ]


def _fmt_metrics(ms: list[dict]) -> str:
    return "; ".join(
        f"{m['resolution']}px PSNR {m['psnr']:.2f} SSIM {m['ssim']:.4f}"
        + (f" LPIPS {m['lpips']:.4f}" if "lpips" in m else "")
        for m in ms
    )


def _finish_phase(s, n, config, final_sd, folder, export_dir, perceptual) -> dict[str, Any]:
    """Export in both formats, evaluate the exported weights at the validation resolutions, plot."""
    model = DCAE(config).to(s.accelerator.device)
    model.load_state_dict(final_sd)
    model.eval()
    model.save_pretrained(export_dir, format="original", overwrite=True)
    result: dict[str, Any] = {"phase": n, "name": PHASE_NAMES[n], "model": str(export_dir)}
    try:
        model.save_pretrained(folder / "model-diffusers", format="diffusers", overwrite=True)
        result["model_diffusers"] = str(folder / "model-diffusers")
    except UserError as exc:  # e.g. shapes diffusers' AutoencoderDC cannot express
        s.print(f"note: no diffusers export: {exc}")
    if s.val_images:
        result["eval"] = _evaluate_all(s, model, s.cfg.phase(n).resolution, perceptual)
        s.print(f"held-out after phase {n}: {_fmt_metrics(result['eval'])}")
    _grid(s, model, s.cfg.phase(n).resolution, folder / "samples" / "final.png")
    rows = read_log(folder / "log.csv")
    title = f"phase {n}: {PHASE_NAMES[n]}"
    if plot_curves({f"phase {n}": rows}, folder / "loss_curves.png", title, monitor.CURVES):
        result["loss_curves"] = str(folder / "loss_curves.png")
    return result
