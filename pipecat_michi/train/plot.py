"""Loss curves as a PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def plot_losses(history: list[dict[str, float]], path: Path, title: str) -> Path:
    """One panel per loss term against step; ``history`` rows hold ``step`` and the terms."""
    names = sorted({k for row in history for k in row if k != "step"})
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(row["step"], row[name]) for row in history if name in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
