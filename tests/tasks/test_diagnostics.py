"""diagnostics: reward entropy, the entropy bins (the paper's Figure 3) and the reliability table with ECE on
small inputs computed by hand; the typed result round-trips inside a report, an old report without it still
loads, and the Markdown and the chart render from it."""

import math

import numpy as np
import polars as pl
import pytest

from schemas.evaluation import Diagnostics, EvalReport
from tasks.diagnostics import best_picked, compute, diagnostics, entropy, entropy_bins, reliability, to_markdown
from tasks.plots import bar_chart, plot_diagnostics


def test_entropy_is_normalised_by_log_experts():
    h = entropy(np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25]]))
    # 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2, over ln 3
    assert h == pytest.approx([0.0, 1.0, 1.5 * math.log(2) / math.log(3)])
    assert entropy(np.array([[1.0]])).tolist() == [0.0]  # one expert: nothing to choose


def test_a_pick_tied_at_the_top_reward_is_a_best_pick():
    rewards = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    assert best_picked(rewards, np.array([0, 0, 1, 0])).tolist() == [True, False, True, True]


# four queries, two experts; confidences 0.95, 0.85, 0.55, 0.55; the second pick is wrong
PROBS = np.array([[0.95, 0.05], [0.85, 0.15], [0.45, 0.55], [0.55, 0.45]])
REWARDS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
SOFT = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.5, 0.5]])


def test_reliability_table_and_ece_by_hand():
    table, ece = reliability(PROBS, REWARDS)
    full = {(b.lo, b.hi): (b.n, b.confidence, b.accuracy) for b in table if b.n}
    assert full == {(0.5, 0.6): (2, pytest.approx(0.55), 1.0), (0.8, 0.9): (1, pytest.approx(0.85), 0.0),
                    (0.9, 1.0): (1, pytest.approx(0.95), 1.0)}
    assert len(table) == 10 and sum(b.n for b in table) == 4
    assert ece == pytest.approx((2 * 0.45 + 0.85 + 0.05) / 4)  # sum n_b / n * |acc_b - conf_b|
    assert reliability(np.array([[0.0, 1.0]]), np.array([[0.0, 1.0]]))[0][-1].n == 1  # confidence 1: last bin


def test_entropy_bins_by_hand():
    # entropies: H(0.9, 0.1) / ln 2 = 0.469 (twice), 1.0 (twice); 2 bins over [0.469, 1]
    bins = entropy_bins(SOFT, REWARDS, PROBS.argmax(axis=1), best=1, bins=2)
    low, high = bins
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert (low.lo, high.hi) == (pytest.approx(h), pytest.approx(1.0)) and (low.n, high.n) == (2, 2)
    assert (low.entropy, low.router, low.best_single, low.oracle) == (pytest.approx(h), 0.5, 0.5, 1.0)
    assert (high.entropy, high.router, high.best_single, high.oracle) == (pytest.approx(1.0), 0.5, 0.5, 0.5)
    one = entropy_bins(SOFT[:1], REWARDS[:1], np.array([0]), best=1, bins=3)  # one distinct value: first bin
    assert [b.n for b in one] == [1, 0, 0] and one[1].router is None


def test_diagnostics_from_label_rows_round_trip_in_a_report(tmp_path):
    test = pl.DataFrame({"query_id": list("abcd"), "soft": SOFT.tolist(), "rewards": REWARDS.tolist()})
    d = diagnostics(test, PROBS, ["x", "y"], "y")
    assert d == compute(SOFT, REWARDS, PROBS, 1)
    assert (d.accuracy, d.confidence) == (0.75, pytest.approx((0.95 + 0.85 + 0.55 + 0.55) / 4))
    base = dict(evaluation="e", labels="l", router="r", experts=["x", "y"], test_queries=4, best_single="y",
                rows=[{"strategy": "router", "reward": 0.5, "expert_calls": 1, "rm_calls": 0}], router_share={})
    old = EvalReport.model_validate(base)  # a report written before diagnostics existed
    assert old.diagnostics is None and old.fallback_below == 0.0
    rep = EvalReport.model_validate(base | {"diagnostics": d.model_dump(mode="json")})
    assert isinstance(rep.diagnostics, Diagnostics) and rep.diagnostics == d
    md = to_markdown(d)
    assert "ECE 0.4500" in md and "| 0.9-1.0 | 1 | 0.9500 | 1.0000 |" in md and "| 0.469-0.575 | 2 |" in md
    assert bar_chart(rep)[:8] == plot_diagnostics(d)[:8] == b"\x89PNG\r\n\x1a\n"
