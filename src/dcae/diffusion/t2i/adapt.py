"""DC-Gen (arXiv 2509.25180): move a pretrained text-to-image model onto a deeper autoencoder after training.
`dcae t2i adapt CONFIG.yaml [key=value ...]`.

Given a teacher trained on autoencoder A's latents (`teacher`, checked against `teacher_data`, a `dcae t2i cache`
of A) and the same images and captions through a deeper autoencoder B (`data`, checked item for item), the
student is the teacher's network with a new patch embedder for B's latents (`patch_size`) and a new output head
(`proj_out`); everything else starts as the teacher's. Three stages, each a run folder of its own under out_dir,
each resumable (a finished stage is kept):

1. `align/`: embedding alignment. Only the new patch embedder trains, so that its tokens, bilinearly upsampled
   to the teacher's token grid, match the teacher's patch-embedder output on the paired latent (MSE; AdamW
   lr 1e-4, betas 0.9, 0.95 as DC-Gen). The backbone then sees the tokens it knows.
2. `head/`: the embedder and the head train with the flow-matching loss on B's latents, the backbone frozen
   (`dcae t2i train` with finetune.trainable = [patch_embed, proj_out]).
3. `lora/`: LoRA end to end (attention and feed-forward layers), the embedder and the head fully trainable, EMA.

Then `final/`: the LoRA merged into the weights (peft's merge): an ordinary checkpoint of B's latents that
`dcae t2i sample / eval / export` take like any other.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dcae.diffusion.nets.sana import SanaTransformer
from dcae.diffusion.t2i.cache import CAPTIONS_NAME
from dcae.diffusion.t2i.finetune import check_matches, load_pretrained, model_args_of
from dcae.diffusion.train import checkpoint as run_ckpt
from dcae.diffusion.train import lora as lora_mod
from dcae.diffusion.train.config import DiffusionConfig, SampleConfig, config_to_dict
from dcae.diffusion.train.config import load_config as load_train_config
from dcae.diffusion.train.data import open_cache
from dcae.diffusion.train.loop import train
from dcae.errors import UserError
from dcae.runtime import checkpoint as ckpt
from dcae.runtime import config as runtime_config
from dcae.runtime.config import dump_yaml
from dcae.runtime.log import Logger
from dcae.utils import numbers as num
from dcae.utils.io import atomic_write_text, check_input, check_output_dir
from dcae.utils.numbers import fields_problems

STAGES = ("align", "head", "lora")
NEW = ["patch_embed", "proj_out"]  # the modules B's latents need anew (SanaTransformer2DModel's names)


@dataclass
class StageConfig:
    steps: int = 1000
    lr: float = 1e-4


@dataclass
class AdaptLora:
    rank: int = 32
    alpha: float | None = None  # None: the rank
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0",
                                                               "conv_inverted", "conv_point"])  # fmt: skip


@dataclass
class AdaptConfig:
    teacher: str = ""  # one of our text-to-image runs / checkpoints, or a SANA pipeline, trained on teacher_data's AE
    teacher_data: str = ""  # `dcae t2i cache` of the teacher's autoencoder A
    data: str = ""  # `dcae t2i cache` of the same images and captions through the deeper autoencoder B
    out_dir: str = "runs/adapt"
    patch_size: int = 1  # the student's patch size on B's latents
    seed: int = 0
    batch_size: int = 32
    mixed_precision: str = "no"
    num_workers: int = 0
    ema_decay: float = 0.999  # stage 3's EMA (DC-Gen: 0.999)
    grad_clip: float = 0.1  # DC-Gen's clip
    checkpoint_every: int = 500
    log_every: int = 50
    align: StageConfig = field(default_factory=lambda: StageConfig(steps=2000, lr=1e-4))
    head: StageConfig = field(default_factory=lambda: StageConfig(steps=500, lr=1e-4))
    tune: StageConfig = field(default_factory=lambda: StageConfig(steps=1000, lr=1e-4))
    lora: AdaptLora = field(default_factory=AdaptLora)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(every=0))


NUMBERS = {"patch_size": num.PATCH_SIZE, "seed": num.SEED, "batch_size": num.COUNT, "num_workers": num.WORKERS,
           "ema_decay": num.FRACTION, "grad_clip": num.NONNEGATIVE, "checkpoint_every": num.COUNT,
           "log_every": num.COUNT, "align.steps": num.COUNT, "align.lr": num.POSITIVE, "head.steps": num.COUNT,
           "head.lr": num.POSITIVE, "tune.steps": num.COUNT, "tune.lr": num.POSITIVE,
           "lora.rank": num.COUNT}  # fmt: skip


def load_config(path, overrides: list[str] | None = None) -> AdaptConfig:
    return runtime_config.load_config(AdaptConfig, path, overrides or [], finish=validate)


def validate(cfg: AdaptConfig) -> None:
    problems = [f"{k} is required" for k in ("teacher", "teacher_data", "data") if not getattr(cfg, k)]
    problems += fields_problems(cfg, NUMBERS)
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        problems.append(f"mixed_precision must be no, bf16 or fp16, got {cfg.mixed_precision!r}")
    if problems:
        raise UserError("invalid adapt config: " + "; ".join(problems))


# ----------------------------------------------------------------------------- the student and the pairs
def student_from(teacher: SanaTransformer, channels: int, patch_size: int, spatial_ratio: float,
                 conditioning: dict) -> tuple[dict, SanaTransformer]:  # fmt: skip
    """(model_args, network) for B's latents: the teacher's config with B's channels and patch size (and its
    sample_size in B's latent pixels), the teacher's weights but a new (SANA-initialised) embedder and head."""
    args = model_args_of(teacher, conditioning)
    args["in_channels"] = channels
    args["input_size"] = max(1, round(args["input_size"] * spatial_ratio))
    args["overrides"] = {**args["overrides"], "patch_size": patch_size}
    student = run_ckpt.build_model(args)
    keep = {k: v for k, v in teacher.state_dict().items() if k.split(".")[0] not in NEW}
    missing, unexpected = student.load_state_dict(keep, strict=False)
    assert not unexpected and all(k.split(".")[0] in NEW for k in missing), (missing, unexpected)
    return args, student


def check_paired(a_root: str, b_root: str, a, b) -> None:
    """The two caches hold the same images and captions in the same order (captions.jsonl), made with the same
    text encoder: item i of one is item i of the other."""
    if b.index.text_encoder_fingerprint != a.index.text_encoder_fingerprint:
        raise UserError(f"data={b_root} and teacher_data={a_root} were made with different text encoders "
                        f"({b.index.conditioning.text_encoder} vs {a.index.conditioning.text_encoder})")  # fmt: skip
    rows = []
    for root in (a_root, b_root):
        path = Path(root) / CAPTIONS_NAME
        rows.append([(r["image"], r["caption"], tuple(r.get("bucket") or ())) for r in
                     map(json.loads, path.read_text().splitlines())])  # fmt: skip
    if len(rows[0]) != len(rows[1]):
        raise UserError(f"data={b_root} holds {len(rows[1])} items, teacher_data={a_root} {len(rows[0])}: not the "
                        "same images (cache the same --data through both autoencoders)")  # fmt: skip
    for i, (ra, rb) in enumerate(zip(*rows)):
        if ra != rb:
            raise UserError(f"data={b_root} item {i} is {rb[0]} ({rb[1]!r}, bucket {rb[2]}), teacher_data={a_root} "
                            f"item {i} is {ra[0]} ({ra[1]!r}, bucket {ra[2]}): the caches do not pair item for item "
                            "(cache the same --data at the same --resolution through both)")  # fmt: skip


def alignment_loss(student_embed, teacher_embed, z_student: torch.Tensor, z_teacher: torch.Tensor,
                   student_patch: int, teacher_patch: int) -> torch.Tensor:  # fmt: skip
    """DC-Gen's embedding alignment (align_type=upsample): MSE between the teacher's patch-embedder tokens of
    its latent and the student's tokens of the paired latent, bilinearly upsampled to the teacher's grid."""
    B = z_teacher.shape[0]
    grid_t = (z_teacher.shape[2] // teacher_patch, z_teacher.shape[3] // teacher_patch)
    grid_s = (z_student.shape[2] // student_patch, z_student.shape[3] // student_patch)
    with torch.no_grad():
        target = teacher_embed(z_teacher)  # B x T_teacher x D
    tokens = student_embed(z_student).transpose(1, 2).reshape(B, -1, *grid_s)
    up = F.interpolate(tokens, size=grid_t, mode="bilinear", align_corners=False)
    return F.mse_loss(up.flatten(2).transpose(1, 2), target)


# ----------------------------------------------------------------------------- stage 1
def _stage1(cfg: AdaptConfig, teacher: SanaTransformer, a, b, out: Path) -> Path:
    """Embedding alignment as its own small loop (no diffusion loss): a run folder with checkpoints that
    `finetune.pretrained` takes; resumes exactly (weights, Adam, step; the pairs of step s are fixed by s)."""
    run = out / "align"
    ratio = a.index.spatial_compression / b.index.spatial_compression
    with torch.random.fork_rng():  # the new embedder and head: drawn from the seed alone
        torch.manual_seed(cfg.seed)
        args, student = student_from(teacher, b.index.latent_channels, cfg.patch_size, ratio,
                                     b.conditioning.spec())  # fmt: skip
    for p in student.parameters():
        p.requires_grad_(False)
    params = list(student.patch_embed.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.align.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, steps = 0, cfg.align.steps
    found = run_ckpt.list_checkpoints(run)
    if found:
        state = ckpt.load_checkpoint(found[-1])
        with ckpt.restoring(found[-1]):
            student.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step = ckpt.counter(state, "step")
    if step >= steps:
        return found[-1]
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", dump_yaml(cfg))
    log = Logger(run, ("step", "loss", "elapsed_s"), step if step else None, False)
    t_patch = teacher.patch_size
    teacher_embed = teacher.patch_embed.eval()
    # B's batches (one resolution bucket each, shuffled per epoch from the seed); item i of A pairs with item i
    per_epoch = len(b.epoch_batches(0, cfg.seed, cfg.batch_size))
    if per_epoch == 0:
        raise UserError(f"data={cfg.data} holds fewer items per bucket than batch_size={cfg.batch_size}")
    t0, last = time.perf_counter(), None
    while step < steps:
        epoch, k = divmod(step, per_epoch)
        idx = b.epoch_batches(epoch, cfg.seed, cfg.batch_size)[k]
        za = torch.stack([a[i][0] for i in idx])
        zb = torch.stack([b[i][0] for i in idx])
        loss = alignment_loss(student.patch_embed, teacher_embed, zb, za, cfg.patch_size, t_patch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == steps:
            log.log({"step": step, "loss": loss.detach().item(), "elapsed_s": time.perf_counter() - t0})
        if step % cfg.checkpoint_every == 0 or step == steps:
            last = _save(run, step, student, args, b, cfg, opt.state_dict())
    log.close()
    return last


def _save(run: Path, step: int, model, args: dict, ds, cfg: AdaptConfig, optimizer: dict | None) -> Path:
    """A checkpoint in the training loop's format (model and EMA the same weights)."""
    train_cfg = _train_config(cfg, run, ds_root=cfg.data, steps=step, lr=1e-4)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {"model": sd, "ema": sd, "optimizer": optimizer or {}, "step": step, "rng": [ckpt.rng_state()],
             "config": config_to_dict(train_cfg), "model_args": args, "latents": ds.index.summary()}  # fmt: skip
    return ckpt.save_checkpoint(state, run_ckpt.checkpoint_path(run, step), keep_last=1)


