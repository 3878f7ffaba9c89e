"""`dcae experiment decoder`: smaller decoders for a frozen encoder, speed against quality.

DC-AE-Lite keeps SANA's encoder and trains a smaller decoder (1.8x faster decoding), so diffusion models
trained on the old latents keep working. Here: a teacher (the ~1M-parameter f32 model, phase 1 at 64 px)
is trained, then students of decreasing size are trained with the decoder recipe (`dcae train decoder_*`:
the teacher's encoder copied and frozen, only `decoder.*` trains; same steps, data and learning rate as
the teacher), including the teacher's own decoder architecture retrained (the control: the cost of
retraining a decoder alone). Each is measured by
  - decode throughput against the teacher in one `dcae bench ae` run (fp32, this machine's CPU),
  - held-out PSNR / SSIM / LPIPS at 64 and 128 px, relative to the teacher,
  - the check that its encoder tensors equal the teacher's bit for bit, and that the teacher's latents
    decode with it without re-encoding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import torch

from dcae.data.images import center_crop_arr, uint8_to_tensor
from dcae.experiments import common, plots
from dcae.experiments.common import Protocol, figures, pm, spread

DEFAULT_SEEDS = 1  # five trainings per seed: one seed fits the ~15 min budget (--seeds N for more)
RESOLUTION = 64
EVAL = [64, 128]
BENCH = {"res": 256, "batch": 4}
_RES = "ResBlock"
STUDENTS = {  # name -> decoder fields (the teacher: widths 16-32-32-64-64-64, ResBlock x3 + EViTGLU x3)
    "same decoder, retrained": {},
    "Lite-style (no attention)": {"decoder_block_types": [_RES] * 6, "decoder_norms": ["bn2d"] * 3 + ["trms2d"] * 3},
    "half width": {"decoder_widths": [8, 16, 16, 32, 32, 32]},
    "tiny preview": {
        "decoder_widths": [8, 8, 16, 16, 32, 32],
        "decoder_depths": [0, 0, 1, 1, 1, 1],
        "decoder_block_types": [_RES] * 6,
        "decoder_norms": "trms2d",
        "decoder_acts": "silu",
    },
}
PHASE2 = {"trainable": {"decoder_in": "decoder.project_in.*"}}  # not run; the recipe refuses encoder patterns
METRICS = [("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", f"LPIPS ({common.LPIPS_NET})")]


def run(p: Protocol) -> dict[str, Any]:
    steps = p.steps(400)
    quality: dict[str, list[list[dict]]] = {}
    models: dict[str, str] = {}
    for seed in p.seeds:
        teacher_run = p.run_dir("teacher", f"seed{seed}")
        ph = common.phase1(p, steps, RESOLUTION)
        cfg = common.train_config(p, teacher_run, seed, common.tiny_model(), {1: ph}, val_resolutions=EVAL)
        quality.setdefault("teacher", []).append(common.run_arm(cfg, [1])[1]["eval"])
        teacher = str(teacher_run / "phase1" / "model")
        models["teacher"] = teacher
        for name, fields in _students(p).items():
            run_dir = p.run_dir(common.slug(name).lower(), f"seed{seed}")
            ph = common.phase1(p, steps, RESOLUTION, trainable={"decoder": "decoder.*"})
            student = {"name": common.slug(name).lower(), **fields}
            cfg = common.train_config(
                p, run_dir, seed, None, {1: ph, 2: PHASE2}, val_resolutions=EVAL, decoder={"student": student},
                val_at_start=False,
            )  # fmt: skip
            quality.setdefault(name, []).append(common.run_arm(cfg, [1], init=teacher)[1]["eval"])
            models[name] = str(run_dir / "phase1" / "model")

    table = {m: {r: {k: spread([e[i][k] for e in runs]) for k, _ in METRICS} for i, r in enumerate(EVAL)}
             for m, runs in quality.items()}  # fmt: skip
    checks = {name: latent_checks(models["teacher"], models[name], p) for name in _students(p)}
    speed = bench_decode(p, models)
    params = {m: _decoder_parameters(path) for m, path in models.items()}
    out = p.out
    _plot_tradeoff(table, speed, params, out / "tradeoff.png")
    images = common.held_out_images(p)[:8]
    rows = [(m, common.load_model(path)) for m, path in models.items()]
    plots.recon_grid(rows, images, 128, out / "reconstructions.png", f"held out, 128 px, seed {p.seeds[-1]}")
    results = {"steps": steps, "resolution": RESOLUTION, "students": STUDENTS, "quality": table, "decode": speed,
               "decoder_parameters": params, "encoder_checks": checks, "bench": BENCH}  # fmt: skip
    common.write_report(p, "New decoders for a frozen encoder", _markdown(table, speed, params, checks, steps), results)
    return results


def _students(p: Protocol) -> dict[str, dict]:
    """All students; a smoke run trains the smallest only."""
    return {"tiny preview": STUDENTS["tiny preview"]} if p.smoke else STUDENTS


def _decoder_parameters(path: str) -> int:
    return sum(t.numel() for t in common.load_model(path).decoder.parameters())


@torch.no_grad()
def latent_checks(teacher_path: str, student_path: str, p: Protocol) -> dict[str, Any]:
    """Encoder tensors equal bit for bit; the teacher's latents of held-out images decode with the
    student exactly as the student's own encode-decode does (no re-encoding needed)."""

    teacher, student = common.load_model(teacher_path), common.load_model(student_path)
    t_sd, s_sd = teacher.encoder.state_dict(), student.encoder.state_dict()
    identical = t_sd.keys() == s_sd.keys() and all(torch.equal(t_sd[k], s_sd[k]) for k in t_sd)
    x = torch.stack([uint8_to_tensor(center_crop_arr(a, 64)) for a in common.held_out_images(p)[:4]])
    z = teacher.encode(x)
    same = torch.equal(student.decode(z), student.decode(student.encode(x)))
    return {
        "encoder_tensors_identical": bool(identical),
        "teacher_latents_decode_like_own": bool(same),
        "scaling_factor": [teacher.config.scaling_factor, student.config.scaling_factor],
    }


