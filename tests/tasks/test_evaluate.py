"""evaluate: strategies, costs and MTR on a hand-made table; the typed report and what is rendered from it; the
quality-cost curve (hull, AIQ, cost to target) by hand; the test scores aggregate leaves beside the labels."""

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from schemas.artifacts import (
    LABELS,
    QUERIES,
    SCORES,
    TAGS,
    held_out_scores_path,
    labels_path,
    queries_path,
    report_path,
    score_path,
    tags_path,
)
from schemas.config import AggregateConfig, FlowConfig, TrainConfig
from schemas.errors import ArtifactError
from schemas.evaluation import EvalReport, read_report
from schemas.store import Store
from tasks.aggregate import ScoreSource, run_aggregate, scan_scores, scores_key
from tasks.evaluate import aiq, cost_to_reach, evaluate, held_out_scores, hull, to_markdown, validate
from tasks.plots import bar_chart, plot_cost_curve

EXPERTS = ["a", "b"]


def _labels(rewards, tags):
    n = len(rewards)
    soft = [[1.0 / len(r)] * len(r) for r in rewards]  # the soft label s(q): only the diagnostics read it
    return pl.DataFrame({"query_id": [f"q{i}" for i in range(n)], "rewards": rewards, "soft": soft, "tags": tags})


def _report(**kw) -> EvalReport:
    test = _labels([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]], [["x"], ["y"], ["x"]])
    train = _labels([[1.0, 0.0], [1.0, 0.5]], [["x"], ["y"]])  # a is the best single expert on train
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])  # router picks a, b, b
    scores = pl.DataFrame({"query_id": ["q0", "q0", "q1", "q1", "q2", "q2"], "expert": EXPERTS * 3,
                           "rm": ["exact"] * 6, "score": [1.0, 0.0, None, None, 0.0, 1.0]})
    return evaluate(test, train, EXPERTS, probs, scores, evaluation="e1", labels="l1", router="r1", **kw)


def test_strategies_hand_computed():
    rep = _report()
    rows = {r.strategy: r for r in rep.rows}
    assert (rep.evaluation, rep.labels, rep.router, rep.best_single) == ("e1", "l1", "r1", "a")
    assert rep.router_reward == rows["router"].reward == pytest.approx((1 + 2 + 1) / 3)
    assert rows["best_single (a)"].reward == pytest.approx((1 + 0 + 3) / 3)
    assert rows["random"].reward == pytest.approx((0.5 + 1 + 2) / 3)
    assert rows["oracle"].reward == pytest.approx((1 + 2 + 3) / 3)
    assert rows["rm_ranking"].reward == pytest.approx(2.0)
    # the verifiable column skips q1 (no reference): router picks a on q0 (1) and b on q2 (1)
    assert rows["router"].rm == {"exact": pytest.approx(1.0)}
    assert rows["expert:a"].rm["exact"] == pytest.approx(0.5)
    assert rows["oracle"].rm["exact"] == pytest.approx(1.0)
    assert (rows["router"].expert_calls, rows["rm_ranking"].expert_calls, rows["rm_ranking"].rm_calls) == (1, 2, 2)
    assert rep.router_share == {"a": pytest.approx(1 / 3, abs=1e-4), "b": pytest.approx(2 / 3, abs=1e-4)}


def test_mtr_and_per_tag_means():
    rep = _report()
    rows = {r.strategy: r for r in rep.rows}
    # tag x (q0, q2): router 1.0, rm_ranking 2.0, a 2.0, b 0.5; tag y (q1): router 2, rm_ranking 2, a 0, b 2
    assert (rows["rm_ranking"].mtr, rows["rm_ranking"].first) == (1.0, 1.0)
    assert (rows["router"].mtr, rows["router"].first) == (pytest.approx((3 + 1) / 2), 0.5)
    assert (rows["expert:a"].mtr, rows["expert:b"].mtr) == (pytest.approx((1 + 4) / 2), pytest.approx((4 + 1) / 2))
    assert (rows["best_single (a)"].mtr, rows["best_single (a)"].first) == (rows["expert:a"].mtr,
                                                                             rows["expert:a"].first)
    assert rows["random"].mtr is None and rows["oracle"].first is None  # not ranked
    pt = rep.per_tag
    assert (pt.tags, pt.n) == (["x", "y"], [2, 1])
    assert pt.strategies["router"] == {"x": 1.0, "y": 2.0, "tag_average": 1.5}
    assert pt.strategies["oracle"]["x"] == pytest.approx(2.0)


