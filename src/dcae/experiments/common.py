"""What every experiment shares: the data protocol, the small models, training one arm, held-out
evaluation, mean and spread over seeds, and the report (Markdown, JSON, PNG).

Protocol (all experiments): `../shared/data/imagenet-samples` (or --data), file names sorted, the first
900 train and the last 100 are held out; held-out images are ADM-center-cropped to the evaluation
resolution (the DC-AE evaluation protocol). `--smoke` runs the same code on scikit-image's bundled photos
with a few steps and two seeds: it checks the pipeline, its numbers mean nothing.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcae.errors import UserError
from dcae.metrics.accumulate import ReconstructionMetrics
from dcae.models import DCAE
from dcae.runtime.log import read_log
from dcae.train import monitor
from dcae.train.config import TrainConfig, load_config
from dcae.train.data import load_val_images, split_items
from dcae.train.losses import build_perceptual
from dcae.train.trainer import train
from dcae.utils.io import atomic_write_json, atomic_write_text

DEFAULT_DATA = "../shared/data/imagenet-samples"
SMOKE_DATA = "skimage:astronaut,chelsea,coffee,rocket,motorcycle_left,camera"
LPIPS_NET = "stlpips-alex"  # the perceptual loss and the held-out LPIPS of every experiment


@dataclass
class Protocol:
    """Data, seeds and output folder of one experiment run."""

    name: str
    out: Path
    data: list[str]
    holdout: int
    seeds: list[int]
    smoke: bool
    command: str
    started: float = field(default_factory=time.time)

    def run_dir(self, *parts: str) -> Path:
        return self.out.joinpath("runs", *parts)

    def steps(self, full: int, smoke: int = 3) -> int:
        return smoke if self.smoke else full


def make_protocol(
    name: str, out: str | Path, data: str | None, smoke: bool, seeds: int | None, own_data: str | None = None
) -> Protocol:
    """own_data: what an experiment that makes its own data calls it (then --data is refused)."""
    if own_data is not None:
        if data is not None:
            raise UserError(f"dcae experiment {name} makes its own data ({own_data}): drop --data")
        data = own_data
    elif data is None:
        data = SMOKE_DATA if smoke else DEFAULT_DATA
    if own_data is None and not data.startswith("skimage:") and not Path(data).is_dir():
        raise UserError(
            f"the experiment's data {data} does not exist (run from the project root beside ../shared, "
            "or pass --data FOLDER: its sorted files, the first 900 train and the last 100 are held out)"
        )
    holdout = 0 if own_data is not None else 2 if data.startswith("skimage:") else 100
    n_seeds = seeds or (1 if smoke else 3)
    cmd = (
        " ".join(["dcae", "experiment", *sys.argv[2:]])
        if sys.argv[1:2] == ["experiment"]
        else f"dcae experiment {name}"
    )
    return Protocol(name, Path(out), [data], holdout, list(range(n_seeds)), smoke, cmd)


# ----------------------------------------------------------------------------- models and configs
def tiny_model(factor: int = 32, latent_channels: int = 32, residual: bool = True) -> dict[str, Any]:
    """The ~1M-parameter DC-AE of the `tiny` config (f32: 6 stages; f64: one more stage, 128 wide; f8: the
    first 4 stages, an SD-VAE-like f8 latent grid).

    residual=False switches every space-to-channel shortcut off (stage and bottleneck): the same layers and
    parameter count, a plain autoencoder."""
    stages = {8: 4, 16: 5, 32: 6, 64: 7, 128: 8}[factor]
    # The bottleneck shortcut averages groups of the last width down to the latent channels: that width
    # must be a multiple of them (f64c128: the innermost stage is 128 wide).
    widths = [16, 32, 32] + [64] * (stages - 4) + [max(64, latent_channels)]
    depths = [0] + [1] * (stages - 1)
    blocks = ["ResBlock"] * 3 + ["EViTGLU"] * (stages - 3)
    cfg = {
        "name": f"tiny-f{factor}c{latent_channels}" + ("" if residual else "-plain"),
        "latent_channels": latent_channels,
        "encoder_widths": widths,
        "encoder_depths": depths,
        "encoder_block_types": blocks,
        "decoder_widths": widths,
        "decoder_depths": depths,
        "decoder_block_types": blocks,
        "decoder_norms": ["bn2d"] * 3 + ["trms2d"] * (stages - 3),
        "decoder_acts": ["relu"] * 3 + ["silu"] * (stages - 3),
    }
    if not residual:
        cfg["residual"] = False
    return cfg


def phase(resolution: int, batch: int, steps: int, lr: float, **extra: Any) -> dict[str, Any]:
    """A phase section: AdamW with `lr`, stlpips-alex weight 0.25 (the `tiny` config's loss)."""
    d: dict[str, Any] = {"resolution": resolution, "batch_size": batch, "steps": steps}
    optim = {"lr": lr, **extra.pop("optim", {})}
    loss = {"perceptual_net": LPIPS_NET, "perceptual_weight": 0.25, **extra.pop("loss", {})}
    d.update(optim=optim, loss=loss, **extra)
    return d


def phase1(p: Protocol, steps: int, resolution: int = 64, **extra: Any) -> dict[str, Any]:
    """The experiments' phase 1: all layers, batch 8 (smoke 2), AdamW lr 1e-3, wd 0.1, 20 warm-up steps,
    cosine (the `tiny` config's recipe)."""
    optim = {"weight_decay": 0.1, "warmup_steps": p.steps(20, 0), "schedule": "cosine"}
    return phase(resolution, 2 if p.smoke else 8, steps, 1e-3, optim=optim, **extra)


def train_config(
    p: Protocol,
    run: Path,
    seed: int,
    model: dict | None,
    phases: dict[int, dict],
    val_every: int = 0,
    val_resolutions: list[int] | None = None,
    val_at_start: bool = True,
    **extra: Any,
) -> TrainConfig:
    """One arm's TrainConfig: the protocol's data split, no EMA (the curves and the result are the same
    weights), checkpoints only at phase ends, held-out LPIPS with the loss network. val_at_start=False: an
    arm that starts from a model already evaluated skips the "before" evaluation."""
    d: dict[str, Any] = {
        "out_dir": str(run),
        "seed": seed,
        "ema_decay": 0.0,
        "num_workers": 1,
        "data": {"train": p.data, "holdout": p.holdout, "scale_range": [1.0, 1.0]},
        "checkpoint": {"every": 10**9, "keep_last": 1},
        "log": {"every": max(1, min(10, val_every or 10)), "image_every": 0, "tensorboard": False},
        "val": {
            "every": val_every,
            "resolutions": val_resolutions or [],
            "lpips": True,
            "grid_images": 4,
            "at_start": val_at_start,
        },
        **extra,
    }
    if model is not None:
        d["model"] = {"config": model}
    for n, ph in phases.items():
        d[f"phase{n}"] = ph
    return load_config(d)


def slug(text: str) -> str:
    """A folder name for an arm's label: every character but letters and digits becomes '_'."""
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def arm_slug(label: str) -> str:
    """The folder of an arm: its label up to a parenthesised note ("head + GAN (paper)" -> head___GAN)."""
    return slug(label.split(" (")[0])


def load_model(path: str | Path):

    return DCAE.from_pretrained(path).eval()


def run_arm(cfg: TrainConfig, phases: list[int], init: str | None = None) -> dict[str, Any]:
    """Train (or pick up where a killed run stopped: completed phases are read back, not retrained)."""

    result = train(cfg, phases=phases, init=init, resume=True)
    return result["phases"]


def val_curve(run: Path, n: int, result: dict[str, Any]) -> list[dict[str, float]]:
    """Held-out metrics over the steps of phase n: before the phase (step 0), the log's evaluations every
    `val.every` steps, and the evaluation at the end (the same weights: no EMA in the experiments)."""

    def point(step: float, m: dict, prefix: str = "") -> dict[str, float]:
        return {"step": step, **{k: m.get(prefix + k, math.nan) for k in ("psnr", "ssim", "lpips")}}

    rows = [point(0, result["start"][0])] if result.get("start") else []
    rows += [point(r["step"], r, "val_") for r in read_log(run / f"phase{n}" / "log.csv") if "val_psnr" in r]
    if not rows or rows[-1]["step"] != result["steps"]:
        rows.append(point(result["steps"], result["eval"][0]))
    return rows


# ----------------------------------------------------------------------------- evaluation
def held_out_images(p: Protocol) -> list[np.ndarray]:

    _, val = split_items(p.data, [], p.holdout)
    images, _ = load_val_images(val, p.holdout)
    return images


def sharpness(ref: torch.Tensor, rec: torch.Tensor) -> list[float]:
    """Per image: variance of the Laplacian of the reconstruction / that of the original (grayscale).
    1 = as much high-frequency detail as the original; blur gives < 1. Images without any detail: skipped."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def lap_var(x: torch.Tensor) -> torch.Tensor:
        gray = (x.double() * weights.double()).sum(1, keepdim=True)
        return torch.nn.functional.conv2d(gray, kernel.double()).flatten(1).var(1)

    a, b = lap_var(ref), lap_var(rec)
    return [float(y / x) for x, y in zip(a, b) if x > 0]


@torch.no_grad()
def evaluate(model, images: list[np.ndarray], resolution: int, lpips=None, inception=None) -> dict[str, Any]:
    """PSNR, SSIM, LPIPS, sharpness ratio (and FID against the originals when `inception` is given)."""

    model.eval()
    metrics = ReconstructionMetrics(lpips=lpips, inception=inception)
    sharp: list[float] = []
    for ref, rec in monitor.reconstruct_batches(model, images, resolution, 16, "cpu"):
        metrics.update(ref, rec)
        sharp += sharpness(ref, rec)
    out = {k: v for k, v in metrics.compute().items() if k in ("psnr", "ssim", "lpips", "fid", "num_images")}
    out["sharpness"] = float(np.mean(sharp)) if sharp else math.nan
    return {"resolution": resolution, **out}


def load_lpips():

    return build_perceptual(LPIPS_NET)


# ----------------------------------------------------------------------------- mean and spread
def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1) and the values themselves."""
    v = [float(x) for x in values]
    std = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
    return {"mean": float(np.mean(v)), "std": std, "n": len(v), "values": v}


def pm(s: dict[str, Any], digits: int = 2) -> str:
    """'12.34 ± 0.05' (or just the mean for one value)."""
    if math.isnan(s["mean"]):
        return "n/a"
    return f"{s['mean']:.{digits}f}" + ("" if math.isnan(s["std"]) else f" ± {s['std']:.{digits}f}")


def pct(s: dict[str, Any]) -> str:
    """A spread of shares (0-1) in percent: '12.3 ± 0.4'."""
    return pm({**s, "mean": 100 * s["mean"], "std": 100 * s["std"]}, 1)


def figures(*names: str) -> list[str]:
    """The report's pictures NAME.png as Markdown lines, each after an empty line."""
    return [line for name in names for line in ("", f"![{name}]({name}.png)")]


def mean_curves(curves: list[list[dict[str, float]]], key: str) -> tuple[list[float], list[float], list[float]]:
    """(steps, mean, std) of one metric over seeds, on the steps every seed has."""
    steps = sorted(set.intersection(*(set(r["step"] for r in c) for c in curves)))
    values = np.array([[next(r[key] for r in c if r["step"] == s) for s in steps] for c in curves])
    std = values.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
    return steps, list(values.mean(0)), list(std)


# ----------------------------------------------------------------------------- report
def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "python": platform.python_version(),
    }


