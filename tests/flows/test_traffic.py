"""`zooter gateway --record` and `POST /v1/feedback` over real HTTP on 127.0.0.1: what is recorded (and what never
is), batches flushed by count, by time and on SIGTERM (a real `zooter gateway` subprocess), feedback's 400s and
404s in the OpenAI error shape, and nothing lost across a restart."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from gateway.app import create_app
from gateway.experts import load_endpoints
from gateway.routers import Routers
from gateway.traffic import Traffic
from schemas.store import Store
from schemas.traffic import FEEDBACK, FEEDBACK_DIR, REQUESTS, REQUESTS_DIR
from tasks.ingest import text_id
from tests.flows import test_gateway
from tests.flows.test_gateway import CHAT, KEY, free_port, serving

store_dir, experts = test_gateway.store_dir, test_gateway.experts  # the gateway tests' fixtures, used here too

ROOT = Path(__file__).resolve().parents[2]


def batches(store: Path, folder: str) -> list[Path]:
    d = store / folder
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def rows(store: Path, folder: str) -> list[dict]:
    return [r for p in batches(store, folder) for r in pq.read_table(p).to_pylist()]


@contextlib.contextmanager
def recording(store_dir: Path, experts: dict, tmp: Path, traffic: Traffic | None, **kw) -> Iterator[str]:
    """The gateway app on a store, recording into it with `traffic`; yields its root URL."""
    path = tmp / "experts.yaml"
    path.write_text(yaml.safe_dump(experts["file"]))
    store = Store(str(store_dir))
    os.environ[KEY] = "alpha-secret"
    try:
        app = create_app(Routers(store), load_endpoints(store, path), timeout_s=5.0, traffic=traffic, **kw)
    finally:
        del os.environ[KEY]
    with serving(app) as url:
        yield url


@pytest.fixture
def own_store(store_dir, tmp_path) -> Path:
    """A copy of the module's router store (recording writes into it)."""
    shutil.copytree(store_dir, tmp_path / "store")
    return tmp_path / "store"


