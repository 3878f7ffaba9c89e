"""`dcae experiment t2i`: text conditioning that works, and the paper's token claim, at small scale.

The paper (Table 6, MJHQ-30K 512 px): a patch-1 model on DC-AE f32 latents matches the same model with
patch 2 on SD-VAE f8 latents (FID 5.81 vs 6.64, CLIP score 26.7 vs 26.5) with 4x fewer tokens and a
several-fold higher throughput. Here, on rendered scenes whose prompts a program can check
(dcae.experiments.shapes: "a red circle above a blue square", 128 px):

1. Two autoencoders trained on the scenes with the same recipe (L1; 64 px crops, then whole scenes): the DC-AE
   at f32 (32 channels, 4x4 latents) and its first four stages as an f8 model (4 channels, 16x16 latents: the
   SD-VAE grid). Each one's scaling factor is 1 / RMS of its held-out latents.
2. `dcae t2i cache` with all-MiniLM-L6-v2 (a real pretrained sentence encoder, offline), `dcae t2i train`:
   the same SANA-style network (4 layers, width 128) on each, patch 1 on f32 (16 tokens) and patch 2 on f8
   (64 tokens), same steps, batch, learning rate and seeds.
3. `dcae t2i sample` for held-out prompts with guidance off (1) and on, and the checker: the share of
   pictures with the named colours, shapes and arrangement, against chance (true pictures scored against the
   wrong captions) and each autoencoder's ceiling (its reconstructions of the true pictures).
4. Throughput of the network on each latent (`dcae bench`'s measurement: training and sampling img/s) and
   each autoencoder's decode speed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcae.cli import main
from dcae.data.images import load_image_uint8, save_image
from dcae.diffusion.bench import Setting, bench_one, decode_img_s
from dcae.diffusion.t2i.encoders import all_minilm_l6_v2
from dcae.diffusion.train.config import load_config
from dcae.diffusion.train.loop import train
from dcae.experiments import common, plots, shapes
from dcae.experiments.common import Protocol, figures, pct, spread
from dcae.models import DCAE, DCAEConfig
from dcae.runtime.log import read_log
from dcae.utils.io import atomic_write_text

DEFAULT_SEEDS = 3
OWN_DATA = "rendered scenes of coloured shapes (dcae.experiments.shapes)"  # no --data
SIZE = 128
GUIDANCE = (1.0, 4.0)
MAX_TOKENS = 16  # the longest caption is 12 MiniLM tokens with [CLS] and [SEP]
# label -> (spatial factor, latent channels, patch size)
ARMS = {"DC-AE f32c32, patch 1": (32, 32, 1), "f8c4, patch 2": (8, 4, 2)}
# SANA's layout at a small size: 4 layers, 4 heads of 32 (width 128), cross-attention 4 x 32
NETWORK = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "num_cross_attention_heads": 4,
           "cross_attention_head_dim": 32}  # fmt: skip
ASPECT_LABELS = [(a, f"{a} (share of pictures)") for a in shapes.ASPECTS]


@dataclass(frozen=True)
class Budget:
    train_images: int
    test_prompts: int
    ae_steps: int  # phase 1: 64 px crops of the scenes, batch 16
    ae_steps_full: int  # then all layers on whole 128 px scenes, batch 8
    t2i_steps: int
    t2i_batch: int
    sample_steps: int
    bench_steps: int


FULL = Budget(4000, 200, 2000, 300, 2000, 32, 20, 5)
SMOKE = Budget(40, 6, 2, 2, 4, 8, 2, 1)


def run(p: Protocol) -> dict[str, Any]:
    b = SMOKE if p.smoke else FULL
    speed = throughput(b)  # first: the rest of the run cannot disturb the timing
    train_dir, test = render_data(p.out / "data", b)
    test_images, prompts = [t[0] for t in test], [t[1] for t in test]
    chance = shapes.chance(test_images, prompts)
    truth = shapes.adherence(test_images, prompts)
    coverage = _coverage(train_dir, prompts)

    text_encoder = str(all_minilm_l6_v2())
    autoencoders, ceilings, adherence, losses, samples = {}, {}, {}, {}, {}
    for label, (factor, channels, patch) in ARMS.items():
        ae_dir, ae_info = train_autoencoder(p, b, label, factor, channels, train_dir)
        autoencoders[label] = ae_info
        ceilings[label] = shapes.adherence(reconstruct(ae_dir, test_images), prompts)
        cache = p.run_dir(common.slug(label), "cache")
        _cli(["t2i", "cache", "--data", str(train_dir), "--model", str(ae_dir), "--text-encoder", text_encoder,
              "-o", str(cache), "--resolution", str(SIZE), "--patch-size", str(patch), "--max-tokens",
              str(MAX_TOKENS), "--batch-size", "32"])  # fmt: skip
        for seed in p.seeds:
            run_dir = p.run_dir(common.slug(label), f"t2i-seed{seed}")
            train_t2i(p, b, cache, run_dir, patch, seed)
            losses.setdefault(label, []).append(_loss_curve(run_dir))
            for g in GUIDANCE:
                images = sample(run_dir, p.out / "data" / "test_prompts.txt", b, g, seed)
                adherence.setdefault(label, {}).setdefault(g, []).append(shapes.adherence(images, prompts))
                if seed == p.seeds[0]:
                    samples[(label, g)] = images
    table = {
        label: {g: {a: spread([r[a] for r in rows]) for a in shapes.ASPECTS} for g, rows in by_g.items()}
        for label, by_g in adherence.items()
    }
    results = {
        "resolution": SIZE,
        "budget": asdict(b),
        "network": NETWORK,
        "text_encoder": "sentence-transformers/all-MiniLM-L6-v2",
        "guidance": list(GUIDANCE),
        "checker_on_truth": truth,
        "test_scenes_seen_in_training": coverage,
        "chance": chance,
        "autoencoders": autoencoders,
        "autoencoder_ceiling": ceilings,
        "adherence": {label: {f"{g:g}": v for g, v in by_g.items()} for label, by_g in table.items()},
        "throughput": speed,
        "loss_curves": losses,
    }
    _pictures(p, table, chance, ceilings, losses, samples, test_images, prompts)
    markdown = _markdown(b, truth, chance, ceilings, autoencoders, table, speed, coverage)
    common.write_report(p, "Text-to-image on DC-AE latents: prompt adherence and the token claim", markdown, results)
    return results


# ----------------------------------------------------------------------------- steps
def render_data(folder: Path, b: Budget) -> tuple[Path, list[tuple[np.ndarray, str]]]:
    """train/NNNNN.png + .txt (rendered once, kept on a rerun), test/ pictures and test_prompts.txt."""

    train, test_dir = folder / "train", folder / "test"
    for d, n, seed in ((train, b.train_images, 1), (test_dir, b.test_prompts, 2)):
        d.mkdir(parents=True, exist_ok=True)
        if (d / f"{n - 1:05d}.txt").is_file():
            continue  # complete: the caption is written after its picture
        for i, (img, caption) in enumerate(shapes.make_set(n, SIZE, seed)):
            save_image(img, d / f"{i:05d}.png")
            atomic_write_text(d / f"{i:05d}.txt", caption + "\n")
    test = shapes.make_set(b.test_prompts, SIZE, 2)
    atomic_write_text(folder / "test_prompts.txt", "".join(c + "\n" for _, c in test))
    return train, test


def train_autoencoder(p: Protocol, b: Budget, label: str, factor: int, channels: int, data: Path):
    """Phase 1 on 64 px crops of the scenes, then all layers on whole 128 px scenes (seed 0); the model with its
    scaling factor (1 / RMS of the held-out latents)."""
    run_dir = p.run_dir(common.slug(label), "autoencoder")
    out = p.out / "autoencoders" / common.slug(label)
    # L1 only: at 128 px the LPIPS network is 80% of a step's time, and flat shapes need no perceptual loss.
    # Crops first: 3x the pictures per second; whole scenes then teach the layout of a 128 px latent.
    optim = {"weight_decay": 0.1, "warmup_steps": p.steps(20, 0), "schedule": "cosine"}
    ph1 = common.phase(SIZE // 2, p.steps(16, 2), b.ae_steps, 2e-3, loss={"perceptual_weight": 0.0}, optim=optim)
    ph2 = common.phase(SIZE, p.steps(8, 2), b.ae_steps_full, 5e-4, loss={"perceptual_weight": 0.0}, optim=optim,
                       trainable={"all": "*"})  # fmt: skip
    proto = Protocol(p.name, p.out, [str(data)], p.steps(100, 2), p.seeds, p.smoke, p.command)
    cfg = common.train_config(proto, run_dir, 0, common.tiny_model(factor, channels), {1: ph1, 2: ph2},
                              val_resolutions=[SIZE])  # fmt: skip
    cfg.data.resize = False  # crops of the scenes at their size, not shrunk scenes
    result = common.run_arm(cfg, [1, 2])[2]
    held_out = result["eval"][0]
    if not (out / "config.json").is_file():
        model = common.load_model(run_dir / "phase2" / "model")
        model.config.scaling_factor = float(held_out["implied_scaling_factor"])
        model.save_pretrained(out)
    params = sum(t.numel() for t in common.load_model(out).parameters())
    info = {"factor": factor, "latent_channels": channels, "parameters": params,
            "scaling_factor": float(held_out["implied_scaling_factor"]),
            **{k: float(held_out[k]) for k in ("psnr", "ssim")}}  # fmt: skip
    return out, info


@torch.no_grad()
def reconstruct(ae_dir: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    model = common.load_model(ae_dir)
    out = []
    for i in range(0, len(images), 32):
        x = torch.from_numpy(np.stack(images[i : i + 32])).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = model.decode(model.encode(x)).clamp(-1, 1)
        out += list(((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return out


def train_t2i(p: Protocol, b: Budget, cache: Path, run_dir: Path, patch: int, seed: int) -> dict:
    """`dcae t2i train` on the cache: flow matching, logit-normal times, 10% empty prompts, EMA 0.999."""

    cfg = load_config({
        "data": str(cache), "out_dir": str(run_dir), "seed": seed, "batch_size": b.t2i_batch,
        "max_steps": b.t2i_steps, "mixed_precision": "no", "num_workers": 0, "ema_decay": 0.999,
        "log": {"every": p.steps(25, 1), "tensorboard": False},
        "checkpoint": {"every": p.steps(500, b.t2i_steps), "keep_last": 1},
        "model": {"name": f"SANA-tiny/{patch}", "overrides": NETWORK},
        "diffusion": {"objective": "flow", "t_sampling": "logit_normal", "cond_dropout": 0.1},
        "optim": {"lr": 5e-4, "warmup_steps": p.steps(100, 0)},
        "sample": {"every": 0, "num": 4, "steps": b.sample_steps, "solver": "euler", "cfg_scale": GUIDANCE[-1],
                   "prompts": [c for _, c in shapes.make_set(4, SIZE, 3)]},
    })  # fmt: skip
    return train(cfg)


def sample(run_dir: Path, prompts: Path, b: Budget, guidance: float, seed: int) -> list[np.ndarray]:
    """`dcae t2i sample` (EMA weights, Euler), the pictures read back in prompt order."""

    out = run_dir.parent / f"samples-seed{seed}-cfg{guidance:g}"
    _cli(["t2i", "sample", "--ckpt", str(run_dir), "--prompts", str(prompts), "-o", str(out), "--cfg",
          str(guidance), "--steps", str(b.sample_steps), "--solver", "euler", "--seed", str(seed),
          "--batch-size", "50", "--grid", "0"])  # fmt: skip
    return [load_image_uint8(f) for f in sorted((out / "images").glob("*.png"))]


def throughput(b: Budget) -> dict[str, dict]:
    """The network on each latent (training and guided sampling img/s, `dcae bench diffusion`'s measurement)
    and each autoencoder's decode img/s, settings interleaved over 3 rounds, the median kept."""

    rounds: dict[str, list[dict]] = {}
    overrides = {**NETWORK, "max_tokens": MAX_TOKENS, "caption_channels": 384}
    for _ in range(1 if b is SMOKE else 3):
        for label, (factor, channels, patch) in ARMS.items():
            setting = Setting(common.slug(label), channels, SIZE // factor, patch, SIZE)
            r = bench_one("SANA-tiny", setting, b.t2i_batch, torch.device("cpu"), torch.float32, steps=b.bench_steps,
                          overrides=overrides, sample_steps=b.sample_steps)  # fmt: skip
            r["decode_img_s"] = decode_img_s(partial(_autoencoder, factor, channels), setting, b.t2i_batch,
                                             torch.device("cpu"), torch.float32, 1, b.bench_steps)  # fmt: skip
            rounds.setdefault(label, []).append(r)
    out = {}
    for label, rs in rounds.items():
        out[label] = {**rs[0], **{k: float(np.median([r[k] for r in rs]))
                                  for k in ("train_img_s", "infer_img_s", "sample_img_s", "decode_img_s")}}  # fmt: skip
    return out


def _autoencoder(factor: int, channels: int):
    """The arm's autoencoder architecture, random weights: its decode speed does not depend on them."""

    return DCAE(DCAEConfig.from_dict(common.tiny_model(factor, channels)))


def _coverage(train_dir: Path, prompts: list[str]) -> float:
    """The share of held-out prompts whose scene (in either wording) some training caption describes."""
    seen = {shapes.parse(f.read_text()).canonical() for f in train_dir.glob("*.txt")}
    return float(np.mean([shapes.parse(c).canonical() in seen for c in prompts]))


def _cli(argv: list[str]) -> None:

    if main(argv) != 0:
        raise RuntimeError(f"dcae {' '.join(argv[:2])} failed")


def _loss_curve(run_dir: Path) -> list[dict[str, float]]:

    return [{"step": r["step"], "loss": r["loss"]} for r in read_log(run_dir / "log.csv") if "loss" in r]


# ----------------------------------------------------------------------------- report
def _pictures(p, table, chance, ceilings, losses, samples, test_images, prompts) -> None:
    groups = {f"guidance {g:g}": {label: table[label][g] for label in table} for g in GUIDANCE}
    refs = {"chance": chance, **{f"ceiling {label.split(',')[0]}": c for label, c in ceilings.items()}}
    title = "prompt adherence of generated pictures (bars: mean over seeds, dots: seeds)"
    plots.plot_bars(groups, ASPECT_LABELS, p.out / "adherence.png", title, refs=refs, ylim=(0, 1.02))
    plots.plot_curves(losses, [("loss", "flow-matching loss")], p.out / "loss.png",
                      "training loss (mean ± std over seeds)")  # fmt: skip
    k = min(10, len(prompts))
    rows = [("rendered truth", test_images[:k])]
    for (label, g), images in samples.items():
        marks = ["" if shapes.check(im, c)["all"] else "x" for im, c in zip(images[:k], prompts[:k])]
        rows.append((f"{label}\nguidance {g:g}" + (f"\n(x: {marks.count('x')} wrong)" if "x" in marks else ""),
                     images[:k]))  # fmt: skip
    plots.image_rows(rows, p.out / "samples.png", f"held-out prompts, seed {p.seeds[0]}",
                     column_titles=[c.removeprefix("a ").replace(" a ", "\n") for c in prompts[:k]])  # fmt: skip


def _markdown(b, truth, chance, ceilings, autoencoders, table, speed, coverage) -> str:
    f32, f8 = list(ARMS)
    lines = [
        f"Scenes of two coloured shapes at {SIZE} px ({b.train_images} for training, {b.test_prompts} held-out "
        "prompts); all-MiniLM-L6-v2 token embeddings; the same SANA-style network (4 layers, width 128, "
        f"linear self-attention, cross-attention to the prompt) trained {b.t2i_steps} steps at batch "
        f"{b.t2i_batch} on each autoencoder's latents; Euler, {b.sample_steps} steps. Adherence: the share of "
        "generated pictures in which the checker finds the named colours (and no other), shapes and "
        "arrangement; mean ± sample std over training seeds. The held-out prompts are new pictures' captions, "
        f"but {100 * coverage:.0f}% of them describe a kind of scene (colours, shapes, arrangement) that some "
        f"training caption describes ({shapes.SCENE_KINDS} kinds in all): "
        "this measures whether the text conditioning works, not whether it generalizes to new combinations.",
        "",
        "| | colour | shape | position | all |",
        "|---|---|---|---|---|",
        "| checker on the rendered truth | " + " | ".join(f"{100 * truth[a]:.1f}" for a in shapes.ASPECTS) + " |",
        "| chance (true pictures, wrong captions) | "
        + " | ".join(f"{100 * chance[a]:.1f}" for a in shapes.ASPECTS)
        + " |",
    ]
    for label, c in ceilings.items():
        lines.append(f"| ceiling: {label.split(',')[0]} reconstructions | "
                     + " | ".join(f"{100 * c[a]:.1f}" for a in shapes.ASPECTS) + " |")  # fmt: skip
    for label, by_g in table.items():
        for g, row in by_g.items():
            lines.append(f"| **{label}, guidance {g:g}** | " + " | ".join(pct(row[a]) for a in shapes.ASPECTS) + " |")
    lines += ["", "| | tokens | network img/s, training | sampling | decode | AE held-out PSNR (dB) | AE params |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, s in speed.items():
        ae = autoencoders[label]
        lines.append(f"| {label} | {s['tokens']} | {s['train_img_s']:.1f} | {s['sample_img_s']:.2f} | "
                     f"{s['decode_img_s']:.1f} | {ae['psnr']:.2f} | {ae['parameters']:,} |")  # fmt: skip
    ratio = {k: speed[f32][k] / speed[f8][k] for k in ("train_img_s", "sample_img_s", "decode_img_s")}
    lines += [
        "",
        f"f32 patch 1 against f8 patch 2: {speed[f8]['tokens'] // speed[f32]['tokens']}x fewer tokens, training "
        f"{ratio['train_img_s']:.2f}x, sampling {ratio['sample_img_s']:.2f}x, decoding {ratio['decode_img_s']:.2f}x "
        f"the throughput (fp32, {speed[f32]['threads']} CPU threads, batch {b.t2i_batch}; sampling: "
        f"{b.sample_steps} guided steps).",
    ] + figures("adherence", "samples", "loss")
    return "\n".join(lines)
