"""`dcae experiment adapt`: DC-Gen's post-training move onto a deeper autoencoder, at small scale.

DC-Gen (arXiv 2509.25180) claims that a pretrained text-to-image model moved onto a more deeply compressed latent
space (embedding alignment, then the embedder and head, then LoRA end to end) keeps its quality at a small
fraction of the cost of training on that space from scratch, and samples much faster there. Here, on the rendered
scenes of `dcae experiment t2i` (prompts a program can check, dcae.experiments.shapes), with that experiment's two
autoencoders (f8c4 and DC-AE f32c32, trained on the scenes with the same recipe) and network (SANA-style, 4 layers,
width 128):

1. the teacher: f8 latents, patch 2 (64 tokens), `dcae t2i train`;
2. the adapted student: the teacher moved onto f32 latents, patch 1 (16 tokens), with `dcae t2i adapt`;
3. the same f32 patch-1 network from scratch with the adaptation's compute;
4. and from scratch with the teacher's whole training compute.

Compute is training FLOPs: 3 x the forward FLOPs per image (torch.utils.flop_counter, the patch embedders only for
the alignment stage) x the images trained on. Prompt adherence (the analytic checker) over 3 seeds with guidance,
plus training and sampling throughput of each latent space (`dcae bench`'s measurement).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from dcae.diffusion.bench import Setting, forward_flops
from dcae.diffusion.nets import create_diffusion_model
from dcae.diffusion.t2i.adapt import adapt
from dcae.diffusion.t2i.adapt import load_config as load_adapt_config
from dcae.diffusion.t2i.encoders import all_minilm_l6_v2
from dcae.experiments import common, plots, shapes, t2i
from dcae.experiments.common import Protocol, figures, pct, spread
from dcae.runtime.log import read_log

DEFAULT_SEEDS = 3
OWN_DATA = t2i.OWN_DATA
F32, F8 = list(t2i.ARMS)  # "DC-AE f32c32, patch 1", "f8c4, patch 2"
GUIDANCE = 4.0
ARMS = ("teacher: f8c4, patch 2", "adapted student: f32c32, patch 1", "f32 from scratch, the adaptation's compute",
        "f32 from scratch, the teacher's compute")  # fmt: skip


@dataclass(frozen=True)
class Budget:
    train_images: int
    test_prompts: int
    ae_steps: int  # the f8 autoencoder: 64 px crops, batch 16
    ae_steps_full: int  # then whole scenes, batch 8
    deep_ae_steps: int  # the f32 one (deeper: it needs more steps to reach a usable PSNR)
    deep_ae_steps_full: int
    teacher_steps: int
    batch: int
    align_steps: int
    head_steps: int
    tune_steps: int
    lora_rank: int
    sample_steps: int
    bench_steps: int


FULL = Budget(1500, 60, 300, 60, 1000, 150, 600, 16, 300, 150, 150, 16, 10, 3)
SMOKE = Budget(24, 4, 2, 2, 2, 2, 4, 4, 2, 2, 2, 2, 2, 1)


def _t2i_budget(b: Budget, steps: int) -> t2i.Budget:
    """The t2i experiment's budget record, for its steps (rendering, autoencoders, `dcae t2i train`)."""
    return t2i.Budget(b.train_images, b.test_prompts, b.ae_steps, b.ae_steps_full, steps, b.batch, b.sample_steps,
                      b.bench_steps)  # fmt: skip


