"""calibrate: the bisection over lambda on a synthetic probability/cost matrix meets a share or a budget with the
smallest lambda; unreachable limits and bad arguments are ConfigErrors; run_calibrate on a real store (labels,
champion, report) with a fake router routes the validation slice."""

import numpy as np
import polars as pl
import pytest

from schemas.artifacts import CHAMPION_PATH, LABELS, ROUTER_JSON, labels_path, report_path, router_file
from schemas.errors import ArtifactError, ConfigError
from schemas.evaluation import EvalReport
from schemas.store import Store
from tasks.aggregate import train_val
from tasks.calibrate import calibrate, fallback_threshold, parse_share, point, run_calibrate, run_fallback_threshold
from tasks.route import RoutingPolicy

EXPERTS = ["small", "mid", "big"]
COSTS = np.array([1.0, 3.0, 10.0])


@pytest.fixture(scope="module")
def matrix() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1.0, 1.0, 2.0], size=400)  # big is the router's favourite
    rewards = probs + rng.normal(0, 0.1, size=probs.shape)
    return probs, rewards


def test_max_share_is_met_at_the_smallest_lambda(matrix):
    probs, rewards = matrix
    cal = calibrate(probs, rewards, COSTS, EXPERTS, max_share={"big": 0.3})
    assert cal.baseline.share["big"] > 0.3 >= cal.point.share["big"] and cal.lam > 0
    below = point(probs, rewards, COSTS, EXPERTS, cal.lam * (1 - 1e-6))
    assert below.share["big"] > 0.3  # a hair less lambda breaks the limit
    assert cal.point.cost < cal.baseline.cost and cal.queries == 400


def test_budget_is_met_at_the_smallest_lambda(matrix):
    probs, rewards = matrix
    cal = calibrate(probs, rewards, COSTS, EXPERTS, budget=3.0)
    assert cal.baseline.cost > 3.0 >= cal.point.cost
    assert point(probs, rewards, COSTS, EXPERTS, cal.lam * (1 - 1e-6)).cost > 3.0
    both = calibrate(probs, rewards, COSTS, EXPERTS, max_share={"big": 0.3}, budget=3.0)
    assert both.lam == pytest.approx(max(cal.lam, calibrate(probs, rewards, COSTS, EXPERTS,
                                                            max_share={"big": 0.3}).lam))


def test_limits_already_met_need_no_lambda(matrix):
    probs, rewards = matrix
    cal = calibrate(probs, rewards, COSTS, EXPERTS, max_share={"small": 1.0}, budget=100.0)
    assert cal.lam == 0.0 and cal.point == cal.baseline


def test_unreachable_limits_and_bad_arguments(matrix):
    probs, rewards = matrix
    with pytest.raises(ConfigError, match="no lambda reaches small share <= 10%"):
        calibrate(probs, rewards, COSTS, EXPERTS, max_share={"small": 0.1})  # lambda only moves queries to small
    with pytest.raises(ConfigError, match="no lambda reaches mean cost <= 0.5"):
        calibrate(probs, rewards, COSTS, EXPERTS, budget=0.5)
    with pytest.raises(ConfigError, match="no lambda reaches"):
        calibrate(probs, rewards, np.array([2.0, 2.0, 2.0]), EXPERTS, budget=1.0)
    with pytest.raises(ConfigError, match="--max-share"):
        calibrate(probs, rewards, COSTS, EXPERTS)
    assert parse_share("big=0.3", EXPERTS) == ("big", 0.3)
    for bad, why in (("big", "EXPERT=FRACTION"), ("big=1.5", "EXPERT=FRACTION"), ("big=x", "EXPERT=FRACTION"),
                     ("huge=0.3", "no expert 'huge'")):
        with pytest.raises(ConfigError, match=why):
            parse_share(bad, EXPERTS)


class FakeRouter:
    experts = ["small", "big"]

    def probs(self, texts: list[str]) -> np.ndarray:
        return np.array([[0.3, 0.7] if "hard" in t else [0.45, 0.55] for t in texts])


def policy(store: Store) -> RoutingPolicy:
    """The store's champion policy with FakeRouter as its router (its metadata file written: the router exists)."""
    store.write_json(router_file("r1", ROUTER_JSON), {"experts": FakeRouter.experts})
    return RoutingPolicy.load(store, loader=lambda s, fp: FakeRouter())


