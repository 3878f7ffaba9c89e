"""The training log: one CSV per run (rewritten up to the resume step, then appended), TensorBoard when
installed, and loss curves as PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from dcae.utils.io import atomic_path


class Logger:
    """Rows of `columns` to `folder/log.csv` (and TensorBoard scalars). A resumed run keeps the rows up to
    its checkpoint's step and drops the later ones, which the killed run logged but the resumed one redoes."""

    def __init__(self, folder: Path, columns: tuple[str, ...], resume_step: int | None, tensorboard: bool) -> None:
        self.path, self.columns = Path(folder) / "log.csv", tuple(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_log(self.path) if resume_step is not None else []
        rows = [r for r in rows if r["step"] <= (resume_step or 0)]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(v) for k, v in r.items() if k in self.columns})
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({k: _fmt(row.get(k)) for k in self.columns})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v: float | None) -> str:
    if v is None or v == "":
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def read_log(path: Path) -> list[dict[str, float]]:
    """The rows as numbers; a row a killed run left half-written (no step, or text that is no number) is dropped."""
    if not Path(path).is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                parsed = {k: float(v) for k, v in row.items() if k is not None and v not in ("", None)}
            except (TypeError, ValueError):
                continue
            if "step" in parsed and parsed["step"] >= 0:
                rows.append(parsed)
    return rows


def plot_curves(
    logs: dict[str, list[dict[str, float]]], path: Path, title: str = "", keys: tuple[str, ...] = ("loss",)
) -> Path | None:
    """Curves of `keys` (one panel each) from one or more runs' rows, the runs one after the other on a shared
    step axis. Matplotlib with the Agg backend (no display needed). None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for rows in logs.values() for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    offset = 0.0
    for name, rows in logs.items():
        if not rows:
            continue
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"] + offset, r[k]) for r in rows if k in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, marker="." if len(pts) < 20 else None)
        offset += max(r["step"] for r in rows)
        for ax in axes[0]:
            if len(logs) > 1:
                ax.axvline(offset, color="gray", lw=0.5, ls="--")
    for ax, k in zip(axes[0], keys):
        ax.set_title(k)
        ax.set_xlabel("step")
        if k not in ("g_loss", "val_psnr") and all(r[k] > 0 for rows in logs.values() for r in rows if k in r):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path