def network_flops() -> dict[str, float]:
    """Forward FLOPs per 128 px image of the network on each latent, and of each patch embedder alone."""
    out = {}
    overrides = {**t2i.NETWORK, "max_tokens": t2i.MAX_TOKENS, "caption_channels": 384}
    for label, (factor, channels, patch) in t2i.ARMS.items():
        setting = Setting(common.slug(label), channels, t2i.SIZE // factor, patch, t2i.SIZE)
        model = create_diffusion_model(f"SANA-tiny/{patch}", channels, setting.size, **overrides)
        out[label] = forward_flops(model, setting, torch.device("cpu"))
        out[f"{label} embedder"] = 2.0 * model.patch_embed.proj.weight.numel() * setting.tokens
    return out


def plan(b: Budget, flops: dict[str, float]) -> dict[str, Any]:
    """Training FLOPs of the teacher and the adaptation, and the f32 steps that spend each."""
    per_step_f8, per_step_f32 = 3 * flops[F8] * b.batch, 3 * flops[F32] * b.batch
    teacher = b.teacher_steps * per_step_f8
    align = b.align_steps * b.batch * 3 * (flops[f"{F32} embedder"] + flops[f"{F8} embedder"] / 3)  # teacher: fwd
    adaptation = align + (b.head_steps + b.tune_steps) * per_step_f32
    return {"teacher_flops": teacher, "adaptation_flops": adaptation, "align_flops": align,
            "same_compute_steps": max(1, round(adaptation / per_step_f32)),
            "teacher_compute_steps": max(1, round(teacher / per_step_f32))}  # fmt: skip


def run(p: Protocol) -> dict[str, Any]:
    b = SMOKE if p.smoke else FULL
    tb = _t2i_budget(b, b.teacher_steps)
    speed = t2i.throughput(t2i.SMOKE if p.smoke else tb)  # first: the rest of the run cannot disturb the timing
    flops = network_flops()
    budget = plan(b, flops)
    train_dir, test = t2i.render_data(p.out / "data", tb)
    test_images, prompts = [t[0] for t in test], [t[1] for t in test]
    prompts_file = p.out / "data" / "test_prompts.txt"
    chance, truth = shapes.chance(test_images, prompts), shapes.adherence(test_images, prompts)

    caches, ae_info = {}, {}
    text_encoder = str(all_minilm_l6_v2())
    for label, (factor, channels, patch) in t2i.ARMS.items():
        ae_budget = tb if label == F8 else replace(tb, ae_steps=b.deep_ae_steps, ae_steps_full=b.deep_ae_steps_full)
        ae_dir, ae_info[label] = t2i.train_autoencoder(p, ae_budget, label, factor, channels, train_dir)
        caches[label] = p.run_dir(common.slug(label), "cache")
        t2i._cli(["t2i", "cache", "--data", str(train_dir), "--model", str(ae_dir), "--text-encoder", text_encoder,
                  "-o", str(caches[label]), "--resolution", str(t2i.SIZE), "--patch-size", str(patch),
                  "--max-tokens", str(t2i.MAX_TOKENS), "--batch-size", "32"])  # fmt: skip

    adherence: dict[str, list[dict]] = {a: [] for a in ARMS}
    seconds: dict[str, list[float]] = {a: [] for a in ARMS}
    losses: dict[str, list] = {}
    samples = {}
    teacher_arm, student_arm, same_arm, full_arm = ARMS
    for seed in p.seeds:
        runs = {
            teacher_arm: (caches[F8], 2, b.teacher_steps),
            same_arm: (caches[F32], 1, budget["same_compute_steps"]),
            full_arm: (caches[F32], 1, budget["teacher_compute_steps"]),
        }
        sampled = {}
        for arm, (cache, patch, steps) in runs.items():
            run_dir = p.run_dir(common.slug(arm), f"t2i-seed{seed}")
            t2i.train_t2i(p, _t2i_budget(b, steps), cache, run_dir, patch, seed)
            seconds[arm].append(_train_seconds(run_dir))
            losses.setdefault(arm, []).append(t2i._loss_curve(run_dir))
            sampled[arm] = run_dir
        adapt_dir = p.run_dir(common.slug(student_arm), f"seed{seed}")
        cfg = load_adapt_config({
            "teacher": str(sampled[teacher_arm]), "teacher_data": str(caches[F8]), "data": str(caches[F32]),
            "out_dir": str(adapt_dir), "patch_size": 1, "seed": seed, "batch_size": b.batch,
            "log_every": p.steps(25, 1), "checkpoint_every": p.steps(500, 1),
            "align": {"steps": b.align_steps, "lr": 1e-3}, "head": {"steps": b.head_steps, "lr": 5e-4},
            "tune": {"steps": b.tune_steps, "lr": 5e-4}, "lora": {"rank": b.lora_rank},
            "sample": {"every": 0, "num": 4, "steps": b.sample_steps, "solver": "euler", "cfg_scale": GUIDANCE,
                       "prompts": [c for _, c in shapes.make_set(4, t2i.SIZE, 3)]},
        })  # fmt: skip
        adapt(cfg, progress=False)
        seconds[student_arm].append(sum(_train_seconds(adapt_dir / s) for s in ("align", "head", "lora")))
        sampled[student_arm] = adapt_dir / "final"
        for stage in ("head", "lora"):
            losses.setdefault(f"adapted student ({stage} stage)", []).append(t2i._loss_curve(adapt_dir / stage))
        for arm in ARMS:
            images = t2i.sample(sampled[arm], prompts_file, _t2i_budget(b, 1), GUIDANCE, seed)
            adherence[arm].append(shapes.adherence(images, prompts))
            if seed == p.seeds[0]:
                samples[arm] = images
    table = {a: {k: spread([r[k] for r in rows]) for k in shapes.ASPECTS} for a, rows in adherence.items()}
    compute = {teacher_arm: budget["teacher_flops"], student_arm: budget["adaptation_flops"],
               same_arm: budget["same_compute_steps"] * 3 * flops[F32] * b.batch,
               full_arm: budget["teacher_compute_steps"] * 3 * flops[F32] * b.batch}  # fmt: skip
    results = {
        "resolution": t2i.SIZE, "budget": asdict(b), "network": t2i.NETWORK, "guidance": GUIDANCE,
        "text_encoder": "sentence-transformers/all-MiniLM-L6-v2", "checker_on_truth": truth, "chance": chance,
        "autoencoders": ae_info, "forward_flops_per_image": flops, "plan": budget,
        "training_flops": compute, "training_seconds": {a: spread(v) for a, v in seconds.items()},
        "adherence": table, "throughput": speed, "loss_curves": losses,
    }  # fmt: skip
    _pictures(p, table, chance, losses, samples, test_images, prompts)
    markdown = _markdown(b, budget, truth, chance, table, compute, seconds, speed, ae_info)
    common.write_report(p, "DC-Gen at small scale: moving a text-to-image model onto a deeper autoencoder", markdown,
                        results)  # fmt: skip
    return results


def _train_seconds(run_dir) -> float:
    """The training loop's time of a run: elapsed_s of its last log row (the log of a run picked up after a kill
    restarts its clock, so that run counts only its last part)."""
    rows = [r for r in read_log(run_dir / "log.csv") if "elapsed_s" in r]
    return float(rows[-1]["elapsed_s"]) if rows else math.nan


def _pictures(p, table, chance, losses, samples, test_images, prompts) -> None:
    labels = [(a, f"{a} (share of pictures)") for a in shapes.ASPECTS]
    plots.plot_bars({f"guidance {GUIDANCE:g}": table}, labels, p.out / "adherence.png",
                    "prompt adherence (bars: mean over seeds, dots: seeds)", refs={"chance": chance},
                    ylim=(0, 1.02))  # fmt: skip
    plots.plot_curves({k: v for k, v in losses.items() if all(v)}, [("loss", "flow-matching loss")],
                      p.out / "loss.png", "training loss (mean ± std over seeds)")  # fmt: skip
    k = min(10, len(prompts))
    rows = [("rendered truth", test_images[:k])]
    for arm, images in samples.items():
        wrong = sum(not shapes.check(im, c)["all"] for im, c in zip(images[:k], prompts[:k]))
        rows.append((arm.replace(": ", ":\n").replace(", the", ",\nthe") + f"\n({wrong} wrong)", images[:k]))
    plots.image_rows(rows, p.out / "samples.png", f"held-out prompts, seed {p.seeds[0]}, guidance {GUIDANCE:g}",
                     column_titles=[c.removeprefix("a ").replace(" a ", "\n") for c in prompts[:k]])  # fmt: skip


def _markdown(b, budget, truth, chance, table, compute, seconds, speed, ae_info) -> str:
    teacher_arm, student_arm, same_arm, full_arm = ARMS
    steps = {teacher_arm: f"{b.teacher_steps}",
             student_arm: f"{b.align_steps} align + {b.head_steps} head + {b.tune_steps} LoRA (rank {b.lora_rank})",
             same_arm: str(budget["same_compute_steps"]), full_arm: str(budget["teacher_compute_steps"])}  # fmt: skip
    tokens = {teacher_arm: speed[F8]["tokens"], student_arm: speed[F32]["tokens"], same_arm: speed[F32]["tokens"],
              full_arm: speed[F32]["tokens"]}  # fmt: skip
    lines = [
        f"Scenes of two coloured shapes at {t2i.SIZE} px ({b.train_images} for training, {b.test_prompts} held-out "
        f"prompts), all-MiniLM-L6-v2 token embeddings, SANA-style network (4 layers, width 128), batch {b.batch}, "
        f"Euler {b.sample_steps} steps, guidance {GUIDANCE:g}; mean ± sample std over seeds. Autoencoders trained "
        f"on the scenes (f8c4: {b.ae_steps} crop + {b.ae_steps_full} whole-scene steps, held-out PSNR "
        f"{ae_info[F8]['psnr']:.2f} dB; DC-AE f32c32: {b.deep_ae_steps} + {b.deep_ae_steps_full}, "
        f"{ae_info[F32]['psnr']:.2f} dB). The adapted student starts from the same seed's teacher; "
        "its compute counts the adaptation only (the teacher's training is already paid).",
        "",
        "| | tokens | training steps | training TFLOPs (vs teacher) | training loop s (1 CPU thread) | colour | "
        "shape | position | all |",
        "|---|---|---|---|---|---|---|---|---|",
        "| checker on the rendered truth | | | | | " + " | ".join(f"{100 * truth[a]:.1f}" for a in shapes.ASPECTS)
        + " |",
        "| chance (true pictures, wrong captions) | | | | | "
        + " | ".join(f"{100 * chance[a]:.1f}" for a in shapes.ASPECTS) + " |",
    ]  # fmt: skip
    for arm in ARMS:
        lines.append(
            f"| **{arm}** | {tokens[arm]} | {steps[arm]} | {compute[arm] / 1e12:.2f} "
            f"({compute[arm] / compute[teacher_arm]:.2f}x) | {np.mean(seconds[arm]):.0f} | "
            + " | ".join(pct(table[arm][a]) for a in shapes.ASPECTS) + " |"
        )  # fmt: skip
    f8, f32 = speed[F8], speed[F32]
    lines += [
        "",
        f"Throughput of the network (fp32, {f32['threads']} CPU thread(s), batch {b.batch}): f8 patch 2 trains "
        f"{f8['train_img_s']:.0f} img/s and samples {f8['sample_img_s']:.1f} img/s ({b.sample_steps} guided steps); "
        f"f32 patch 1 {f32['train_img_s']:.0f} and {f32['sample_img_s']:.1f}: the adapted student samples "
        f"{f32['sample_img_s'] / f8['sample_img_s']:.2f}x as fast as its teacher "
        f"({f8['tokens'] // f32['tokens']}x fewer tokens).",
    ] + figures("adherence", "samples", "loss")
    return "\n".join(lines)