def bench_decode(p: Protocol, models: dict[str, str]) -> dict[str, dict]:
    """Decode img/s of every model in one `dcae bench ae` run (interleaved timing), relative to the teacher."""
    res, batch = (64, 1) if p.smoke else (BENCH["res"], BENCH["batch"])
    path = p.out / "bench_decode.json"
    names = list(models.values())
    cmd = [
        sys.executable,
        "-m",
        "dcae.cli",
        "bench",
        "ae",
        "--models",
        *names,
        "--res",
        str(res),
        "--batch",
        str(batch),
        "--impls",
        "dcae",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--no-memory",
        "--json",
        str(path),
    ]
    cmd += ["--repeats", "1"] if p.smoke else []  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    records = {r["model"]: r for r in json.loads(path.read_text())}
    base = records[models["teacher"]]["dec_img_s"]
    return {
        m: {"dec_img_s": records[path_]["dec_img_s"], "speedup": records[path_]["dec_img_s"] / base,
            "res": res, "batch": batch}
        for m, path_ in models.items()
    }  # fmt: skip


def _plot_tradeoff(table: dict, speed: dict, params: dict, path) -> None:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "psnr", "held-out PSNR at 128 px (dB)"),
        (axes[1], "lpips", "held-out LPIPS at 128 px"),
    ):
        for m in table:
            s = table[m][128][key]
            x = speed[m]["speedup"]
            ax.errorbar([x], [s["mean"]], yerr=[0 if s["std"] != s["std"] else s["std"]], fmt="o", capsize=3)
            ax.annotate(f"{m}\n{params[m] / 1e3:.0f}k dec. params", (x, s["mean"]), fontsize=7,
                        textcoords="offset points", xytext=(5, 5))  # fmt: skip
        ax.set_xlabel(f"decode speed relative to the teacher ({speed['teacher']['res']} px, CPU fp32)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle("student decoders: speed vs quality (teacher = 1.0)")
    plots.save(fig, path)


def _markdown(table: dict, speed: dict, params: dict, checks: dict, steps: int) -> str:
    t = table["teacher"]
    b = speed["teacher"]
    lines = [
        f"Teacher: phase 1, {steps} steps at {RESOLUTION} px. Students: the same steps, data and learning rate, "
        f"decoder only, teacher encoder frozen. Decode: `dcae bench ae` at {b['res']} px, batch {b['batch']}, fp32 "
        "CPU, all models in one run. Quality: held out, mean ± sample std over seeds; Δ = student − teacher.",
        "",
        "| decoder | decoder params | decode img/s | speedup | PSNR 64 px | Δ | PSNR 128 px | Δ | SSIM 128 | "
        "LPIPS 128 | Δ LPIPS 128 | encoder identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, by_res in table.items():
        q64, q128 = by_res[64], by_res[128]
        d64 = q64["psnr"]["mean"] - t[64]["psnr"]["mean"]
        d128 = q128["psnr"]["mean"] - t[128]["psnr"]["mean"]
        dl = q128["lpips"]["mean"] - t[128]["lpips"]["mean"]
        same = "(teacher)" if m == "teacher" else ("yes" if checks[m]["encoder_tensors_identical"] else "**no**")
        lines.append(
            f"| {m} | {params[m]:,} | {speed[m]['dec_img_s']:.2f} | {speed[m]['speedup']:.2f}x | {pm(q64['psnr'])} | "
            f"{d64:+.2f} | {pm(q128['psnr'])} | {d128:+.2f} | {pm(q128['ssim'], 3)} | {pm(q128['lpips'], 3)} | "
            f"{dl:+.3f} | {same} |"
        )
    lines += figures("tradeoff", "reconstructions")
    return "\n".join(lines)
