"""traffic: what the recording gateway wrote (schemas/traffic.py) as new query shards and as feedback rewards.

- `ingest_traffic` (`zooter relabel --traffic`): the recorded queries that no shard holds yet, deduplicated by a
  hash of their text against every shard's texts (whatever ids the data file gave them), appended as new shards
  (`tasks.ingest.write_shards`: existing shards never change). Their id is that hash, their tags none, their
  `source_line` 0 (no input file). The relabel flow then computes only their cells.
- `feedback_scores` (a `kind: feedback` reward model): per (query, expert that answered) the mean of its requests'
  feedback, each request's latest feedback counting once. `feedback_identity` names the feedback files the scores
  came from: it is the reward model's weights identity, so new feedback re-fingerprints its cells.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import polars as pl

from schemas.artifacts import queries_path
from schemas.store import Store
from schemas.traffic import FEEDBACK_DIR, REQUESTS_DIR
from tasks.ingest import IngestResult, store_shards, text_id, write_shards


def batch_files(store: Store, folder: str) -> list[str]:
    """The batch files under `folder` (store-relative), oldest first; temp files of a write under way are not."""
    return [f"{folder}/{n}" for n in store.ls(folder) if n.endswith(".parquet") and not n.startswith(".")]


def read_requests(store: Store) -> pl.DataFrame:
    """Every recorded request (REQUESTS columns), empty when nothing was recorded."""
    files = batch_files(store, REQUESTS_DIR)
    if not files:
        return pl.DataFrame(schema={"request_id": pl.String, "time": pl.Datetime("us", "UTC"), "text": pl.String,
                                    "query_id": pl.String, "expert": pl.String})
    return store.scan(files).select("request_id", "time", "text", "query_id", "expert").collect()


def traffic_queries(store: Store, since: dt.datetime | None = None, limit: int | None = None) -> pl.DataFrame:
    """Recorded queries (routed at or after `since`) that no shard holds yet, at most `limit`, first routed first;
    in ingest's columns (QUERIES without split)."""
    req = read_requests(store)
    if since is not None:
        since = since.replace(tzinfo=dt.UTC) if since.tzinfo is None else since.astimezone(dt.UTC)  # naive: UTC
        req = req.filter(pl.col("time") >= since)
    new = req.sort("time").unique("query_id", keep="first", maintain_order=True)
    shards = store_shards(store)
    if shards and new.height:
        stored = store.scan([queries_path(s) for s in shards]).select("text").collect()
        hashes = pl.DataFrame({"query_id": [text_id(t) for t in stored["text"]]}, schema={"query_id": pl.String})
        new = new.join(hashes, on="query_id", how="anti")
    if limit is not None:
        new = new.head(limit)
    return new.select("query_id", "text", pl.lit(0, pl.Int64).alias("source_line"),
                      pl.lit([], pl.List(pl.String)).alias("input_tags"), pl.lit(None, pl.String).alias("reference"))


@dataclass(frozen=True)
class TrafficIngest:
    recorded: int  # requests recorded in the store
    added: int  # new queries written as shards by this call
    new_shards: list[int]


def ingest_traffic(store: Store, shard_size: int, since: dt.datetime | None = None,
                   limit: int | None = None) -> TrafficIngest:
    """Append the recorded queries no shard holds yet as new shards (a rerun adds nothing)."""
    queries = traffic_queries(store, since, limit)
    res: IngestResult | None = write_shards(store, queries, shard_size) if queries.height else None
    return TrafficIngest(len(read_requests(store)), res.n_new if res else 0, res.new_shards if res else [])


def read_feedback(store: Store) -> pl.DataFrame:
    files = batch_files(store, FEEDBACK_DIR)
    if not files:
        return pl.DataFrame(schema={"request_id": pl.String, "time": pl.Datetime("us", "UTC"), "score": pl.Float64,
                                    "query_id": pl.String, "expert": pl.String})
    return store.scan(files).collect()


def feedback_scores(store: Store) -> pl.DataFrame:
    """(query_id, expert, score): the mean over the pair's requests of each request's latest feedback."""
    fb = read_feedback(store).sort("time").unique("request_id", keep="last")
    return fb.group_by("query_id", "expert").agg(pl.col("score").mean())


def feedback_identity(store: Store) -> str:
    """Which feedback there is: a hash of the feedback files' names (a file never changes once written)."""
    names = "\n".join(batch_files(store, FEEDBACK_DIR))
    return f"feedback:{hashlib.sha256(names.encode()).hexdigest()[:16]}"
