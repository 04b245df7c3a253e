"""The flow against a real S3 server on loopback: the same cells and labels as a local store though the endpoint
goes away in the middle of the run, nothing recomputed on rerun, and no credential or token in any artifact, log,
Prefect record or error message."""

import json
import logging
import socket
import threading
import time
import traceback
from pathlib import Path

import pytest

from flows.label import label_flow
from schemas.artifacts import LABELS, generation_path, labels_path, run_manifest_path
from schemas.manifest import RunManifest, new_run_id, record
from schemas.store import Store
from tests.conftest import tiny_flow_config, tiny_router
from tests.s3util import OutageS3

pytestmark = pytest.mark.slow

# Recognisable fake secrets in the environment of a run: none may show up anywhere the run writes or prints.
SECRET_ENV = {"HF_TOKEN": "hf_zootertesttoken123", "OPENAI_API_KEY": "sk-zooter-test-456",
              "AWS_SESSION_TOKEN": "zooter-session-789"}


def _secrets(s3: dict) -> list[str]:
    return [*SECRET_ENV.values(), s3["key"], s3["secret"]]


def _leaks(blob: str | bytes, secrets: list[str]) -> list[str]:
    data = blob if isinstance(blob, bytes) else blob.encode("utf-8", "replace")
    return [s for s in secrets if s.encode() in data]


def _prefect_records() -> list[str]:
    """Everything the (temporary) Prefect API holds: logs, artifacts, flow and task runs (parameters, state
    messages) and events, as JSON; logs and events still queued in this process are sent first."""
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    EventsWorker.drain_all(timeout=30)
    out: list[str] = []
    with get_client(sync_client=True) as client:
        page = client.read_events(limit=50)  # those the server persisted by now; 50 a page at most
        for _ in range(1000):
            out += [e.model_dump_json() for e in page.events]
            if not page.next_page:
                break
            page = client.read_events_page(page.next_page)
        for read in (client.read_logs, client.read_artifacts, client.read_flow_runs, client.read_task_runs):
            offset = 0
            while True:
                page = read(limit=200, offset=offset)
                out += [r.model_dump_json() for r in page]
                if len(page) < 200:
                    break
                offset += len(page)
    return out