def write_report(p: Protocol, title: str, markdown: str, results: dict[str, Any]) -> Path:
    """report.md (the table and the pictures) and results.json (every number, the command, the machine).
    The time is the sum over the runs that wrote this folder: a continued (killed and rerun) experiment counts
    both parts."""
    runs = _earlier_minutes(p.out / "results.json") + [round((time.time() - p.started) / 60, 1)]
    minutes = sum(runs)
    over = f" over {len(runs)} runs ({' + '.join(f'{m:.1f}' for m in runs)})" if len(runs) > 1 else ""
    head = (
        f"# {title}\n\n`{p.command}`"
        + (" (smoke run: a pipeline check, the numbers mean nothing)" if p.smoke else "")
        + f"\n\nData: {p.data[0]}"
        + (f", sorted, last {p.holdout} held out" if p.holdout else "")
        + f"; seeds {p.seeds}; "
        f"{minutes:.1f} min{over} on {environment()['cpu']} ({torch.get_num_threads()} threads).\n\n"
    )
    atomic_write_text(p.out / "report.md", head + markdown.strip() + "\n")
    full = {
        "experiment": p.name,
        "command": p.command,
        "smoke": p.smoke,
        "data": p.data,
        "holdout": p.holdout,
        "seeds": p.seeds,
        "minutes": round(minutes, 1),
        "run_minutes": runs,
        "environment": environment(),
        **results,
    }
    atomic_write_json(p.out / "results.json", _no_nan(json.loads(json.dumps(full, default=_jsonable))))
    return p.out / "report.md"


def _earlier_minutes(path: Path) -> list[float]:
    """The run times an earlier results.json of this folder recorded (none if there is none or it is unreadable)."""
    try:
        earlier = json.loads(path.read_text())
        return [float(m) for m in earlier.get("run_minutes") or [earlier["minutes"]]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _no_nan(v: Any) -> Any:
    """NaN (a metric that does not apply) as JSON null."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_no_nan(x) for x in v]
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serializable: {type(v)}")
