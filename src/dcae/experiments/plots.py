"""The experiments' pictures: curves with a band over seeds, grouped bars with the single seeds as dots,
labelled reconstruction grids. Matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dcae.data.images import center_crop_arr
from dcae.experiments.common import mean_curves
from dcae.train import monitor
from dcae.utils.io import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(series: dict[str, list[list[dict]]], keys: list[tuple[str, str]], path: Path, title: str) -> Path:
    """One panel per metric: mean over seeds (line) and ± one standard deviation (band), per arm."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for arm, curves in series.items():
            steps, mean, std = mean_curves(curves, key)
            line = ax.plot(steps, mean, label=f"{arm} (n={len(curves)})", marker=".")[0]
            lo, hi = np.array(mean) - np.array(std), np.array(mean) + np.array(std)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return save(fig, path)


def plot_bars(
    groups: dict[str, dict[str, dict]],
    keys: list[tuple[str, str]],
    path: Path,
    title: str,
    refs: dict[str, dict[str, float]] | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """groups: x-group -> arm -> metric -> spread. Bars = mean, error bars = std, dots = single seeds.
    refs: label -> metric -> value, drawn as dashed horizontal lines (chance, a ceiling). The y range shows
    the differences (not the distance from zero) unless `ylim` is given."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8), squeeze=False)
    arms = list(dict.fromkeys(a for g in groups.values() for a in g))
    width = 0.8 / len(arms)
    for ax, (key, label) in zip(axes[0], keys):
        for i, arm in enumerate(arms):
            xs, means, stds = [], [], []
            for j, g in enumerate(groups.values()):
                if arm in g and key in g[arm]:
                    s = g[arm][key]
                    x = j + (i - (len(arms) - 1) / 2) * width
                    xs.append(x)
                    means.append(s["mean"])
                    stds.append(0 if math.isnan(s["std"]) else s["std"])
                    ax.plot([x] * len(s["values"]), s["values"], "k.", ms=3)
            ax.bar(xs, means, width * 0.9, yerr=stds, capsize=3, label=arm, alpha=0.8)
        ref_values = []
        for k, (ref, values) in enumerate((refs or {}).items()):
            if key in values:
                ax.axhline(values[key], ls="--", lw=1, color=f"C{len(arms) + k}", label=ref)
                ref_values.append(values[key])
        ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
        shown = [v for g in groups.values() for a in g.values() if key in a for v in a[key]["values"]] + ref_values
        lo, hi = min(shown), max(shown)
        pad = (hi - lo) * 0.5 or abs(hi) * 0.05 or 1.0
        ax.set_ylim(ylim or (lo - pad, hi + pad))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, path)


def recon_grid(rows: list[tuple[str, Any]], images: list[np.ndarray], resolution: int, path: Path, title: str) -> Path:
    """Held-out originals (first row) and each model's reconstruction (one labelled row per model)."""

    crops = [center_crop_arr(a, resolution) for a in images]
    lines = [("original", crops)]
    for label, model in rows:
        recs = []
        for _, rec in monitor.reconstruct_batches(model, images, resolution, 16, "cpu"):
            recs += [r.permute(1, 2, 0).numpy() for r in rec]
        lines.append((label, recs))
    return image_rows(lines, path, title)


def image_rows(
    lines: list[tuple[str, list[np.ndarray]]], path: Path, title: str, column_titles: list[str] | None = None
) -> Path:
    """A grid of pictures, one labelled row per entry (HxWx3 uint8 or float in [0, 1]), optional column titles."""
    plt = pyplot()
    cols = max(len(ims) for _, ims in lines)
    size = (1.3 * cols + 1.6, 1.35 * len(lines) + 0.3 * bool(column_titles))
    fig, axes = plt.subplots(len(lines), cols, figsize=size, squeeze=False)
    for i, (label, ims) in enumerate(lines):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(ims):
                ax.imshow(ims[j], interpolation="nearest")
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if i == 0 and column_titles and j < len(column_titles):
                ax.set_title(column_titles[j], fontsize=6, wrap=True)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)


def save(fig, path: Path) -> Path:

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    pyplot().close(fig)
    return path
