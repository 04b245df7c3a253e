"""Recording served traffic (`zooter gateway --record`) and the feedback endpoint.

`Traffic` owns two batchers (`Batches`): routed requests and feedback, written under the store's `traffic/`
(schemas/traffic.py). A batch is written as one Parquet file, atomically (the store's temp + rename, or one PUT),
when it holds `batch_rows` rows or its first row is `flush_s` old, and when the gateway stops: uvicorn turns SIGTERM
and SIGINT into a shutdown that runs the app's lifespan exit, which writes what is pending. A failed write keeps
the batch and retries it under the same name (a retry that had in fact landed rewrites the same file). Only a
SIGKILL or a crash loses the pending rows: at most `batch_rows`, at most `flush_s` old.

`POST /v1/feedback` takes `{request_id, score}` (in [-1, 1]) or `{request_id, thumbs: up|down}` for a request this
store recorded: one this process routed (kept in memory, the last `remember` of them) or, failing that, one in the
store's request files (read then). Unknown ids are a 404, malformed bodies a 400, both in the OpenAI error shape.

Each time `relabel_after` new queries (distinct texts since the last event) are on the store, the recorder emits
`zooter.traffic.recorded` (resource `zooter.store.<url>`, payload `store`, `config_url`, `queries`): the relabel
deployment's trigger runs `relabel --traffic` on it (flows/deploy.py). No Prefect API, no event, nothing else lost.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import polars as pl
import pyarrow as pa
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from gateway.errors import GatewayError
from gateway.routers import Decision
from schemas.config import load_config
from schemas.store import Store
from schemas.traffic import EVENT, FEEDBACK, FEEDBACK_DIR, REQUESTS, REQUESTS_DIR, batch_name
from tasks.experts import CURRENT
from tasks.ingest import text_id
from tasks.traffic import batch_files

log = logging.getLogger("zooter.gateway")


class Batches:
    """Rows appended from any thread, written as one Parquet file per batch by a background thread."""

    def __init__(self, store: Store, folder: str, schema: pa.Schema, batch_rows: int, flush_s: float,
                 written: Callable[[list[dict]], None] | None = None):
        self.store, self.folder, self.schema = store, folder, schema
        self.batch_rows, self.flush_s, self._written = batch_rows, flush_s, written
        self._rows: list[dict] = []
        self._started: dt.datetime | None = None  # the pending batch's first row
        self._failed: list[tuple[str, list[dict]]] = []  # batches whose write failed, retried first
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"zooter-record-{folder}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, row: dict) -> None:
        with self._lock:
            if self._started is None:
                self._started = dt.datetime.now(dt.UTC)
            self._rows.append(row)
            if len(self._rows) >= self.batch_rows:
                self._wake.set()

    def pending(self) -> list[dict]:
        with self._lock:
            return [r for _, rows in self._failed for r in rows] + list(self._rows)

    def _take(self, force: bool) -> list[tuple[str, list[dict]]]:
        with self._lock:
            out, self._failed = self._failed, []
            due = self._started is not None and (
                force or len(self._rows) >= self.batch_rows
                or (dt.datetime.now(dt.UTC) - self._started).total_seconds() >= self.flush_s)
            if due:
                out.append((f"{self.folder}/{batch_name(self._started)}", self._rows))
                self._rows, self._started = [], None
            return out

    def flush(self, force: bool = True) -> None:
        """Write the due batches (every pending one with `force`); a failed write is kept for the next try."""
        for rel, rows in self._take(force):
            try:
                self.store.write_table(rel, pa.Table.from_pylist(rows, self.schema), self.schema,
                                       {"stage": self.folder, "rows": len(rows)})
            except Exception as e:  # noqa: BLE001 - keep the rows; the next flush retries them
                log.warning("recording: could not write %s (%d rows kept, retried): %s", rel, len(rows), e)
                with self._lock:
                    self._failed.append((rel, rows))
                continue
            if self._written is not None:
                self._written(rows)

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(min(self.flush_s, 1.0))
            self._wake.clear()
            if not self._stop:
                self.flush(force=False)

    def close(self) -> None:
        """Stop the thread and write everything pending (what shutdown, SIGTERM included, runs)."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush(force=True)
        if self._failed:  # one more try, then say what is lost
            self.flush(force=True)
            lost = sum(len(r) for _, r in self._failed)
            if lost:
                log.error("recording: %d rows could not be written to %s", lost, self.store.uri(self.folder))


