"""The labels plan (`label_plans`, what run_aggregate collects) on Polars' streaming engine gives the same labels as
the in-memory engine (to rounding), over real score cells (several shards, two reward models with null scores,
queries without tags)."""

import numpy as np
import pyarrow as pa
import pytest

from schemas.artifacts import QUERIES, SCORES, TAGS, queries_path, score_path, tags_path
from schemas.config import AggregateConfig
from schemas.store import Store
from tasks.aggregate import ScoreSource, label_plans

EXPERTS = [("a", "fa"), ("b", "fb"), ("c", "fc")]
SOURCES = [ScoreSource("judge", "fj", 1.0), ScoreSource("exact", "fx", 0.5)]


def _store(tmp_path, shards: int = 3, n: int = 40) -> Store:
    store, rng = Store(str(tmp_path / "store")), np.random.default_rng(7)
    for s in range(shards):
        ids = [f"q{s}-{i:03d}" for i in range(n)]
        store.write_table(queries_path(s), pa.table({
            "query_id": ids, "text": ids, "input_tags": [[]] * n, "reference": [None] * n,
            "split": [None] * n, "source_line": list(range(n))}), QUERIES)
        store.write_table(tags_path("tg", s), pa.table({
            "query_id": ids, "tags": [[f"t{j}" for j in rng.choice(5, k, replace=False)]
                                      for k in rng.integers(0, 3, n)]}), TAGS)
        for src in SOURCES:
            for e, efp in EXPERTS:
                null = rng.random(n) < (0.1 if src.rm == "judge" else 0.8)
                store.write_table(score_path(src.rm, src.rm_fp, e, efp, s), pa.table({
                    "query_id": ids, "score": pa.array(rng.normal(size=n), mask=null),
                    "flag": [None] * n}), SCORES)
    return store


@pytest.mark.parametrize("tag_temperature", [None, 0.5])
def test_streaming_engine_gives_the_same_labels(tmp_path, tag_temperature):
    store = _store(tmp_path)
    agg = AggregateConfig(beta=0.3, tag_temperature=tag_temperature)
    plan = label_plans(store, EXPERTS, SOURCES, "tg", [0, 1, 2], agg, 0.25)[0]
    base, stream = plan.collect(engine="in-memory"), plan.collect(engine="streaming")
    assert base.height == 120 and base["query_id"].is_sorted()
    assert base.drop("rewards", "soft", "target").equals(stream.drop("rewards", "soft", "target"))
    for c in ("rewards", "soft", "target"):  # the engines may sum in another order: equal to rounding
        assert stream[c].explode().to_numpy() == pytest.approx(base[c].explode().to_numpy(), abs=1e-12)
    assert base["target"].list.sum().to_numpy() == pytest.approx(1.0)
