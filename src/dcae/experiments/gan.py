"""`dcae experiment gan`: phase 3 (low-resolution head refinement) with and without the GAN loss.

The paper's ablation (ImageNet 512, rFID): no GAN 3.82, GAN on the full model 0.82, GAN on the decoder
head only 0.69: the GAN adds realism (rFID), and restricting it to the head keeps the latent space and
the rest of the decoder fixed.

Here, per seed: phase 1 (64 px) and phase 2 (latent layers at 128 px) give the starting model; from it,
the same steps at 64 px of
  - head only + GAN (the paper's phase 3),
  - head only, no GAN (L1 + LPIPS alone: the control for "more steps"),
  - every layer + GAN,
evaluated on the held-out images at 64 px: PSNR, SSIM, LPIPS, FID against the originals (100 images:
biased upwards, comparable between arms only) and a sharpness ratio (variance of the Laplacian,
reconstruction over original: 1 = as much fine detail as the original, < 1 = blurrier).

The GAN settings are tuned for this scale (see docs/training.md, "Tuning phase 3"): a full 3-layer,
64-channel PatchGAN tells real from reconstructed 64 px crops apart within tens of steps and then gives
the few-thousand-parameter head no useful signal, so the discriminator here is 2 layers of 16 channels
with a tenth of the generator's learning rate, starts after 20 steps, and the GAN term ramps up over 50.
"""

from __future__ import annotations

import warnings
from typing import Any

from dcae.experiments import common, plots
from dcae.experiments.common import Protocol, figures, pm, spread
from dcae.metrics.fid import FewImagesWarning, InceptionFeatures
from dcae.runtime.log import read_log

RESOLUTION = 64
HEAD = {"decoder_head": "decoder.project_out.*"}
LR = 5.4e-4
GAN = {"gan_weight": 0.5, "disc_start": 20, "gan_warmup": 50}
DISC = {"channels": 16, "layers": 2, "lr": LR / 10}
ARMS = {  # name -> (trainable, GAN on)
    "head + GAN (paper)": (HEAD, True),
    "head, no GAN": (HEAD, False),
    "all layers + GAN": ({"all": "*"}, True),
}
METRICS = [
    ("psnr", "PSNR (dB)"),
    ("ssim", "SSIM"),
    ("lpips", f"LPIPS ({common.LPIPS_NET})"),
    ("fid", "FID vs originals"),
    ("sharpness", "sharpness (1 = original)"),
]


