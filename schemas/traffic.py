"""Served traffic in the store: what `zooter gateway --record` writes under `traffic/`, and its pyarrow schemas.

- `traffic/requests/<UTC time>-<id>.parquet`: one row per routed request (REQUESTS); a batch per file, written
  atomically when the batch is full or old enough, and when the gateway stops.
- `traffic/feedback/<UTC time>-<id>.parquet`: one row per `POST /v1/feedback` (FEEDBACK), batched the same way;
  it carries the request's query id and expert, so a `kind: feedback` reward model reads these files alone.

Files never change once written; names sort by the time their batch started. Nothing else about a request is kept:
no headers, keys, client addresses or answers. Deleting `traffic/` deletes all of it (labels already computed from
it stay in queries/ and scores/ until the store is relabelled without it).
"""

from __future__ import annotations

import datetime as dt
import uuid

import pyarrow as pa

EVENT = "zooter.traffic.recorded"  # what the recording gateway emits; the relabel deployment's trigger listens
TRAFFIC = "traffic"
REQUESTS_DIR = f"{TRAFFIC}/requests"
FEEDBACK_DIR = f"{TRAFFIC}/feedback"

REQUESTS = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),  # what the gateway answered in x-zooter-request-id
    pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),  # when the request was routed
    pa.field("endpoint", pa.string(), nullable=False),  # "chat" or "route"
    pa.field("text", pa.string(), nullable=False),  # the query the router read (the last user message)
    pa.field("query_id", pa.string(), nullable=False),  # tasks.ingest.text_id(text): how shards name it
    pa.field("router", pa.string(), nullable=False),  # the router's fingerprint
    pa.field("expert", pa.string(), nullable=False),  # the expert chosen
    pa.field("experts", pa.list_(pa.string()), nullable=False),  # the router's experts, in output order
    pa.field("probs", pa.list_(pa.float64()), nullable=False),  # its probabilities, in that order
    pa.field("lambda", pa.float64(), nullable=False),  # the cost weight the decision used
])

FEEDBACK = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),  # when the feedback arrived
    pa.field("score", pa.float64(), nullable=False),  # in [-1, 1]; thumbs up = 1, down = -1
    pa.field("query_id", pa.string(), nullable=False),  # the request's, copied when the feedback arrived
    pa.field("expert", pa.string(), nullable=False),  # the expert the request was routed to
])


def batch_name(started: dt.datetime) -> str:
    """A batch file's name: its start time (UTC, sortable) and a random suffix (several gateways, one store)."""
    return f"{started.astimezone(dt.UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:12]}.parquet"


def batch_time(name: str) -> dt.datetime | None:
    """The start time a batch file's name records (None for a name that is not a batch's)."""
    try:
        return dt.datetime.strptime(name.split("-")[0], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None