def test_run_calibrate_on_a_store(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(ArtifactError, match="no champion"):
        run_calibrate(policy(store), ["big=0.5"], None)
    n = 200
    labels = pl.DataFrame({"query_id": [f"q{i}" for i in range(n)],
                           "text": [("hard " if i % 4 == 0 else "easy ") + str(i) for i in range(n)],
                           "split": ["train"] * n, "tags": [[]] * n,
                           "rewards": [[0.0, 1.0] if i % 4 == 0 else [0.5, 0.6] for i in range(n)],
                           "soft": [[0.5, 0.5]] * n, "target": [[0.5, 0.5]] * n})
    store.write_table(labels_path("l1"), labels.to_arrow().cast(LABELS), LABELS, {"experts": FakeRouter.experts})
    report = EvalReport(evaluation="e1", labels="l1", router="r1", experts=FakeRouter.experts, test_queries=0,
                        best_single="big", rows=[], router_share={}, costs=None)
    store.write_json(report_path("e1"), report.model_dump(mode="json"))
    store.write_json(CHAMPION_PATH, {"router": "routers/r1", "evaluation": "evaluations/e1", "labels": "l1",
                                     "experts": FakeRouter.experts, "reward": None, "run_id": "x",
                                     "published": "2026-01-01T00:00:00Z"})
    with pytest.raises(ConfigError, match="no expert costs"):
        run_calibrate(policy(store), ["big=0.5"], None)
    store.write_json(report_path("e1"), report.model_copy(update={"costs": {"small": 1.0, "big": 4.0}})
                     .model_dump(mode="json"))
    cal = run_calibrate(policy(store), ["big=0.5"], None)
    val = train_val(labels)[1]
    hard = val["text"].str.starts_with("hard").mean()
    # "easy" queries (p gap 0.1) leave big first; "hard" ones (gap 0.4) stay: big keeps the hard share
    assert (cal.router, cal.queries) == ("r1", val.height)
    assert cal.point.share["big"] == pytest.approx(hard, abs=1e-4) and cal.baseline.share["big"] == 1.0
    assert 0.1 / 0.75 < cal.lam <= 0.4 / 0.75 and cal.lam == pytest.approx(0.1 / 0.75, rel=1e-6)


def test_fallback_threshold_lets_the_given_share_of_validation_queries_fall_back():
    probs = np.array([[p, 1 - p] for p in (0.9, 0.6, 0.7, 0.55, 0.8)])  # top probabilities sorted: .6 .6 .7 .8 .9
    assert fallback_threshold(probs, 0.0) == 0.0  # off
    assert fallback_threshold(probs, 0.1) == 0.0  # floor(0.5) = 0 queries
    assert fallback_threshold(probs, 0.4) == 0.7  # 2 queries (0.6, 0.6) have a top probability below 0.7
    assert fallback_threshold(probs, 1.0) == 1.0
    with pytest.raises(ConfigError, match="fallback share"):
        fallback_threshold(probs, 1.5)


def test_run_fallback_threshold_on_a_store(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(ArtifactError, match="no champion"):
        run_fallback_threshold(policy(store), 0.1)
    n = 200
    labels = pl.DataFrame({"query_id": [f"q{i}" for i in range(n)],
                           "text": [("hard " if i % 4 == 0 else "easy ") + str(i) for i in range(n)],
                           "split": ["train"] * n, "tags": [[]] * n, "rewards": [[0.0, 1.0]] * n,
                           "soft": [[0.5, 0.5]] * n, "target": [[0.5, 0.5]] * n})
    store.write_table(labels_path("l1"), labels.to_arrow().cast(LABELS), LABELS, {"experts": FakeRouter.experts})
    store.write_json(CHAMPION_PATH, {"router": "routers/r1", "evaluation": "evaluations/e1", "labels": "l1",
                                     "experts": FakeRouter.experts, "reward": None, "run_id": "x",
                                     "published": "2026-01-01T00:00:00Z"})
    store.write_json(report_path("e1"), EvalReport(evaluation="e1", labels="l1", router="r1",
                                                   experts=FakeRouter.experts, test_queries=0, best_single="big",
                                                   rows=[], router_share={}).model_dump(mode="json"))
    val = train_val(labels)[1]
    easy = val["text"].str.starts_with("easy").mean()
    # easy queries have top probability 0.55, hard ones 0.7: any share below the easy share keeps 0.55
    assert run_fallback_threshold(policy(store), easy / 2) == pytest.approx(0.55)
    assert run_fallback_threshold(policy(store), easy) == pytest.approx(0.7)