def run(p: Protocol) -> dict[str, Any]:

    steps = p.steps(100, 2)
    batch = 2 if p.smoke else 8
    ph1 = common.phase1(p, p.steps(300), RESOLUTION)
    ph2 = common.phase(2 * RESOLUTION, batch // 2, p.steps(40, 2), 2.5e-4, optim={"weight_decay": 1e-3})
    images = common.held_out_images(p)
    lpips, inception = common.load_lpips(), InceptionFeatures()
    finals: dict[str, list[dict]] = {}
    logs: dict[str, list[list[dict]]] = {}
    for seed in p.seeds:
        base = p.run_dir("base", f"seed{seed}")
        common.run_arm(common.train_config(p, base, seed, common.tiny_model(), {1: ph1, 2: ph2}), [1, 2])
        start = str(base / "phase2" / "model")
        finals.setdefault("start (phase 2 result)", []).append(_eval(start, images, lpips, inception))
        for arm, (trainable, gan) in ARMS.items():
            run_dir = p.run_dir(common.arm_slug(arm), f"seed{seed}")
            # phase 3's default loss has a GAN (gan_weight 0.5): the control must switch it off explicitly
            loss = (GAN | ({"disc_start": 0, "gan_warmup": 1} if p.smoke else {})) if gan else {"gan_weight": 0.0}
            ph3 = common.phase(
                RESOLUTION, batch, steps, LR, trainable=trainable, optim={"weight_decay": 1e-3, "betas": [0.5, 0.9]},
                loss=dict(loss), disc=DISC,
            )  # fmt: skip
            cfg = common.train_config(p, run_dir, seed, None, {3: ph3}, val_at_start=False)
            common.run_arm(cfg, [3], init=start)
            finals.setdefault(arm, []).append(_eval(str(run_dir / "phase3" / "model"), images, lpips, inception))
            logs.setdefault(arm, []).append(_monitor_rows(run_dir))

    table = {arm: {k: spread([r[k] for r in rows]) for k, _ in METRICS} for arm, rows in finals.items()}
    out = p.out
    plots.plot_bars({"held out": table}, METRICS, out / "final.png", "phase 3 arms from the same phase-2 model")
    _plot_training(logs, out / "training.png")
    last = p.seeds[-1]
    rows = [("start", common.load_model(p.run_dir("base", f"seed{last}", "phase2", "model")))]
    rows += [
        (arm, common.load_model(p.run_dir(common.arm_slug(arm), f"seed{last}", "phase3", "model"))) for arm in ARMS
    ]
    plots.recon_grid(
        rows, images[:8], RESOLUTION, out / "reconstructions.png", f"held out, {RESOLUTION} px, seed {last}"
    )
    results = {"resolution": RESOLUTION, "steps": steps, "phase1": ph1, "phase2": ph2, "gan": GAN, "disc": DISC,
               "final": table, "per_seed": finals}  # fmt: skip
    common.write_report(p, "Phase 3: head-only GAN refinement", _markdown(table, steps), results)
    return results


def _eval(path: str, images, lpips, inception) -> dict[str, Any]:

    with warnings.catch_warnings():  # the report says it: FID of a small set, compared between arms only
        warnings.simplefilter("ignore", FewImagesWarning)
        return common.evaluate(common.load_model(path), images, RESOLUTION, lpips=lpips, inception=inception)


def _monitor_rows(run_dir) -> list[dict]:

    return read_log(run_dir / "phase3" / "log.csv")


def _plot_training(logs: dict[str, list[list[dict]]], path) -> None:
    """The balance of the GAN: discriminator hinge loss (1 = chance, 0 = it always wins) and logits."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for arm, runs in logs.items():
        if not any("d_loss" in r for r in runs[0]):
            continue
        for i, rows in enumerate(runs):
            for ax, key in zip(axes, ("d_loss", "logits_real", "logits_fake")):
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(*zip(*pts), color="C0" if arm.startswith("head") else "C2", alpha=0.7,
                            label=arm if i == 0 else None)  # fmt: skip
    for ax, title in zip(axes, ("discriminator hinge loss", "D logits on originals", "D logits on reconstructions")):
        ax.set_title(title)
        ax.set_xlabel("phase-3 step")
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="gray", ls="--", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle("GAN balance during phase 3 (one line per seed)")
    plots.save(fig, path)


def _markdown(table: dict, steps: int) -> str:
    lines = [
        f"From the same phase-2 model, {steps} steps at {RESOLUTION} px (AdamW lr {LR}, betas (0.5, 0.9)); GAN: "
        f"hinge PatchGAN {DISC['layers']} layers x {DISC['channels']} channels, lr {DISC['lr']:.1e}, gan_weight "
        f"{GAN['gan_weight']} (adaptive), disc_start {GAN['disc_start']}, gan_warmup {GAN['gan_warmup']}. Held-out "
        "metrics, mean ± sample std over seeds (FID of the held-out set: a small set, biased upwards, comparable "
        "between rows only).",
        "",
        "| model | PSNR (dB) | SSIM | LPIPS | FID | sharpness |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in table.items():
        lines.append(
            f"| {arm} | {pm(r['psnr'])} | {pm(r['ssim'], 3)} | {pm(r['lpips'], 3)} | {pm(r['fid'], 1)} | "
            f"{pm(r['sharpness'], 3)} |"
        )
    lines += figures("final", "training", "reconstructions")
    return "\n".join(lines)