class Feedback(BaseModel):
    """The body of `POST /v1/feedback`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_id: str = Field(min_length=1, max_length=128, description="The x-zooter-request-id of the answer.")
    score: float | None = Field(None, ge=-1, le=1, strict=True, description="How good the answer was, in [-1, 1].")
    thumbs: Literal["up", "down"] | None = Field(None, description="Instead of score: up = 1, down = -1.")

    @model_validator(mode="after")
    def _one(self) -> Feedback:
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give exactly one of score (in [-1, 1]) and thumbs (up or down)")
        return self

    @property
    def value(self) -> float:
        return self.score if self.score is not None else 1.0 if self.thumbs == "up" else -1.0


class Traffic:
    """What `--record` keeps: requests and feedback (see the module docstring)."""

    def __init__(self, store: Store, batch_rows: int = 256, flush_s: float = 10.0, remember: int = 100_000,
                 relabel_after: int | None = None, config_url: str | None = None):
        self.store, self.remember = store, remember
        self.relabel_after, self.config_url = relabel_after, config_url
        self.requests = Batches(store, REQUESTS_DIR, REQUESTS, batch_rows, flush_s, self._requests_written)
        self.feedback = Batches(store, FEEDBACK_DIR, FEEDBACK, batch_rows, flush_s)
        self._recent: OrderedDict[str, tuple[str, str]] = OrderedDict()  # request id -> (query id, expert)
        self._lock = threading.Lock()
        self._new: set[str] = set()  # query ids written since the last event
        self._context = contextvars.copy_context()  # the settings (Prefect's API) of whoever made the recorder

    @classmethod
    def of(cls, store: Store, batch_rows: int = 256, flush_s: float = 10.0) -> Traffic:
        """A recorder for `store`, with `traffic.relabel_after` from its published config (configs/current.yaml,
        which the triggered relabel run reads too); no event without one."""
        url = store.uri(CURRENT) if store.exists(CURRENT) else None
        after = load_config(url).traffic.relabel_after if url else None
        return cls(store, batch_rows, flush_s, relabel_after=after, config_url=url)

    def start(self) -> None:
        self.requests.start()
        self.feedback.start()

    def close(self) -> None:
        self.requests.close()
        self.feedback.close()

    def record(self, d: Decision, text: str, endpoint: str) -> str:
        """Keep one routed request; returns its id (the gateway answers it in x-zooter-request-id)."""
        rid = f"zr-{secrets.token_hex(12)}"
        qid = text_id(text)
        self.requests.add({"request_id": rid, "time": dt.datetime.now(dt.UTC), "endpoint": endpoint, "text": text,
                           "query_id": qid, "router": d.router, "expert": d.expert, "experts": list(d.probs),
                           "probs": list(d.probs.values()), "lambda": float(d.lam)})
        with self._lock:
            self._recent[rid] = (qid, d.expert)
            while len(self._recent) > self.remember:
                self._recent.popitem(last=False)
        return rid

    def lookup(self, rid: str) -> tuple[str, str] | None:
        """(query id, expert) of a recorded request, or None (blocking: reads the store on a miss)."""
        with self._lock:
            if rid in self._recent:
                return self._recent[rid]
        files = batch_files(self.store, REQUESTS_DIR)
        if files:
            hit = (self.store.scan(files).filter(pl.col("request_id") == rid).select("query_id", "expert")
                   .head(1).collect())
            if hit.height:
                return hit.row(0)
        return None

    def add_feedback(self, fb: Feedback) -> dict:
        found = self.lookup(fb.request_id)
        if found is None:
            raise GatewayError(404, f"request_id {fb.request_id!r}: no request with this id was recorded",
                               "request_not_found", "request_id")
        qid, expert = found
        self.feedback.add({"request_id": fb.request_id, "time": dt.datetime.now(dt.UTC), "score": fb.value,
                           "query_id": qid, "expert": expert})
        return {"object": "feedback", "request_id": fb.request_id, "score": fb.value, "expert": expert}

    def _requests_written(self, rows: list[dict]) -> None:
        if self.relabel_after is None:
            return
        with self._lock:
            self._new.update(r["query_id"] for r in rows)
            if len(self._new) < self.relabel_after:
                return
            n, self._new = len(self._new), set()
        why = self._context.copy().run(emit_recorded, self.store, self.config_url, n)
        if why is None:
            log.info("emitted %s (%d new queries)", EVENT, n)
        else:
            log.warning("%s not emitted: %s", EVENT, why)


def emit_recorded(store: Store, config_url: str | None, queries: int) -> str | None:
    """Emit `zooter.traffic.recorded` for this store; None when sent, else why not."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return "PREFECT_API_URL is not set: no Prefect API to send the event to"
    if config_url is None:
        return "the store has no published config (zooter publish-config) for the relabel run to read"
    event = emit_event(EVENT, resource={"prefect.resource.id": f"zooter.store.{store.url}"},
                       related=[{"prefect.resource.id": f"zooter.config.{config_url}",
                                 "prefect.resource.role": "config"}],
                       payload={"store": store.url, "config_url": config_url, "queries": queries})
    EventsWorker.drain_all(timeout=30)
    return None if event is not None else "Prefect did not accept the event (events are disabled)"


def feedback_router(traffic: Traffic | None) -> APIRouter:
    """`POST /v1/feedback` (a 404 for every id when the gateway does not record)."""
    router = APIRouter()

    @router.post("/v1/feedback")
    async def feedback(request: Request) -> dict:
        try:
            raw = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GatewayError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
        try:
            fb = Feedback.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(map(str, err["loc"])) or None
            msg = err["msg"].removeprefix("Value error, ")
            raise GatewayError(400, f"{where}: {msg}" if where else msg, "invalid_value", where) from None
        if traffic is None:
            raise GatewayError(404, f"request_id {fb.request_id!r}: this gateway does not record requests "
                               "(start it with --record)", "request_not_found", "request_id")
        return await run_in_threadpool(traffic.add_feedback, fb)

    return router
