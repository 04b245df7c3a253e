"""evaluate: strategies, costs and MTR on a hand-made table."""

import numpy as np
import polars as pl
import pytest

from tasks.evaluate import evaluate, to_markdown


def _labels(rewards, tags):
    n = len(rewards)
    return pl.DataFrame({"query_id": [f"q{i}" for i in range(n)], "rewards": rewards, "tags": tags})


def test_strategies_hand_computed():
    experts = ["a", "b"]
    test = _labels([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]], [["x"], ["y"], ["x"]])
    train = _labels([[1.0, 0.0], [1.0, 0.5]], [["x"], ["y"]])  # a is the best single expert on train
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])  # router picks a, b, b
    scores = pl.DataFrame({"query_id": ["q0", "q0", "q1", "q1", "q2", "q2"], "expert": experts * 3,
                           "rm": ["exact"] * 6, "score": [1.0, 0.0, None, None, 0.0, 1.0]})
    rep = evaluate(test, train, experts, probs, scores)
    rows = {r["strategy"]: r for r in rep["rows"]}
    assert rep["best_single"] == "a"
    assert rows["router"]["reward"] == pytest.approx((1 + 2 + 1) / 3)
    assert rows["best_single (a)"]["reward"] == pytest.approx((1 + 0 + 3) / 3)
    assert rows["random"]["reward"] == pytest.approx((0.5 + 1 + 2) / 3)
    assert rows["oracle"]["reward"] == pytest.approx((1 + 2 + 3) / 3)
    assert rows["rm_ranking"]["reward"] == pytest.approx(2.0)
    # the verifiable column skips q1 (no reference): router picks a on q0 (1) and b on q2 (1)
    assert rows["router"]["rm:exact"] == pytest.approx(1.0)
    assert rows["expert:a"]["rm:exact"] == pytest.approx(0.5)
    assert (rows["router"]["expert_calls"], rows["rm_ranking"]["expert_calls"], rows["rm_ranking"]["rm_calls"]) \
        == (1, 2, 2)
    assert rep["router_share"] == {"a": pytest.approx(1 / 3, abs=1e-4), "b": pytest.approx(2 / 3, abs=1e-4)}
    # tag x: rm_ranking 2.0 > expert a 2.0 (tie) > router 1.0 ... ranks share the best place on ties
    assert rows["rm_ranking"]["mtr"] == pytest.approx(1.0) and rows["rm_ranking"]["first"] == 1.0
    assert "| router |" in to_markdown(rep)