def test_untagged_queries_have_no_ranks():
    test = _labels([[1.0, 0.0], [0.0, 2.0]], [[], []])
    scores = pl.DataFrame({"query_id": [], "expert": [], "rm": [], "score": []},
                          schema={"query_id": pl.String, "expert": pl.String, "rm": pl.String, "score": pl.Float64})
    rep = evaluate(test, test.clear(), EXPERTS, np.array([[1.0, 0.0], [0.0, 1.0]]), scores,
                   evaluation="e", labels="l", router="r")
    assert rep.per_tag.tags == [] and all(r.mtr is None and r.rm == {} for r in rep.rows)
    assert rep.router_reward == pytest.approx(1.5)
    assert "| mtr |" not in to_markdown(rep)


def test_markdown_and_chart_are_rendered_from_the_typed_report():
    rep = _report()
    md = to_markdown(rep)
    assert "| strategy | reward | rm:exact | expert_calls | rm_calls | mtr | first |" in md
    assert "| router | 1.3333 | 1.0000 | 1 | 0 | 2.0000 | 0.5000 |" in md
    assert "| random | 1.1667 | 0.5000 | 1 | 0 | - | - |" in md
    assert "| router | 1.0000 | 2.0000 | 1.5000 |" in md  # per-tag table: x, y, tag_average
    assert bar_chart(rep)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_round_trips_and_reads_version_1_reports(tmp_path):
    store = Store(str(tmp_path))
    rep = _report()
    store.write_json(report_path("e1"), rep.model_dump(mode="json"))
    assert read_report(store, "e1") == rep == read_report(store, "evaluations/e1")
    v1 = rep.model_dump(mode="json")
    v1["by_tag"] = [{"tag": "x", "n": 2}]
    v1["rows"] = [{k: v for k, v in r.items() if k != "rm"} | {f"rm:{k}": v for k, v in r["rm"].items()}
                  for r in v1["rows"]]
    store.write_json(report_path("e0"), v1)
    assert read_report(store, "e0").rows == rep.rows
    store.write_bytes(report_path("bad"), json.dumps({"rows": 3}).encode())
    with pytest.raises(ArtifactError, match=r"evaluations/bad/report.json: not an evaluation report"):
        read_report(store, "bad")
    with pytest.raises(ArtifactError, match="missing"):
        read_report(store, "nope")


# --- quality and cost -------------------------------------------------------------------------------------------

def test_hull_aiq_and_cost_to_reach_by_hand():
    v = hull([(1, 0.2), (2, 0.5), (2, 0.3), (3, 0.6), (4, 0.55), (2.5, 0.5)])
    assert v == [(1, 0.2), (2, 0.5), (3, 0.6)]  # (2, .3), (2.5, .5) lie below; (4, .55) costs more for less
    # over [1, 4]: (0.2 + 0.5) / 2 + (0.5 + 0.6) / 2 + 0.6 (flat beyond the last vertex) = 1.5, over a range of 3
    assert aiq(v, 1, 4) == pytest.approx(0.5)
    assert cost_to_reach(v, 0.57) == pytest.approx(2.7)  # on the segment (2, .5) -> (3, .6)
    assert (cost_to_reach(v, 0.1), cost_to_reach(v, 0.7)) == (1, None)


