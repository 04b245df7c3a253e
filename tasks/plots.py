"""plots: PNGs. A label summary (tasks/inspect.label_summary): tag x expert heatmap of the mean target probability
s*, and each expert's win rate (share of queries where its combined reward is the highest). An evaluation's
quality-cost curve (schemas.evaluation.CostCurve): reward against mean cost per query. An evaluation's bar chart
(report.png): per-tag mean reward by strategy, with the reward-entropy and calibration panels when the report has
diagnostics (tasks/diagnostics.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tasks.outputs import check_output, output_kind, write_file  # noqa: E402

if TYPE_CHECKING:
    from schemas.evaluation import CostCurve, Diagnostics, EvalReport


def check_plot(path: Path, store_root: Path | None = None, overwrite: bool = False) -> None:
    """`inspect --plot`'s output checks (tasks/outputs.py, as `route` and `export` check theirs): a .png file, an
    existing one only with --overwrite, not inside the store, writable; before the store is read."""
    kind = output_kind(path, (".png",), flag="--plot", what="plot")
    check_output(path, kind, overwrite=overwrite, store_root=store_root, flag="--plot", what="plot")


def plot_labels(summary: dict, path: str | Path, title: str = "") -> Path:
    """The label summary's figure (`labels_figure`) as a PNG at `path`, written whole or not at all."""
    fig = labels_figure(summary, title)
    try:  # the complete PNG or none (the temporary name has no .png suffix: the format is given)
        return write_file(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def labels_figure(summary: dict, title: str = ""):
    """A label summary (tasks/inspect.py) drawn: a tag x expert heatmap of the mean target probability (blank where
    a tag has none) beside each expert's win rate as a bar."""
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
    return fig


def plot_cost_curve(curve: CostCurve, lam: float = 0.0) -> bytes:
    """PNG: the router over its lambda grid (points and their hull), each single expert, the random-mix hull, the
    router at the config's lambda and the 95 % target line; AIQs in the legend."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pts = np.array([(p.cost, p.reward) for p in curve.router])
    ax.plot(pts[:, 0], pts[:, 1], "o-", ms=3, color="tab:blue",
            label=f"router over lambda (AIQ {curve.aiq['router']:.4f})")
    mix = np.array([(p.cost, p.reward) for p in curve.random_mix])
    ax.plot(mix[:, 0], mix[:, 1], "--", color="tab:gray",
            label=f"random mix of experts (AIQ {curve.aiq['random_mix']:.4f})")
    for name, p in curve.experts.items():
        ax.scatter([p.cost], [p.reward], marker="s", color="tab:orange", zorder=3)
        ax.annotate(name, (p.cost, p.reward), textcoords="offset points", xytext=(4, 4), fontsize=7)
    op = curve.operating
    ax.scatter([op.cost], [op.reward], marker="*", s=140, color="tab:red", zorder=4, label=f"router at lambda {lam:g}")
    ax.axhline(curve.target, color="tab:green", lw=0.8, ls=":", label="95 % of the best single expert")
    ax.set_xlabel("mean cost per query")
    ax.set_ylabel("mean reward on test queries")
    ax.set_title("Quality and cost")
    ax.legend(fontsize=7)
    return _png(fig)


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def bar_chart(report: EvalReport) -> bytes:
    """PNG: per-tag mean reward of the router, best single expert, random and oracle (grouped bars), with the
    tag average as the last group; or the overall reward per strategy when there are no tags. With diagnostics,
    two more panels: reward by reward-entropy bin and the router's reliability diagram."""
    pt = report.per_tag
    strategies = pt.strategies or {r.strategy: {"all": r.reward} for r in report.rows}
    keep = [k for k in strategies if k == "router" or k.startswith("best_single") or k in ("random", "oracle")]
    groups = [*pt.tags, "tag_average"] if pt.tags else ["all"]
    bars_w = max(6, 1.4 * len(groups) * len(keep) / 3)
    d = report.diagnostics
    if d is None:
        fig, ax = plt.subplots(figsize=(bars_w, 4), dpi=120)
    else:
        fig, (ax, ent, rel) = plt.subplots(1, 3, figsize=(bars_w + 9, 4), dpi=120,
                                           gridspec_kw={"width_ratios": [bars_w, 4.5, 4.5]})
        _draw_diagnostics(ent, rel, d)
    width = 0.8 / max(len(keep), 1)  # a report with no rows still draws
    for i, k in enumerate(keep):
        vals = [strategies[k].get(g) or 0.0 for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, vals, width, label=k)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=20)
    ax.set_ylabel("mean reward on test queries")
    ax.set_title(f"Router evaluation ({report.test_queries} test queries)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_diagnostics(d: Diagnostics) -> bytes:
    """PNG: the two diagnostics panels alone."""
    fig, (ent, rel) = plt.subplots(1, 2, figsize=(9, 4), dpi=120)
    _draw_diagnostics(ent, rel, d)
    return _png(fig)


def _draw_diagnostics(ent, rel, d: Diagnostics) -> None:
    """Left: mean reward per reward-entropy bin (router, best single, oracle; the paper's Figure 3). Right: the
    reliability diagram (accuracy of the pick per confidence bin against the diagonal), ECE in the title."""
    full = [b for b in d.entropy_bins if b.n]
    x = [b.entropy for b in full]
    for key, style in (("router", "o-"), ("best_single", "s--"), ("oracle", "^:")):
        ent.plot(x, [getattr(b, key) for b in full], style, ms=4, label=key.replace("_", " "))
    for b in full:
        ent.annotate(str(b.n), (b.entropy, b.oracle), textcoords="offset points", xytext=(0, 4), fontsize=6,
                     ha="center")
    ent.set_xlabel("normalised entropy of s(q) (bin mean)")
    ent.set_ylabel("mean reward")
    ent.set_title("Reward by reward entropy")
    ent.legend(fontsize=7)
    filled = [b for b in d.reliability if b.n]
    w = 1 / len(d.reliability)
    rel.bar([b.lo for b in filled], [b.accuracy for b in filled], w * 0.9, align="edge", color="tab:blue",
            label="share of best picks")
    rel.plot([b.confidence for b in filled], [b.accuracy for b in filled], "o", color="tab:red", ms=3,
             label="at the bin's mean confidence")
    rel.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
    rel.set_xlim(0, 1)
    rel.set_ylim(0, 1)
    rel.set_xlabel("router confidence (top probability)")
    rel.set_ylabel("pick was a best expert")
    rel.set_title(f"Calibration (ECE {d.ece:.3f})")
    rel.legend(fontsize=7)