def _ray_log_files() -> list[Path]:
    """Ray's session logs (driver, raylet, GCS, every worker and actor): the session's Ray (`ray_session`)."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for p in (session / "logs").rglob("*") if p.is_file()]


def _assert_nothing_leaked(secrets: list[str], capfd, caplog, since: float, ray_logs: bool) -> None:
    out, err = capfd.readouterr()
    assert not _leaks(out + err, secrets), "a secret was printed"
    assert not _leaks(caplog.text, secrets), "a secret was logged"
    records = _prefect_records()
    assert any("ingest" in r for r in records)  # the flow runs' logs really are there
    for r in records:
        assert not _leaks(r, secrets), r[:500]
    files = _ray_log_files() if ray_logs else []
    assert files or not ray_logs
    for f in files:
        assert not _leaks(f.read_bytes(), secrets), f
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH  # results Prefect persisted, if any

    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    for f in (storage.rglob("*") if storage.is_dir() else []):
        if f.is_file() and f.stat().st_mtime >= since:
            assert not _leaks(f.read_bytes(), secrets), f


def _cells(m: dict) -> dict:
    return {(s["name"], s["fingerprint"]): s["rows"] for s in m["generate"] + m["score"]}


def test_s3_store_matches_local_store_through_an_outage(tmp_path, tiny_models, labeled, monkeypatch, capfd,
                                                        caplog):
    """The session's run again, on S3 (moto behind a proxy on 127.0.0.1) from an empty store; once the first
    generation cell is there the endpoint goes away for 8 s (open connections cut, new ones dropped). The run
    rides it out with the store's retries and makes the local run's cells and labels, no lease or temp object
    left; a rerun computes nothing."""
    local = labeled.outcome.manifest.model_dump(mode="json")  # the session's run on a local store, same config
    since = time.time() - 1
    for k, v in SECRET_ENV.items():
        monkeypatch.setenv(k, v)
    caplog.set_level(logging.INFO)
    outage = OutageS3("outage")
    try:
        # the router (what this test does not check) on the tiny encoder: the labels do not depend on it
        cfg = tiny_flow_config(tmp_path, tiny_models, router=tiny_router(tiny_models), store={
            "url": "s3://outage/store", "options": outage.options, "retries": 8, "backoff_s": 0.5})
        window: dict[str, float] = {}

        def cut_when_writing():
            while not any(k.startswith("store/generations/") for k in outage.keys("outage", "store/")):
                time.sleep(0.05)
            window["down"] = time.monotonic()
            outage.stop()
            time.sleep(8)
            window["dropped"] = outage.dropped
            outage.start()
            window["up"] = time.monotonic()

        cut = threading.Thread(target=cut_when_writing, daemon=True)
        t0 = time.monotonic()
        cut.start()
        remote = label_flow(str(cfg))
        t1 = time.monotonic()
        cut.join(timeout=60)
        m = remote.manifest.model_dump(mode="json")
        assert m["status"] == "completed" and remote.manifest_uri.startswith("s3://outage/store/")
        assert t0 < window["down"] < window["up"] < t1 and window["dropped"] > 0  # the run called S3 meanwhile
        assert _cells(m) == _cells(local)  # same fingerprints, same row counts
        assert (m["labels"], m["label_rows"]) == (local["labels"], local["label_rows"])
        keys = outage.keys("outage", "store/")
        cells = [k for k in keys if k.endswith(".parquet") and ("/generations/" in k or "/scores/" in k)]
        assert sum("/generations/" in k for k in cells) == 6 and sum("/scores/" in k for k in cells) == 18
        assert not [k for k in keys if "/leases/" in k or ".tmp-" in k]

        store = Store("s3://outage/store", outage.options)
        gen = m["generate"][0]
        assert store.exists(generation_path(gen["name"], gen["fingerprint"], 0))
        assert store.read_table(labels_path(m["labels"]), LABELS).num_rows == 12
        assert store.exists(f"routers/{m['router']}/router.json")

        again = label_flow(str(cfg)).manifest.model_dump(mode="json")
        assert sum(s["cells_computed"] for s in again["generate"] + again["score"]) == 0

        # credentials and tokens never land in the store (manifests, Parquet footers, reports): grep every object
        secrets = _secrets(outage.options)
        objects = store.fs.find(store.root)
        assert any(p.endswith("manifest.json") for p in objects) and any(p.endswith(".parquet") for p in objects)
        for path in objects:
            assert not _leaks(store.fs.cat(path), secrets), path
    finally:
        outage.close()
    # nor in what the runs printed or logged, Prefect's logs/artifacts/run records, or Ray's session logs
    _assert_nothing_leaked(secrets, capfd, caplog, since, ray_logs=True)


def test_s3_failures_do_not_leak_credentials(tmp_path, tiny_models, prefect_harness, s3_server, monkeypatch,
                                             capfd, caplog):
    """A run against a bucket that does not exist, or an S3 endpoint nobody listens on, fails with a message
    that holds no credential; so does the failed run's manifest status (`record`)."""
    since = time.time() - 1
    for k, v in SECRET_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore: no retries of its own against the closed port
    caplog.set_level(logging.INFO)
    secrets = _secrets(s3_server)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens here once the socket is closed
    cases = {
        "no-bucket": {"url": "s3://zooter-no-such-bucket/runs", "options": s3_server},
        "closed-port": {"url": "s3://zooter/closed", "retries": 0, "backoff_s": 0.01,
                        "options": {**s3_server, "endpoint_url": f"http://127.0.0.1:{closed}"}},
    }
    good = Store("s3://zooter/failed-runs", s3_server)
    for what, store in cases.items():
        (tmp_path / what).mkdir()
        cfg = tiny_flow_config(tmp_path / what, tiny_models, store=store)
        with pytest.raises(Exception) as info:  # noqa: PT011 - which error depends on where the store fails
            label_flow(str(cfg))
        text = "".join(traceback.format_exception(info.value))  # with every chained (context) exception
        assert not _leaks(text, secrets), text
        # the status line a failed run records in its manifest, written where it can be read back
        m = RunManifest(run_id=new_run_id(), flow="label")
        try:
            raise info.value
        except Exception:  # noqa: BLE001
            record(good, m, time.perf_counter(), False)
        stored = good.read_json(run_manifest_path(m.run_id))
        assert stored["status"] == "failed" and stored["error"].startswith(type(info.value).__name__), stored
        assert not _leaks(json.dumps(stored), secrets), stored
    _assert_nothing_leaked(secrets, capfd, caplog, since, ray_logs=False)  # they stop before Ray is needed