# ----------------------------------------------------------------------------- stages 2 and 3
def _train_config(cfg: AdaptConfig, run: Path, ds_root: str, steps: int, lr: float, **finetune):
    d = cfg.diffusion
    return load_train_config({
        "data": ds_root, "out_dir": str(run), "seed": cfg.seed, "batch_size": cfg.batch_size, "max_steps": steps,
        "mixed_precision": cfg.mixed_precision, "num_workers": cfg.num_workers, "ema_decay": cfg.ema_decay,
        "checkpoint": {"every": cfg.checkpoint_every, "keep_last": 1},
        "log": {"every": cfg.log_every, "tensorboard": False},
        "diffusion": {"objective": "flow", "t_sampling": d.t_sampling, "cond_dropout": d.cond_dropout},
        "optim": {"lr": lr, "grad_clip": cfg.grad_clip},
        "sample": config_to_dict(cfg.sample), "finetune": finetune,
    })  # fmt: skip


def _done(run: Path, steps: int) -> Path | None:
    found = run_ckpt.list_checkpoints(run)
    return found[-1] if found and int(found[-1].stem.split("_")[-1]) >= steps else None


def _merge(cfg: AdaptConfig, lora_ckpt: Path, ds, out: Path) -> Path:
    """final/: stage 3's EMA weights with the LoRA merged in, as an ordinary checkpoint."""
    model, _, meta = run_ckpt.load_checkpoint(lora_ckpt)
    model = lora_mod.merge_lora(model)
    args = {k: v for k, v in meta["model_args"].items() if k != "lora"}
    return _save(out / "final", meta["step"], model, args, ds, cfg, None)


