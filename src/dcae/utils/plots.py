"""Small charts next to the JSON numbers (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from dcae.utils.io import atomic_path


def bar_chart(panels: dict[str, dict[str, list[float | None]]], groups: list[str], path: Path, title: str = "",
              ylabel: str = "") -> Path:  # fmt: skip
    """One panel per entry of `panels` ({series name: one value per group}), grouped bars, written atomically.
    Missing values (None) leave a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(4.0, 1.2 + 1.1 * len(groups)) * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.4), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        width = 0.8 / max(1, len(series))
        for k, (name, values) in enumerate(series.items()):
            xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
        ax.set_xticks(range(len(groups)), groups, fontsize=7)
        ax.set_title(panel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
