"""tasks/traffic.py on inline batches: recorded queries into new shards (deduplicated by text hash against every
shard, whatever ids the data file gave), --since and --max, a rerun adds nothing; feedback scores count each
request's latest feedback once; the feedback identity moves with new feedback."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pyarrow as pa

from schemas.artifacts import QUERIES, queries_path
from schemas.store import Store
from schemas.traffic import FEEDBACK, FEEDBACK_DIR, REQUESTS, REQUESTS_DIR, batch_name
from tasks.ingest import store_shards, text_id
from tasks.traffic import feedback_identity, feedback_scores, ingest_traffic, traffic_queries

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def _requests(store: Store, texts: list[str], start: dt.datetime, expert: str = "a") -> None:
    rows = [{"request_id": f"r-{start:%H%M}-{i}", "time": start + dt.timedelta(seconds=i), "endpoint": "chat",
             "text": t, "query_id": text_id(t), "router": "f0", "expert": expert, "experts": ["a", "b"],
             "probs": [0.7, 0.3], "lambda": 0.0} for i, t in enumerate(texts)]
    store.write_table(f"{REQUESTS_DIR}/{batch_name(start)}", pa.Table.from_pylist(rows, REQUESTS), REQUESTS)


def _feedback(store: Store, rows: list[tuple[str, float, str, str, int]]) -> None:
    table = pa.Table.from_pylist([{"request_id": r, "time": T0 + dt.timedelta(minutes=m), "score": s,
                                   "query_id": text_id(q), "expert": e} for r, s, q, e, m in rows], FEEDBACK)
    store.write_table(f"{FEEDBACK_DIR}/{batch_name(T0)}", table, FEEDBACK)


def test_recorded_queries_become_new_shards_once(tmp_path):
    store = Store(str(tmp_path / "store"))
    # a data-file shard whose ids are not text hashes: its texts still count as stored
    store.write_table(queries_path(0), pa.Table.from_pylist(
        [{"query_id": "q1", "text": "known one", "input_tags": [], "reference": None, "split": None,
          "source_line": 1}], QUERIES), QUERIES)
    _requests(store, ["known one", "new one", "new two", "new one"], T0)
    _requests(store, ["new three", "new four"], T0 + dt.timedelta(hours=1))

    assert traffic_queries(store)["text"].to_list() == ["new one", "new two", "new three", "new four"]
    later = traffic_queries(store, since=(T0 + dt.timedelta(minutes=30)).replace(tzinfo=None))  # naive: UTC
    assert later["text"].to_list() == ["new three", "new four"]
    assert traffic_queries(store, limit=1)["text"].to_list() == ["new one"]

    got = ingest_traffic(store, shard_size=2, limit=3)
    assert (got.recorded, got.added, got.new_shards) == (6, 3, [1, 2])
    stored = store.scan([queries_path(s) for s in store_shards(store)]).collect()
    new = stored.filter(pl.col("source_line") == 0)
    assert new["text"].to_list() == ["new one", "new two", "new three"]
    assert new["query_id"].to_list() == [text_id(t) for t in new["text"]]
    assert ingest_traffic(store, 2).added == 1 and ingest_traffic(store, 2).added == 0  # "new four", then nothing
    assert store_shards(store) == [0, 1, 2, 3]


def test_feedback_scores_latest_per_request_then_mean_per_pair(tmp_path):
    store = Store(str(tmp_path / "store"))
    assert feedback_scores(store).height == 0
    empty = feedback_identity(store)
    _feedback(store, [("r1", 1.0, "q", "a", 0), ("r1", -1.0, "q", "a", 5),  # r1 changed its mind: -1 counts
                      ("r2", 0.5, "q", "a", 1), ("r3", 1.0, "q", "b", 2), ("r4", 1.0, "other", "a", 3)])
    got = {(r["query_id"], r["expert"]): r["score"] for r in feedback_scores(store).iter_rows(named=True)}
    assert got == {(text_id("q"), "a"): -0.25, (text_id("q"), "b"): 1.0, (text_id("other"), "a"): 1.0}
    assert feedback_identity(store) != empty
