"""plots: a PNG of a label summary (tasks/inspect.label_summary): tag x expert heatmap of the mean target
probability s*, and each expert's win rate (share of queries where its combined reward is the highest)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_labels(summary: dict, path: str | Path, title: str = "") -> Path:
    experts = [r["expert"] for r in summary["experts"]]
    tags = [r["tag"] for r in summary["tag_target"]]
    grid = np.array([[r[e] if r[e] is not None else np.nan for e in experts] for r in summary["tag_target"]],
                    dtype=float).reshape(len(tags), len(experts))
    fig, (ax_h, ax_b) = plt.subplots(1, 2, figsize=(4 + 1.2 * len(experts) * 2, 1.5 + 0.45 * max(len(tags), 4)),
                                     gridspec_kw={"width_ratios": [1.4, 1]})
    im = ax_h.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax_h.set_xticks(range(len(experts)), experts, rotation=30, ha="right")
    ax_h.set_yticks(range(len(tags)), [f"{t} (n={r['n']})" for t, r in zip(tags, summary["tag_target"],
                                                                            strict=True)])
    for i in range(len(tags)):
        for j in range(len(experts)):
            if np.isfinite(grid[i, j]):
                ax_h.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                          color="black" if grid[i, j] > 0.6 else "white", fontsize=8)
    ax_h.set_title("mean target probability by tag")
    fig.colorbar(im, ax=ax_h, fraction=0.046, pad=0.04)
    wins = [r["win_rate"] or 0.0 for r in summary["experts"]]
    bars = ax_b.bar(experts, wins, color="tab:blue")
    ax_b.bar_label(bars, labels=[f"{w:.0%}" for w in wins])
    ax_b.set_ylim(0, 1.1)
    ax_b.set_ylabel("win rate")
    ax_b.set_title(f"win rate ({summary['rows']} queries)")
    ax_b.tick_params(axis="x", rotation=30)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