def chat(url: str, text: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": "zooter", "messages": [*CHAT[:-1], {"role": "user", "content": text}]})


def test_recorded_requests_and_feedback(own_store, experts, tmp_path):
    traffic = Traffic(Store(str(own_store)), batch_rows=3, flush_s=600)
    with recording(own_store, experts, tmp_path, traffic, api_key="gw-secret-key") as url:
        auth = {"authorization": "Bearer gw-secret-key"}
        answers = [chat(url, t, **auth) for t in ("one question", "another question")]
        routed = httpx.post(f"{url}/v1/route", headers=auth, timeout=30,
                            json={"model": "zooter", "messages": [{"role": "user", "content": "route only"}]})
        assert [a.status_code for a in answers] == [200, 200] and routed.status_code == 200
        ids = [a.headers["x-zooter-request-id"] for a in answers] + [routed.json()["request_id"]]
        assert len(set(ids)) == 3
        # three rows: the batch is full, so the recorder writes it without waiting for its 600 s
        deadline = time.monotonic() + 20
        while not batches(own_store, REQUESTS_DIR):
            assert time.monotonic() < deadline, "the full batch was not written"
            time.sleep(0.05)
        (batch,) = batches(own_store, REQUESTS_DIR)
        assert pq.read_schema(batch).remove_metadata().equals(REQUESTS)
        got = pq.read_table(batch).to_pylist()
        assert [r["request_id"] for r in got] == ids
        assert [r["text"] for r in got] == ["one question", "another question", "route only"]
        assert [r["endpoint"] for r in got] == ["chat", "chat", "route"]
        assert all(r["router"] == "a1a1a1" and r["expert"] == "alpha" and r["experts"] == ["alpha", "beta"]
                   for r in got)
        assert got[0]["probs"] == pytest.approx([0.6, 0.4], abs=1e-4) and got[0]["query_id"] == text_id("one question")
        # never a header, a key, or an answer
        blob = batch.read_bytes()
        for secret in (b"gw-secret-key", b"alpha-secret", b"authorization", b"be brief", b"I am alpha"):
            assert secret not in blob

        def post(body: object, key: str | None = "gw-secret-key") -> httpx.Response:
            return httpx.post(f"{url}/v1/feedback", json=body, timeout=30,
                              headers={"authorization": f"Bearer {key}"} if key else {})

        ok = post({"request_id": ids[0], "thumbs": "down"})
        assert ok.status_code == 200 and ok.json() == {"object": "feedback", "request_id": ids[0], "score": -1.0,
                                                       "expert": "alpha"}
        assert post({"request_id": ids[2], "score": 0.5}).status_code == 200
        assert post({"request_id": ids[0], "score": 1}, key=None).status_code == 401
        missing = post({"request_id": "zr-nobody", "score": 1})
        assert missing.status_code == 404 and missing.json()["error"] == {
            "message": "request_id 'zr-nobody': no request with this id was recorded", "type": "invalid_request_error",
            "param": "request_id", "code": "request_not_found"}
        for body, param in [({"request_id": ids[0], "score": 1.5}, "score"), ({"request_id": ids[0]}, None),
                            ({"request_id": ids[0], "score": 1, "thumbs": "up"}, None),
                            ({"request_id": ids[0], "thumbs": "sideways"}, "thumbs"),
                            ({"request_id": ids[0], "score": "1"}, "score"), ({"score": 1}, "request_id"),
                            ({"request_id": ids[0], "score": 1, "comment": "x"}, "comment"), ([1], None)]:
            bad = post(body)
            assert bad.status_code == 400, body
            assert bad.json()["error"]["code"] == "invalid_value" and bad.json()["error"]["param"] == param, body
        assert httpx.post(f"{url}/v1/feedback", content=b"{not json", headers=auth).status_code == 400
        assert not batches(own_store, FEEDBACK_DIR)  # two rows pending: neither full nor old
    # shutdown wrote the pending feedback
    fb = rows(own_store, FEEDBACK_DIR)
    assert pq.read_schema(batches(own_store, FEEDBACK_DIR)[0]).remove_metadata().equals(FEEDBACK)
    assert [(r["request_id"], r["score"], r["expert"], r["query_id"]) for r in fb] == [
        (ids[0], -1.0, "alpha", text_id("one question")), (ids[2], 0.5, "alpha", text_id("route only"))]


def test_batches_are_flushed_by_time(own_store, experts, tmp_path):
    traffic = Traffic(Store(str(own_store)), batch_rows=1000, flush_s=0.5)
    with recording(own_store, experts, tmp_path, traffic) as url:
        assert chat(url, "a lone question").status_code == 200
        deadline = time.monotonic() + 20
        while not batches(own_store, REQUESTS_DIR):
            assert time.monotonic() < deadline, "the old batch was not written"
            time.sleep(0.05)
        assert [r["text"] for r in rows(own_store, REQUESTS_DIR)] == ["a lone question"]


def test_without_record_nothing_about_requests_is_written(own_store, experts, tmp_path):
    before = sorted(p.relative_to(own_store) for p in own_store.rglob("*"))
    with recording(own_store, experts, tmp_path, None) as url:
        answer = chat(url, "an unrecorded question")
        assert answer.status_code == 200 and "x-zooter-request-id" not in answer.headers
        fb = httpx.post(f"{url}/v1/feedback", json={"request_id": "zr-any", "thumbs": "up"})
        assert fb.status_code == 404 and "--record" in fb.json()["error"]["message"]
    assert sorted(p.relative_to(own_store) for p in own_store.rglob("*")) == before


def _gateway(store: Path, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "gateway", "--store", str(store), "--port", str(port),
                             "--record", "--record-flush-s", "600"], cwd=ROOT, stdout=log.open("a"),
                            stderr=subprocess.STDOUT)


def _wait_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)


def _route(url: str, text: str) -> str:
    r = httpx.post(f"{url}/v1/route", json={"model": "zooter", "messages": [{"role": "user", "content": text}]},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def _stop(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down (the app's lifespan exit), then re-raises the signal: the exit status says SIGTERM
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    assert "Application shutdown complete" in log.read_text()


def test_sigterm_writes_the_pending_batch_and_a_restart_loses_nothing(own_store, tmp_path):
    """A real `zooter gateway --record` whose batches are neither full nor old: SIGTERM writes them; the next
    process takes feedback on the first one's requests (from the store) and adds its own."""
    log = tmp_path / "gateway.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = _gateway(own_store, port, log)
    try:
        _wait_up(first, url, log)
        ids = [_route(url, f"question {i}") for i in range(3)]
        assert not batches(own_store, REQUESTS_DIR)  # pending in memory
        _stop(first, log)
    finally:
        if first.poll() is None:
            first.kill()
    assert [r["request_id"] for r in rows(own_store, REQUESTS_DIR)] == ids
    second = _gateway(own_store, port, log)
    try:
        _wait_up(second, url, log)
        fb = httpx.post(f"{url}/v1/feedback", json={"request_id": ids[1], "thumbs": "up"}, timeout=30)
        assert fb.status_code == 200, fb.text
        ids.append(_route(url, "question 3"))
        _stop(second, log)
    finally:
        if second.poll() is None:
            second.kill()
    assert len(batches(own_store, REQUESTS_DIR)) == 2
    assert [r["request_id"] for r in rows(own_store, REQUESTS_DIR)] == ids
    assert [(r["request_id"], r["score"]) for r in rows(own_store, FEEDBACK_DIR)] == [(ids[1], 1.0)]
