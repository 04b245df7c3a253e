"""diagnostics: the paper's Figure 3 (router reward against reward entropy) and the router's calibration.

- Reward entropy: H(s(q)) / log(experts), the entropy of the soft label s(q) = softmax_i(r_i(q) / T) over the
  experts, normalised to [0, 1]: 0 when one expert takes all of s(q), 1 when every expert scores the same (all
  right or all wrong). The test queries are binned by it (equal-width bins over the observed range: with a
  temperature of 1 and 0/1 credits every entropy lies near 1, so bins over [0, 1] would hold one group), and each
  bin shows the mean reward of the router's pick, of the best single expert and of the oracle. Where the entropy is
  high the choice matters little; where it is low one expert is much better and routing must find it.
- Calibration: confidence = the router's top probability, binned over [0, 1]; per bin, how often the pick had the
  best reward available (any expert tied at the top reward counts). ECE = sum_b n_b / n * |accuracy_b -
  confidence_b|. A router trained on soft targets is not trained to make its top probability that frequency, so
  the table says how far a confidence threshold (`routing.fallback_below`) can be read as one.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from schemas.evaluation import Diagnostics, EntropyBin, ReliabilityBin

ENTROPY_BINS = 5
CONFIDENCE_BINS = 10


def entropy(soft: np.ndarray) -> np.ndarray:
    """Per-row entropy of a distribution over experts, divided by log(experts) (0 for a single expert)."""
    p = np.asarray(soft, dtype=float)
    h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
    return h / np.log(p.shape[1]) if p.shape[1] > 1 else np.zeros(len(p))


def best_picked(rewards: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Per row: did the chosen expert have the row's top reward (ties count)."""
    got = rewards[np.arange(len(choice)), choice]
    return np.isclose(got, rewards.max(axis=1)) | (got >= rewards.max(axis=1))


def _bin_index(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Equal-width bin of each value over [lo, hi]; the top edge falls in the last bin."""
    width = (hi - lo) / bins or 1.0  # one distinct value: everything in bin 0
    return np.clip(np.floor((x - lo) / width), 0, bins - 1).astype(int)


def _means(idx: np.ndarray, bins: int, values: np.ndarray) -> list[float | None]:
    n = np.bincount(idx, minlength=bins)
    s = np.bincount(idx, weights=values, minlength=bins)
    return [float(s[b] / n[b]) if n[b] else None for b in range(bins)]


def entropy_bins(soft: np.ndarray, rewards: np.ndarray, choice: np.ndarray, best: int,
                 bins: int = ENTROPY_BINS) -> list[EntropyBin]:
    """The Figure 3 table: queries binned by normalised reward entropy (equal width over the observed range)."""
    h = entropy(soft)
    if not len(h):
        return []
    lo, hi = float(h.min()), float(h.max())
    idx = _bin_index(h, lo, hi, bins)
    edges = np.linspace(lo, hi, bins + 1)
    n = np.bincount(idx, minlength=bins)
    cols = {k: _means(idx, bins, v) for k, v in {
        "entropy": h, "router": rewards[np.arange(len(choice)), choice], "best_single": rewards[:, best],
        "oracle": rewards.max(axis=1)}.items()}
    return [EntropyBin(lo=float(edges[b]), hi=float(edges[b + 1]), n=int(n[b]), **{k: v[b] for k, v in cols.items()})
            for b in range(bins)]


def reliability(probs: np.ndarray, rewards: np.ndarray, choice: np.ndarray | None = None,
                bins: int = CONFIDENCE_BINS) -> tuple[list[ReliabilityBin], float]:
    """(reliability table over equal-width confidence bins on [0, 1], ECE). `choice`: the picks (default argmax)."""
    choice = probs.argmax(axis=1) if choice is None else choice
    conf = probs.max(axis=1)
    hit = best_picked(rewards, choice).astype(float)
    idx = _bin_index(conf, 0.0, 1.0, bins)
    n = np.bincount(idx, minlength=bins)
    c, a = _means(idx, bins, conf), _means(idx, bins, hit)
    table = [ReliabilityBin(lo=b / bins, hi=(b + 1) / bins, n=int(n[b]), confidence=c[b], accuracy=a[b])
             for b in range(bins)]
    ece = sum(n[b] / len(conf) * abs(a[b] - c[b]) for b in range(bins) if n[b]) if len(conf) else 0.0
    return table, float(ece)


def compute(soft: np.ndarray, rewards: np.ndarray, probs: np.ndarray, best: int,
            choice: np.ndarray | None = None) -> Diagnostics:
    """Both diagnostics from arrays (queries x experts): soft labels s(q), rewards, router probabilities; `best`:
    the best single expert's index; `choice`: the router's picks (default argmax of `probs`)."""
    choice = probs.argmax(axis=1) if choice is None else choice
    table, ece = reliability(probs, rewards, choice)
    n = max(len(probs), 1)
    return Diagnostics(entropy_bins=entropy_bins(soft, rewards, choice, best), reliability=table, ece=ece,
                       confidence=float(probs.max(axis=1).sum() / n) if len(probs) else 0.0,
                       accuracy=float(best_picked(rewards, choice).sum() / n))


def diagnostics(test: pl.DataFrame, probs: np.ndarray, experts: list[str], best_single: str,
                choice: np.ndarray | None = None) -> Diagnostics:
    """From evaluate's data: `test` label rows (`soft`, `rewards` in `experts` order), the router's probabilities
    for those rows, and the best single expert's name."""
    shape = (test.height, len(experts))
    soft = np.array(test["soft"].to_list(), dtype=float).reshape(shape)
    rewards = np.array(test["rewards"].to_list(), dtype=float).reshape(shape)
    return compute(soft, rewards, probs, experts.index(best_single), choice)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def to_markdown(d: Diagnostics) -> str:
    """The report.md section: the entropy table and the reliability table with ECE."""
    ent = "".join(f"| {b.lo:.3f}-{b.hi:.3f} | {b.n} | {_f(b.entropy)} | {_f(b.router)} | {_f(b.best_single)} | "
                  f"{_f(b.oracle)} |\n" for b in d.entropy_bins)
    rel = "".join(f"| {b.lo:.1f}-{b.hi:.1f} | {b.n} | {_f(b.confidence)} | {_f(b.accuracy)} |\n"
                  for b in d.reliability if b.n)
    return ("\n## Reward entropy (the paper's Figure 3)\n\nTest queries binned by the normalised entropy of s(q) over "
            "the experts (1 = every expert scores the same); mean reward of each strategy's pick.\n\n"
            "| entropy | queries | mean entropy | router | best single | oracle |\n|---|---|---|---|---|---|\n" + ent
            + "\n## Router calibration\n\nConfidence = the router's top probability; accuracy = share of picks with "
            f"the best reward available. ECE {d.ece:.4f}; mean confidence {d.confidence:.4f}, accuracy "
            f"{d.accuracy:.4f}.\n\n| confidence | queries | mean confidence | accuracy |\n|---|---|---|---|\n" + rel)