def test_report_carries_the_quality_cost_curve():
    rep = _report(costs={"a": 1.0, "b": 4.0}, lam=0.5)
    c = rep.curve
    assert rep.costs == c.costs == {"a": 1.0, "b": 4.0} and rep.curve_note is None
    # lambda 0 routes a, b, b (cost 3, reward 4/3); a middle lambda moves q2 to a (cost 2, reward 2); a large one
    # sends all to a (cost 1, reward 4/3). The router's hull is (1, 4/3) -> (2, 2), flat after.
    assert (c.router[0].lam, c.router[0].cost, c.router[0].reward) == (0.0, 3.0, pytest.approx(4 / 3))
    assert {(p.cost, round(p.reward, 6)) for p in c.router} == {(3.0, 1.333333), (2.0, 2.0), (1.0, 1.333333)}
    assert (c.router[-1].cost, c.router[-1].share) == (1.0, {"a": 1.0, "b": 0.0})
    assert c.aiq["router"] == pytest.approx(((4 / 3 + 2) / 2 + 2 * 2) / 3)
    assert c.aiq["random_mix"] == pytest.approx(4 / 3)  # b costs more and earns less: mixing never helps
    assert c.experts["b"].model_dump() == {"cost": 4.0, "reward": 1.0, "lam": None, "share": {}}
    assert c.target == pytest.approx(0.95 * 4 / 3)  # best single (train): a
    assert c.cost_to_target == {"router": 1.0, "random_mix": 1.0, "best_single": 1.0}
    assert (c.operating.lam, c.operating.cost, c.operating.reward) == (0.5, 2.0, 2.0)
    md = to_markdown(rep)
    assert "| router (lambda 0.5, config) | 0.5 | 2 | 2.0000 | 67% | 33% |" in md
    assert f"AIQ (mean reward over the cost range 1-4): router {c.aiq['router']:.4f}, random_mix 1.3333" in md
    assert plot_cost_curve(c, rep.lam)[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_curve_without_costs_or_with_equal_costs_and_old_reports_read():
    assert _report().curve is None and "no expert costs" in to_markdown(_report())
    same = _report(costs={"a": 2.0, "b": 2.0})
    assert same.curve is None and "every expert costs the same" in same.curve_note
    old = _report().model_dump(mode="json")
    for k in ("costs", "lam", "curve", "curve_note"):
        del old[k]
    assert EvalReport.model_validate(old).curve is None


def test_expert_costs_from_either_config():
    flow = FlowConfig.model_validate({"store": "s", "data": {"path": "q.jsonl"}, "reward_models": [
        {"name": "v", "kind": "verifiable"}], "experts": [{"name": "a", "model": "m", "cost": 7}, {"name": "b",
                                                                                                   "model": "m"}]})
    assert flow.expert_costs() == {"a": 7.0}  # incomplete: run_evaluate names b
    train = TrainConfig.model_validate({"store": "s", "routing": {"lambda": 0.1, "costs": {"org/x-7B": 7}}})
    assert (train.expert_costs(), train.routing.lam) == ({"org/x-7B": 7.0}, 0.1)
    assert TrainConfig.model_validate({"store": "s"}).expert_costs() is None


def test_validation_slice_numbers_by_hand_and_in_the_report():
    val = _labels([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]], [["x"], ["y"], ["y"]])
    train = _labels([[1.0, 0.0], [1.0, 0.5]], [["x"], ["y"]])  # a is the best single expert on train
    v = validate(val, train, np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]]), seed=3)  # picks a, a, b
    assert (v.queries, v.seed) == (3, 3)
    assert v.reward == pytest.approx((1 + 0 + 1) / 3)
    assert v.tag_average == pytest.approx((1.0 + 0.5) / 2)  # x: 1; y: (0 + 1) / 2
    assert v.best_single == pytest.approx(1 / 3)
    assert validate(val.clear(), train, np.zeros((0, 2)), seed=0).reward is None
    rep = _report(validation=v)
    assert rep.val_reward == v.reward and rep.router_reward != v.reward
    assert EvalReport.model_validate_json(rep.model_dump_json()).validation == v
    assert "Validation slice (3 training queries held out by seed 3" in to_markdown(rep)
    assert _report().val_reward is None  # reports from before evaluation code 3


def test_held_out_scores_come_from_aggregate_and_equal_a_scan_of_the_score_cells(tmp_path, caplog):
    store = Store(str(tmp_path))
    experts, shards = [("a", "fa"), ("b", "fb")], [0, 1]
    sources = [ScoreSource("rm", "r1", 1.0), ScoreSource("judge", "j1", 0.5)]
    for s in shards:
        ids = [f"q{s}{i}" for i in range(4)]
        store.write_table(queries_path(s), pa.table({
            "query_id": ids, "text": ids, "input_tags": [[]] * 4, "reference": [None] * 4,
            "split": ["train", "test", "test", None], "source_line": [1, 2, 3, 4]}), QUERIES)
        store.write_table(tags_path("tg", s), pa.table({"query_id": ids, "tags": [["t"]] * 4}), TAGS)
        for src in sources:
            for e, efp in experts:
                store.write_table(score_path(src.rm, src.rm_fp, e, efp, s), pa.table({
                    "query_id": ids, "score": [None if src.rm == "judge" and i == 1 else float(i + s + len(e))
                                               for i in range(4)], "flag": [None] * 4}), SCORES)
    labels_fp = run_aggregate(store, experts, sources, "tg", shards, AggregateConfig(), 0.5).fingerprint
    labels = pl.from_arrow(store.read_table(labels_path(labels_fp), LABELS))
    test = labels.filter(pl.col("split") == "test")
    cols = ["query_id", "expert", "rm"]
    scanned = (scan_scores(store, experts, sources, shards).join(test.lazy().select("query_id"), on="query_id")
               .select(*cols, "score").collect().sort(cols))
    assert scanned.height == test.height * 4 and scanned["score"].null_count() == 2 * len(shards)

    caplog.set_level("INFO", logger="zooter.evaluate")
    from_file = held_out_scores(store, labels_fp, test, experts, sources, shards).sort(cols)
    assert from_file.equals(scanned) and not caplog.records  # the file aggregate wrote, not the cells
    # other RMs than the labels were made from: not that file (its name says which cells it holds)
    one = held_out_scores(store, labels_fp, test, experts, sources[:1], shards)
    assert set(one["rm"]) == {"rm"} and "missing" in caplog.text
    # labels written before the file existed (or by other code): the score cells, the same frame
    store.delete(held_out_scores_path(labels_fp, scores_key(experts, sources, shards)))
    assert held_out_scores(store, labels_fp, test, experts, sources, shards).sort(cols).equals(scanned)
