"""Baseline routers on inline rows: each recovers the structure it is built to find, and evaluate reports them."""

import numpy as np
import polars as pl
import pytest

from tasks.baselines import BASELINES, KNN, ClusterLookup, Rows, TagLookup, fit_baselines
from tasks.evaluate import baseline_choices, evaluate

# two groups of queries far apart in feature space: expert 0 wins in group "a", expert 1 in group "b"
RNG = np.random.default_rng(0)
A = RNG.normal(size=(40, 8)) * 0.05 + np.eye(8)[0]
B = RNG.normal(size=(40, 8)) * 0.05 + np.eye(8)[1]
X = np.vstack([A, B])
TAGS = [["a"]] * 40 + [["b"]] * 40
REWARDS = np.array([[1.0, 0.2]] * 40 + [[0.1, 0.9]] * 40)


def test_registry_names_every_baseline():
    assert set(BASELINES) == {"tag-lookup", "cluster-lookup", "knn"}


def test_tag_lookup_takes_each_tags_best_expert_and_the_prior_elsewhere():
    b = TagLookup(Rows(X, TAGS), REWARDS, prior=np.array([0.0, 1.0]))
    got = b.route(Rows(np.zeros((4, 8)), [["a"], ["b"], ["unseen"], []]))
    assert got.tolist() == [0, 1, 1, 1]  # unknown or no tag: the prior's best (expert 1 here)
    both = b.scores(Rows(np.zeros((1, 8)), [["a", "b"]]))[0]
    assert both == pytest.approx((REWARDS[0] + REWARDS[-1]) / 2)  # the mean of its tags' reward vectors


@pytest.mark.parametrize("cls", [ClusterLookup, KNN])
def test_feature_baselines_route_untagged_queries_by_their_neighbourhood(cls):
    b = cls(Rows(X, TAGS), REWARDS, prior=np.array([0.5, 0.5]))
    queries = np.vstack([np.eye(8)[0] * 2, np.eye(8)[1] * 3])  # scale does not matter (cosine)
    assert b.route(Rows(queries, [[], []])).tolist() == [0, 1]


def test_fit_leaves_out_rows_without_rewards_and_feature_baselines_without_features():
    r = REWARDS.copy()
    r[:5] = np.nan
    fitted = fit_baselines(Rows(np.zeros((80, 0)), TAGS), r)
    assert set(fitted) == {"tag-lookup"}  # no features: only the tag table
    assert fitted["tag-lookup"].means["a"] == pytest.approx(REWARDS[0])


def test_evaluate_reports_the_baselines_beside_the_router():
    ids = [f"q{i}" for i in range(80)]
    soft = np.exp(REWARDS) / np.exp(REWARDS).sum(axis=1, keepdims=True)
    rows = pl.DataFrame({"query_id": ids, "tags": TAGS, "rewards": REWARDS.tolist(), "soft": soft.tolist(),
                         "target": soft.tolist(), "split": ["train"] * 80})
    test, train = rows[::2], rows[1::2]
    base = baseline_choices(train, X[1::2], test, X[::2], np.array([0.55, 0.55]))
    assert set(base) == {"tag-lookup", "cluster-lookup", "knn"}
    probs = np.full((test.height, 2), 0.5)
    probs[:, 0] += 0.1  # a router that always says expert 0
    scores = pl.DataFrame({"query_id": ids, "expert": ["e0"] * 80, "rm": ["r"] * 80, "score": [0.0] * 80})
    rep = evaluate(test, train, ["e0", "e1"], probs, scores, evaluation="e", labels="l", router="r",
                   baselines=base)
    reward = {r.strategy: r.reward for r in rep.rows}
    oracle = float(np.max(REWARDS[::2], axis=1).mean())
    for name in ("tag-lookup", "cluster-lookup", "knn"):  # each finds the per-group best: the oracle here
        assert reward[name] == pytest.approx(oracle)
    assert reward["router"] == pytest.approx(float(REWARDS[::2, 0].mean()))
    assert reward["router"] < oracle
    assert rep.per_tag.strategies["knn"]["b"] == pytest.approx(0.9)