def adapt(cfg: AdaptConfig, progress: bool = True) -> dict:
    """Run (or resume) the three stages and the merge; returns the run folders and the final checkpoint."""
    validate(cfg)
    check_output_dir(cfg.out_dir, "out_dir")
    out = Path(cfg.out_dir)
    a, b = open_cache(cfg.teacher_data, seed=cfg.seed), open_cache(cfg.data, seed=cfg.seed)
    check_paired(cfg.teacher_data, cfg.data, a, b)
    pre = load_pretrained(cfg.teacher, a.index.text_dtype or "fp32")
    check_matches(pre, a.index, cfg.teacher_data, what="teacher")
    teacher = pre.model.float().eval()
    if any(s % cfg.patch_size for s in b.latent_shape[1:]):
        raise UserError(f"patch_size={cfg.patch_size} does not divide data={cfg.data}'s latents {b.latent_shape}")

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    final = _done(out / "final", cfg.tune.steps)
    if final is not None:
        say(f"adapted model: {final} (all stages done)")
        return {"final": str(final), **{s: str(out / s) for s in STAGES}}
    t0 = time.perf_counter()
    say(f"stage 1/3 embedding alignment ({cfg.align.steps} steps): {out / 'align'}")
    align = _stage1(cfg, teacher, a, b, out)
    say(f"stage 2/3 embedder + head, backbone frozen ({cfg.head.steps} steps): {out / 'head'}")
    head = _done(out / "head", cfg.head.steps) or train(
        _train_config(cfg, out / "head", cfg.data, cfg.head.steps, cfg.head.lr, pretrained=str(align),
                      trainable=NEW), progress=progress)["checkpoint"]  # fmt: skip
    say(f"stage 3/3 LoRA rank {cfg.lora.rank} + embedder + head, EMA ({cfg.tune.steps} steps): {out / 'lora'}")
    lora = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "target_modules": cfg.lora.target_modules}
    tuned = _done(out / "lora", cfg.tune.steps) or train(
        _train_config(cfg, out / "lora", cfg.data, cfg.tune.steps, cfg.tune.lr, pretrained=str(head),
                      trainable=NEW, lora=lora), progress=progress)["checkpoint"]  # fmt: skip
    final = _merge(cfg, Path(tuned), b, out)
    say(f"adapted model (LoRA merged): {final} ({time.perf_counter() - t0:.0f} s)")
    return {"final": str(final), "align": str(align), "head": str(head), "lora": str(tuned)}


def cmd_adapt(args) -> int:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():  # no config file, only overrides
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    for key in ("teacher_data", "data"):
        check_input(getattr(cfg, key), key)
    result = adapt(cfg, progress=not args.quiet)
    print(f"adapted model: {result['final']} (dcae t2i sample --ckpt {Path(result['final']).parent.parent})")
    return 0
