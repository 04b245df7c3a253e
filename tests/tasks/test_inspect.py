"""inspect on a store written by hand: runs, the cell matrix with flags, the label summary, the champion."""

import pyarrow as pa
import pytest

from schemas.artifacts import (
    CHAMPION_PATH,
    GENERATIONS,
    LABELS,
    SCORES,
    generation_path,
    labels_path,
    report_path,
    run_manifest_path,
    score_path,
)
from schemas.errors import ArtifactError, ConfigError
from schemas.evaluation import Champion, EvalReport, StrategyRow
from schemas.manifest import RunManifest, StageRecord
from schemas.store import Store
from tasks.inspect import cell_matrix, inspect_store, label_summary

GEN = {"a": "ga", "b": "gb"}


def gen_cell(store, expert, shard, fp):
    store.write_table(generation_path(expert, GEN[expert], shard), pa.table({
        "query_id": ["q"], "response": ["r"], "prompt_tokens": [1], "new_tokens": [1], "finish_reason": ["stop"]}),
        GENERATIONS, {"fingerprint": fp})


def score_cell(store, expert, shard, flags):
    store.write_table(score_path("rm", "s1", expert, GEN[expert], shard),
                      pa.table({"query_id": ["q"], "score": [1.0], "flag": [None]}, schema=SCORES),
                      SCORES, {"fingerprint": "s1", "flags": flags})


