"""`dcae experiment adaptation`: decoupled high-resolution adaptation against its two controls.

The paper (Sec. 3.3): a model trained at low resolution generalizes badly to high resolution (f64 rFID
7.40 at 1024 px); adapting only the layers next to the latent at the high resolution fixes it (0.20), at a
fraction of full fine-tuning's memory (68 GB against 154 GB at 1024 px, batch 12).

Here, per seed: phase 1 (all layers) at LOW px, evaluated at 1x, 2x and 4x LOW; then from that model,
the same number of steps of
  - phase 2: the latent-adjacent layers (encoder.project_out, decoder.project_in) at HIGH = 2x LOW px,
  - control 1: the same layers at LOW px (same steps, batch, learning rate),
  - control 2: every layer at HIGH px (full fine-tuning),
each evaluated at the three resolutions, with the training memory and step time of each arm measured at
2x and 4x LOW (one step, same batch).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dcae.experiments import common, plots
from dcae.experiments.common import Protocol, figures, pm, spread
from dcae.models import DCAE
from dcae.models.memory import TensorMemoryTracker
from dcae.train import params
from dcae.train.config import LossConfig
from dcae.train.losses import AutoencoderLoss

LOW = 64
HIGH = 2 * LOW
EVAL = [LOW, 2 * LOW, 4 * LOW]
LATENT_LAYERS = {"encoder_out": "encoder.project_out.*", "decoder_in": "decoder.project_in.*"}
ARMS = {  # name -> (trainable patterns, training resolution)
    "phase 2 (latent layers, high res)": (LATENT_LAYERS, HIGH),
    "control: latent layers, low res": (LATENT_LAYERS, LOW),
    "control: full fine-tuning, high res": ({"all": "*"}, HIGH),
}
METRICS = [("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", f"LPIPS ({common.LPIPS_NET})")]


def run(p: Protocol) -> dict[str, Any]:
    steps1, steps2 = p.steps(300), p.steps(120, 2)
    batch2 = 2 if p.smoke else 4
    model = common.tiny_model(32, 32)
    ph1 = common.phase1(p, steps1, LOW)
    evals: dict[str, list[list[dict]]] = {}
    for seed in p.seeds:
        base = p.run_dir("phase1", f"seed{seed}")
        cfg = common.train_config(p, base, seed, model, {1: ph1}, val_resolutions=EVAL)
        evals.setdefault("phase 1 only (no adaptation)", []).append(common.run_arm(cfg, [1])[1]["eval"])
        for arm, (patterns, res) in ARMS.items():
            ph2 = common.phase(res, batch2, steps2, 2.5e-4, trainable=patterns, optim={"weight_decay": 1e-3})
            cfg = common.train_config(
                p,
                p.run_dir(common.arm_slug(arm), f"seed{seed}"),
                seed,
                None,
                {2: ph2},
                val_resolutions=EVAL,
                val_at_start=False,
            )
            evals.setdefault(arm, []).append(common.run_arm(cfg, [2], init=str(base / "phase1" / "model"))[2]["eval"])

    table = {
        arm: {r: {k: spread([e[i][k] for e in runs]) for k, _ in METRICS} for i, r in enumerate(EVAL)}
        for arm, runs in evals.items()
    }
    cost = measure_cost(p, [LOW, HIGH] if p.smoke else [HIGH, 2 * HIGH], batch2, rounds=1 if p.smoke else 5)

    out = p.out
    groups = {f"{r} px": {arm: table[arm][r] for arm in table} for r in EVAL}
    plots.plot_bars(
        groups,
        METRICS,
        out / "quality.png",
        f"held-out quality by evaluation resolution (phase 1 at {LOW} px; bars: mean, dots: seeds)",
    )
    _plot_cost(cost, out / "cost.png", batch2)
    images = common.held_out_images(p)[:6]
    rows = [("phase 1 only", common.load_model(base / "phase1" / "model"))]
    rows += [
        (
            arm.split(" (")[0].replace("control: ", ""),
            common.load_model(p.run_dir(common.arm_slug(arm), f"seed{p.seeds[-1]}", "phase2", "model")),
        )
        for arm in ARMS
    ]
    plots.recon_grid(
        rows,
        images,
        2 * HIGH,
        out / "reconstructions.png",
        f"held-out reconstructions at {2 * HIGH} px (4x the phase-1 resolution), seed {p.seeds[-1]}",
    )
    results = {
        "low": LOW,
        "high": HIGH,
        "eval_resolutions": EVAL,
        "phase1": ph1,
        "phase2_steps": steps2,
        "phase2_batch": batch2,
        "quality": table,
        "cost": cost,
    }
    common.write_report(
        p, "Decoupled high-resolution adaptation", _markdown(table, cost, steps1, steps2, batch2), results
    )
    return results


def measure_cost(p: Protocol, resolutions: list[int], batch: int, rounds: int) -> dict[str, dict[int, dict]]:
    """Training memory and step time of each arm at each resolution. The arms take turns step by step
    (`rounds` timed steps each, median), so a load spike on a shared machine hits all of them alike."""
    cost: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    for r in resolutions:
        steps = {arm: _training_step(p, patterns, r, batch) for arm, (patterns, _) in ARMS.items()}
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for _ in range(rounds):
            for arm, (step, _) in steps.items():
                t0 = time.perf_counter()
                step()
                times[arm].append(time.perf_counter() - t0)
        for arm, (_, info) in steps.items():
            cost[arm][r] = {**info, "step_s": sorted(times[arm])[len(times[arm]) // 2]}
    return cost


def _training_step(p: Protocol, patterns: dict[str, str], resolution: int, batch: int):
    """(step function, {peak_mib, trainable_parameters}) for the phase-1 model with `patterns` trainable:
    forward, L1 + LPIPS, backward, AdamW. Memory: the model's weights and buffers + the peak of the tensors
    the first step allocates (activations kept for backward, gradients, AdamW state, the LPIPS network's
    activations; not its weights). The step is run once here, so later calls are warm."""

    model = DCAE.from_pretrained(p.run_dir("phase1", f"seed{p.seeds[0]}", "phase1", "model"))
    params.apply_trainable(model, params.select_trainable(model, patterns))
    params.set_train_mode(model)
    trainable = [t for t in model.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-6)
    loss_fn = AutoencoderLoss(
        LossConfig(perceptual_net=common.LPIPS_NET, perceptual_weight=0.25), None, common.load_lpips()
    )
    x = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def step() -> None:
        loss, _ = loss_fn.generator(x, model(x), 0, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with TensorMemoryTracker() as tracker:
        step()
    return step, {
        "peak_mib": (weights + tracker.peak) / 2**20,
        "trainable_parameters": sum(t.numel() for t in trainable),
    }


def _plot_cost(cost: dict, path, batch: int) -> None:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    arms = list(cost)
    resolutions = list(next(iter(cost.values())))
    for ax, key, label in ((axes[0], "peak_mib", "training memory (MiB)"), (axes[1], "step_s", "step time (s)")):
        for i, arm in enumerate(arms):
            xs = [j + (i - 1) * 0.27 for j in range(len(resolutions))]
            ax.bar(xs, [cost[arm][r][key] for r in resolutions], 0.25, label=arm)
        ax.set_xticks(range(len(resolutions)), [f"{r} px, batch {batch}" for r in resolutions])
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle("cost of one training step (CPU)")
    plots.save(fig, path)


def _markdown(table: dict, cost: dict, steps1: int, steps2: int, batch2: int) -> str:
    lines = [
        f"Phase 1: all layers, {steps1} steps at {LOW} px. Then {steps2} steps (batch {batch2}, AdamW lr 2.5e-4) of "
        f"each arm from that model. Held-out PSNR / SSIM / LPIPS, mean ± sample std over seeds.",
        "",
        "| model | " + " | ".join(f"{r} px PSNR | {r} px SSIM | {r} px LPIPS" for r in EVAL) + " |",
        "|---|" + "---|" * (3 * len(EVAL)),
    ]
    for arm, by_res in table.items():
        cells = [f"{pm(by_res[r]['psnr'])} | {pm(by_res[r]['ssim'], 3)} | {pm(by_res[r]['lpips'], 3)}" for r in EVAL]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Cost of one training step (batch {batch2}, CPU):",
        "",
        "| arm | trainable parameters | "
        + " | ".join(f"{r} px memory (MiB) | {r} px step (s)" for r in next(iter(cost.values())))
        + " |",  # noqa: E501
        "|---|---|" + "---|---|" * len(next(iter(cost.values()))),
    ]
    for arm, by_res in cost.items():
        first = next(iter(by_res.values()))
        cells = [f"{c['peak_mib']:.0f} | {c['step_s']:.2f}" for c in by_res.values()]
        lines.append(f"| {arm} | {first['trainable_parameters']:,} | " + " | ".join(cells) + " |")
    lines += figures("quality", "cost", "reconstructions")
    return "\n".join(lines)
