"""`dcae experiment structured`: DC-AE 1.5's claim, at small scale: a structured latent space with augmented
diffusion training makes a high-channel latent converge faster.

The paper (DC-AE 1.5, ICCV 2025): more latent channels reconstruct better but the diffusion model on them
converges more slowly; a structured latent (the first channels carry the content, later ones detail: the
decoder is trained to reconstruct from any leading subset) plus augmented diffusion training (the loss also on
leading channel subsets) closes that gap. Here, class-conditional generation of rendered scenes
(dcae.experiments.shapes; each class one scene kind, "a red circle above a blue square", drawn with jitter) at
64 px, the autoencoders trained on them (f8, 8x8 latents):

(a) plain high-channel: the tiny DC-AE with 32 latent channels;
(b) structured: the same network with DC-AE 1.5's sliceable latent, trained on leading subsets (8/16/24/32);
(c) the structured autoencoder's latents with augmented diffusion training (subsets 8/16/24 + the whole);
(d) reference: the plain tiny DC-AE with 8 latent channels.

The same class-conditional DiT (4 blocks, width 128, patch 2: 16 tokens) trains on each with the same steps, batch,
learning rate and seeds (`dcae latents`, `dcae diffusion train`); at several steps `dcae sample` draws
pictures of every class from the EMA weights, and the scene checker measures the share that show their class's
scene (colours, shapes, arrangement). Convergence is that share against training steps, mean ± std over seeds,
beside each autoencoder's reconstruction PSNR and the checker on its reconstructions (its ceiling).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcae.cli import main
from dcae.data.images import load_image_uint8, save_image
from dcae.diffusion.train.checkpoint import list_checkpoints
from dcae.diffusion.train.config import load_config
from dcae.diffusion.train.loop import train
from dcae.experiments import common, plots, shapes
from dcae.experiments.common import Protocol, figures, pct, spread
from dcae.runtime.log import read_log

DEFAULT_SEEDS = 3
OWN_DATA = "rendered scenes of coloured shapes, one scene kind per class (dcae.experiments.shapes)"  # no --data
SIZE = 64
FACTOR = 8
PATCH = 2
HIGH, LOW = 32, 8
AE_SUBSETS = [8, 16, 24, 32]  # the structured autoencoder reconstructs from each (DC-AE 1.5)
DIFFUSION_SUBSETS = [8, 16, 24]  # augmented training: one of these per micro-batch, plus all 32
GUIDANCE = 3.0
# label -> (autoencoder, augmented diffusion training)
ARMS = {
    "(a) plain c32": ("plain-c32", False),
    "(b) structured c32": ("structured-c32", False),
    "(c) structured c32 + augmented": ("structured-c32", True),
    "(d) plain c8 (reference)": ("plain-c8", False),
}
AUTOENCODERS = {"plain-c32": (HIGH, False), "structured-c32": (HIGH, True), "plain-c8": (LOW, False)}
NETWORK = {"depth": 4, "hidden_size": 128, "num_heads": 4}
ASPECT_LABELS = [(a, f"{a} (share of pictures)") for a in shapes.ASPECTS]


@dataclass(frozen=True)
class Budget:
    classes: int
    per_class: int  # training pictures of each class
    ae_steps: int  # batch 16, 64 px
    steps: int  # diffusion training steps
    batch: int
    eval_every: int  # checkpoints sampled and checked
    samples_per_class: int
    sample_steps: int


FULL = Budget(12, 128, 1200, 800, 32, 200, 8, 20)
SMOKE = Budget(3, 4, 2, 4, 4, 2, 1, 2)


def run(p: Protocol) -> dict[str, Any]:
    b = SMOKE if p.smoke else FULL
    kinds = scene_kinds(b.classes)
    data, test = render_data(p.out / "data", kinds, b)
    captions = [k.caption() for k in kinds]
    test_images = [img for img, _ in test]
    test_captions = [c for _, c in test]
    truth = shapes.adherence(test_images, test_captions)
    # each held-out picture scored against the next class's caption (the 4 pictures of a class are consecutive)
    chance = shapes.adherence(test_images, test_captions[4:] + test_captions[:4])

    autoencoders, ceilings = {}, {}
    caches = {}
    for name, (channels, structured) in AUTOENCODERS.items():
        ae_dir, info = train_autoencoder(p, b, name, channels, structured, data)
        info["held_out_psnr_by_channels"] = subset_psnr(ae_dir, test_images, structured)
        autoencoders[name] = info
        ceilings[name] = shapes.adherence(reconstruct(ae_dir, test_images), test_captions)
        caches[name] = p.run_dir(name, "latents")
        _cli(["latents", "--model", str(ae_dir), "--data", str(data), "-o", str(caches[name]), "--resolution",
              str(SIZE), "--batch-size", "64", "--workers", "0"])  # fmt: skip

    curves: dict[str, list[list[dict]]] = {}
    subset_rows: list[dict] = []
    for label, (ae, augmented) in ARMS.items():
        for seed in p.seeds:
            run_dir = p.run_dir(common.slug(label), f"seed{seed}")
            train_dit(p, b, caches[ae], run_dir, seed, augmented)
            curves.setdefault(label, []).append(convergence(run_dir, b, captions, seed))
            if augmented:  # the same model sampled at a leading subset: the structured decoder decodes it
                subset_rows.append(adherence_at(run_dir, b, captions, seed, DIFFUSION_SUBSETS[0], "subset"))
    table = {label: final_row(rows) for label, rows in curves.items()}
    results = {
        "resolution": SIZE,
        "budget": asdict(b),
        "network": NETWORK,
        "classes": captions,
        "guidance": GUIDANCE,
        "autoencoder_subsets": AE_SUBSETS,
        "diffusion_subsets": DIFFUSION_SUBSETS,
        "checker_on_truth": truth,
        "chance": chance,
        "autoencoders": autoencoders,
        "autoencoder_ceiling": ceilings,
        "curves": curves,
        "final": table,
        "augmented_at_subset": {"channels": DIFFUSION_SUBSETS[0],
                                **{a: spread([r[a] for r in subset_rows]) for a in shapes.ASPECTS}},
    }  # fmt: skip
    plots.plot_curves(
        curves,
        [k for k in ASPECT_LABELS if k[0] != "shape"],
        p.out / "convergence.png",
        f"class adherence of samples against training steps (mean ± std over {len(p.seeds)} seeds)",
    )
    markdown = _markdown(b, truth, chance, autoencoders, ceilings, curves, table, results["augmented_at_subset"])
    common.write_report(p, "DC-AE 1.5: structured latent and augmented diffusion training", markdown, results)
    return results


# ----------------------------------------------------------------------------- data
def scene_kinds(n: int) -> list[shapes.Scene]:
    """n different scene kinds (canonical wording), drawn with a fixed seed: class k is kind k."""
    rng, kinds = random.Random(0), []
    while len(kinds) < n:
        s = shapes.random_scene(rng).canonical()
        if s not in kinds:
            kinds.append(s)
    return kinds


def render_data(folder: Path, kinds: list[shapes.Scene], b: Budget):
    """train/kNN/*.png (class folders, sorted = class index) rendered once; 4 held-out pictures per class."""
    train_dir = folder / "train"
    rng = random.Random(1)
    for k, kind in enumerate(kinds):
        d = train_dir / f"k{k:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(b.per_class):
            img = shapes.render(kind, SIZE, rng)  # drawn even when kept, so the pictures do not depend on a rerun
            if not (d / f"{i:04d}.png").is_file():
                save_image(img, d / f"{i:04d}.png")
    rng = random.Random(2)
    test = [(shapes.render(kind, SIZE, rng), kind.caption()) for kind in kinds for _ in range(4)]
    return train_dir, test


# ----------------------------------------------------------------------------- autoencoders
def train_autoencoder(p: Protocol, b: Budget, name: str, channels: int, structured: bool, data: Path):
    """The tiny f8 DC-AE (L1, 64 px, batch 16, seed 0); structured: DC-AE 1.5's sliceable latent (no bottleneck
    shortcuts), trained on the leading subsets AE_SUBSETS. Saved with its scaling factor (1 / held-out RMS)."""
    run_dir, out = p.run_dir(name, "autoencoder"), p.out / "autoencoders" / name
    model = common.tiny_model(FACTOR, channels)
    if structured:
        model.update(name=f"tiny-f{FACTOR}c{channels}-structured", encoder_out_shortcut=False,
                     encoder_sliceable_out=True, decoder_in_shortcut=False, decoder_sliceable_in=True)  # fmt: skip
    optim = {"weight_decay": 0.1, "warmup_steps": p.steps(20, 0), "schedule": "cosine"}
    ph1 = common.phase(SIZE, p.steps(16, 2), b.ae_steps, 2e-3, loss={"perceptual_weight": 0.0}, optim=optim)
    proto = Protocol(p.name, p.out, [str(data)], p.steps(48, 2), p.seeds, p.smoke, p.command)
    cfg = common.train_config(proto, run_dir, 0, model, {1: ph1}, val_resolutions=[SIZE])
    if structured:
        cfg.model.latent_channel_choices = list(AE_SUBSETS)
    cfg.data.hflip = 0.0  # a flipped "left of" scene is another class
    held_out = common.run_arm(cfg, [1])[1]["eval"][0]
    if not (out / "config.json").is_file():
        ae = common.load_model(run_dir / "phase1" / "model")
        ae.config.scaling_factor = float(held_out["implied_scaling_factor"])
        ae.save_pretrained(out)
    info = {"latent_channels": channels, "structured": structured,
            "parameters": sum(t.numel() for t in common.load_model(out).parameters()),
            "scaling_factor": float(held_out["implied_scaling_factor"]),
            **{k: float(held_out[k]) for k in ("psnr", "ssim")}}  # fmt: skip
    return out, info


def _batches(images: list[np.ndarray]):
    for i in range(0, len(images), 32):
        yield torch.from_numpy(np.stack(images[i : i + 32])).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def reconstruct(ae_dir: Path, images: list[np.ndarray], channels: int | None = None) -> list[np.ndarray]:
    model, out = common.load_model(ae_dir), []
    for x in _batches(images):
        y = model.decode(model.encode(x, latent_channels=channels)).clamp(-1, 1)
        out += list(((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return out


def subset_psnr(ae_dir: Path, images: list[np.ndarray], structured: bool) -> dict[str, float]:
    """Held-out PSNR (dB) from all channels, and for the structured autoencoder from each leading subset."""
    full = common.load_model(ae_dir).latent_channels
    out = {}
    for c in AE_SUBSETS if structured else [full]:
        rec = np.stack(reconstruct(ae_dir, images, c if structured else None)).astype(np.float64)
        mse = ((rec - np.stack(images).astype(np.float64)) ** 2).mean()
        out[str(c)] = float(10 * math.log10(255.0**2 / mse))
    return out


# ----------------------------------------------------------------------------- diffusion
def train_dit(p: Protocol, b: Budget, cache: Path, run_dir: Path, seed: int, augmented: bool) -> dict:
    """`dcae diffusion train`: flow matching, logit-normal times, 10% null class, EMA 0.999 with warm-up; a
    checkpoint every `eval_every` steps, all kept (the curve samples each)."""
    cfg = load_config({
        "data": str(cache), "out_dir": str(run_dir), "seed": seed, "batch_size": b.batch, "max_steps": b.steps,
        "mixed_precision": "no", "num_workers": 0, "ema_decay": 0.999,
        "log": {"every": p.steps(25, 1), "tensorboard": False},
        "checkpoint": {"every": b.eval_every, "keep_last": b.steps // b.eval_every + 1},
        "model": {"name": f"DiT-S/{PATCH}", "overrides": NETWORK},
        "diffusion": {"objective": "flow", "t_sampling": "logit_normal", "cond_dropout": 0.1},
        "optim": {"lr": 5e-4, "warmup_steps": p.steps(50, 0)},
        "sample": {"every": 0, "num": 4, "steps": b.sample_steps, "solver": "euler", "cfg_scale": GUIDANCE,
                   "decode": False},
        "augmented": {"channels": DIFFUSION_SUBSETS if augmented else [], "include_full": True},
    })  # fmt: skip
    return train(cfg, progress=False)


def adherence_at(run_dir: Path, b: Budget, captions: list[str], seed: int, channels: int | None,
                 tag: str, ckpt: Path | None = None) -> dict[str, float]:  # fmt: skip
    """`dcae sample` (EMA, Euler, guidance GUIDANCE) of `samples_per_class` pictures per class, checked."""
    out = run_dir / f"samples-{tag}"
    n = b.samples_per_class * len(captions)
    argv = ["sample", "--ckpt", str(ckpt or run_dir), "-o", str(out), "-n", str(n), "--cfg", str(GUIDANCE),
            "--steps", str(b.sample_steps), "--solver", "euler", "--seed", str(1000 + seed), "--batch-size",
            str(n), "--grid", "0"]  # fmt: skip
    if channels:
        argv += ["--channels", str(channels)]
    _cli(argv)
    labels = json.loads((out / "samples.json").read_text())["labels"]
    images = [load_image_uint8(f) for f in sorted((out / "images").glob("*.png"))]
    return shapes.adherence(images, [captions[y] for y in labels])


def convergence(run_dir: Path, b: Budget, captions: list[str], seed: int) -> list[dict[str, float]]:
    """Adherence at every kept checkpoint, and the training loss there."""
    losses = {r["step"]: r["loss"] for r in read_log(run_dir / "log.csv") if "loss" in r}
    rows = []
    for ckpt in list_checkpoints(run_dir):
        step = int(ckpt.stem.split("_")[1])
        rows.append({"step": step, "loss": losses.get(step, math.nan),
                     **adherence_at(run_dir, b, captions, seed, None, f"step{step}", ckpt)})  # fmt: skip
    return rows


def final_row(rows: list[list[dict]]) -> dict[str, dict]:
    """Per aspect: the spread over seeds at the last step, and of the mean over the curve (area under it)."""
    return {
        **{a: spread([r[-1][a] for r in rows]) for a in shapes.ASPECTS},
        **{f"curve_mean_{a}": spread([float(np.mean([x[a] for x in r])) for r in rows]) for a in shapes.ASPECTS},
    }


def _cli(argv: list[str]) -> None:
    if main(argv) != 0:
        raise RuntimeError(f"dcae {' '.join(argv[:2])} failed")


# ----------------------------------------------------------------------------- report
def _markdown(b, truth, chance, autoencoders, ceilings, curves, table, at_subset) -> str:
    steps = [r["step"] for r in next(iter(curves.values()))[0]]
    lines = [
        f"{b.classes} classes, each one scene kind of two coloured shapes drawn with jittered sizes and places at "
        f"{SIZE} px ({b.per_class} training pictures per class, 4 held out); tiny f{FACTOR} DC-AEs ({SIZE // FACTOR}x"
        f"{SIZE // FACTOR} latents, L1, {b.ae_steps} steps); the same DiT (4 blocks, width 128, patch {PATCH}) "
        f"trained {b.steps} steps at batch "
        f"{b.batch}, lr 5e-4, flow matching, on each latent; {b.samples_per_class} samples per class from the EMA "
        f"weights at steps {steps} (Euler {b.sample_steps} steps, guidance {GUIDANCE:g}). Adherence: the share of "
        "samples in which the scene checker finds their class's colours (and no other), shapes and arrangement; "
        "mean ± sample std over training seeds. Augmented training costs 2 forward/backward passes per step "
        "(one subset + the whole latent).",
        "",
        "| autoencoder | channels | structured | held-out PSNR (dB, training's 48) | PSNR of the 48 test pictures "
        "from the leading channels | checker on its "
        "reconstructions (colour / position / all) |",
        "|---|---|---|---|---|---|",
    ]
    for name, info in autoencoders.items():
        subsets = ", ".join(f"{c}: {v:.2f}" for c, v in info["held_out_psnr_by_channels"].items())
        lines.append(
            f"| {name} | {info['latent_channels']} | {'yes' if info['structured'] else 'no'} | "
            f"{info['psnr']:.2f} | {subsets} | "
            + " / ".join(f"{100 * ceilings[name][a]:.1f}" for a in ("colour", "position", "all"))
            + " |"
        )
    lines += [
        "",
        f"Checker on the rendered truth: {100 * truth['all']:.1f}% (all); chance (true pictures, another class's "
        "caption): " + ", ".join(f"{a} {100 * chance[a]:.1f}%" for a in shapes.ASPECTS) + ".",
    ]
    for aspect in ("colour", "position", "all"):
        lines += ["", f"**{aspect}** (share of samples) against training steps:", "",
                  "| diffusion arm | " + " | ".join(f"step {s}" for s in steps) + " | mean over the curve |",
                  "|---|" + "---|" * (len(steps) + 1)]  # fmt: skip
        for label, rows in curves.items():
            at = [pct(spread([r[i][aspect] for r in rows])) for i in range(len(steps))]
            mean = pct(spread([float(np.mean([x[aspect] for x in r])) for r in rows]))
            lines.append(f"| {label} | " + " | ".join(at) + f" | {mean} |")
    lines += [
        "",
        f"Arm (c) sampled at its first {at_subset['channels']} channels only (`dcae sample --channels "
        f"{at_subset['channels']}`, the structured decoder decoding those): all {pct(at_subset['all'])}, colour "
        f"{pct(at_subset['colour'])}, shape {pct(at_subset['shape'])}, position {pct(at_subset['position'])}.",
    ] + figures("convergence")
    return "\n".join(lines)