def manifest(run_id: str, status: str, labels: str | None = None) -> dict:
    m = RunManifest(run_id=run_id, flow="label", status=status, started=f"2025-01-0{run_id[-1]}T00:00:00",
                    config={}, shards=[0, 1], queries=2, labels=labels,
                    generate=[StageRecord(name=e, fingerprint=fp, cells_computed=1) for e, fp in GEN.items()],
                    score=[StageRecord(name="rm", fingerprint="s1", cells_reused=2, flags={"nonfinite": 1})])
    return m.model_dump(mode="json")


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "store"))
    gen_cell(s, "a", 0, "ga")
    gen_cell(s, "a", 1, "ga")
    gen_cell(s, "b", 0, "stale")  # another fingerprint: not this run's cell
    score_cell(s, "a", 0, {"empty_response": 1, "nonfinite": 0})
    score_cell(s, "a", 1, {"empty_response": 2})
    score_cell(s, "b", 0, {})
    s.write_table(labels_path("l1"), pa.table({
        "query_id": ["q1", "q2", "q3", "q4"], "text": ["1", "2", "3", "4"], "split": ["train"] * 4,
        "tags": [["math"], ["math", "code"], [], ["code"]],
        "rewards": [[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [0.0, 0.0]],
        "soft": [[0.5, 0.5]] * 4, "target": [[0.8, 0.2], [0.4, 0.6], [0.9, 0.1], [0.5, 0.5]]}),
        LABELS, {"fingerprint": "l1", "experts": ["a", "b"]})
    s.write_json(run_manifest_path("run-1"), manifest("run-1", "completed", "l1"))
    s.write_json(run_manifest_path("run-2"), manifest("run-2", "failed"))
    return s


def test_cell_matrix_marks_done_and_missing_cells_and_sums_flags(store):
    m = cell_matrix(store, manifest("run-1", "completed"))
    assert m["shards"] == [0, 1]
    assert m["generations"] == {"a": [True, True], "b": [False, False]}
    assert m["scores"] == {"rm": {"a": [True, True], "b": [True, False]}}
    assert m["flags"] == [{"reward_model": "rm", "expert": "a", "empty_response": 3, "nonfinite": 0}]


def test_label_summary_hand_computed(store):
    s = label_summary(store, "l1")
    assert s["rows"] == 4
    # winners by reward: a, b, a, a (a tie goes to the first expert)
    assert s["experts"] == [{"expert": "a", "mean_reward": 1.0, "win_rate": 0.75},
                            {"expert": "b", "mean_reward": 0.75, "win_rate": 0.25}]
    assert s["tag_target"] == [{"tag": "code", "n": 2, "a": pytest.approx(0.45), "b": pytest.approx(0.55)},
                               {"tag": "math", "n": 2, "a": pytest.approx(0.6), "b": pytest.approx(0.4)}]


def test_inspect_store_picks_the_last_completed_run_and_shows_the_champion(store):
    out = inspect_store(store)
    assert [r["run_id"] for r in out["runs"]] == ["run-1", "run-2"]
    assert out["runs"][0] | {"seconds": None} == {
        "run_id": "run-1", "status": "completed", "error": None, "started": "2025-01-01T00:00:00", "queries": 2,
        "cells_computed": 2, "cells_reused": 2, "cells_repaired": 0, "flagged": 1, "failed": 0, "labels": "l1",
        "router": None, "seconds": None}
    assert out["run"] == "run-1" and out["labels"]["rows"] == 4 and "champion" not in out
    assert inspect_store(store, "run-2")["run"] == "run-2"

    champ = Champion(router="routers/r1", evaluation="evaluations/e1", labels="l1", experts=["a", "b"], reward=1.0,
                     run_id="run-1", published="2025-01-01T00:00:00")
    store.write_json(CHAMPION_PATH, champ.model_dump(mode="json"))
    assert inspect_store(store)["champion"]["report"] is None  # its report is gone: the champion still shows
    row = StrategyRow(strategy="router", reward=1.0, rm={"rm": 0.5}, expert_calls=1, rm_calls=0)
    store.write_json(report_path("e1"), EvalReport(
        evaluation="e1", labels="l1", router="r1", experts=["a", "b"], test_queries=1, best_single="a", rows=[row],
        router_share={"a": 1.0, "b": 0.0}).model_dump(mode="json"))
    c = inspect_store(store)["champion"]
    assert (c["router"], c["reward"], c["report"]) == ("routers/r1", 1.0, [row.model_dump(mode="json")])


def test_inspect_errors(tmp_path, store):
    with pytest.raises(ArtifactError, match="no runs in this store"):
        inspect_store(Store(str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"--run 'run-9': not in .*runs are \['run-1', 'run-2'\]"):
        inspect_store(store, "run-9")


def test_tag_summary_counts_tags_and_an_llm_taggers_parse_failures(store):
    from schemas.artifacts import TAGS, tags_path
    from tasks.inspect import tag_summary

    for shard, (ids, tags, failures) in enumerate([(["q1", "q2"], [["math"], ["math", "code"]], 1),
                                                   (["q3"], [[]], 2)]):
        store.write_table(tags_path("llm-1", shard), pa.table({"query_id": ids, "tags": tags}, schema=TAGS), TAGS,
                          {"fingerprint": "llm-1", "tagger": "llm", "expert": "a", "source": "llmraw-1",
                           "flags": {"parse_failure": failures}})
    assert tag_summary(store, "llm-1", [0, 1]) == {
        "fingerprint": "llm-1", "cells": 2, "queries": 3, "tagged": 2, "vocabulary": 2,
        "top": [{"tag": "math", "n": 2}, {"tag": "code", "n": 1}], "parse_failures": 3, "tagger": "llm",
        "expert": "a", "source": "llmraw-1"}
    assert tag_summary(store, "other", [0]) == {"fingerprint": "other", "cells": 0}
    m = manifest("run-3", "completed") | {"tagger": "llm-1", "started": "2025-01-03T00:00:00"}
    store.write_json(run_manifest_path("run-3"), m)
    assert inspect_store(store)["tags"]["top"][0] == {"tag": "math", "n": 2}  # the latest completed run's tags


def test_inspect_counts_rows_that_failed_alone(store):
    """The manifest's per-stage failed rows in the run summary, the cells' failed rows with the first error, and the
    queries the labels left out (docs/failures.md#row-failures)."""
    store.write_table(generation_path("a", "ga", 1), pa.table({
        "query_id": ["q"], "response": [""], "prompt_tokens": [0], "new_tokens": [0], "finish_reason": ["error"]}),
        GENERATIONS, {"fingerprint": "ga", "failed": 1, "errors": [["q", "ValueError: bad token"]]})
    m = manifest("run-3", "completed", "l1")
    m["generate"][0] |= {"failed": 1, "first_error": "query q: ValueError: bad token"}
    store.write_json(run_manifest_path("run-3"), m)
    labels = store.read_table(labels_path("l1"), LABELS)
    store.write_table(labels_path("l1"), labels, LABELS, {"fingerprint": "l1", "experts": ["a", "b"], "left_out": 1})
    out = inspect_store(store, "run-3")
    assert [r["failed"] for r in out["runs"]] == [0, 0, 1]
    assert out["cells"]["failed"] == [{"stage": "generate", "name": "a", "rows": 1,
                                       "first_error": "query q: ValueError: bad token"}]
    assert out["labels"]["left_out"] == 1
