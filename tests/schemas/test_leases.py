"""Exclusive creates, leases and compute_once (concurrent runs compute each cell once), and retries while an
S3 endpoint is down (moto on 127.0.0.1, stopped and restarted)."""

import logging
import threading
import time

import polars as pl
import pytest

from schemas.leases import Leases, compute_once
from schemas.store import Store, StoreUnavailable
from tasks.ingest import store_shards, write_shards
from tests.s3util import OutageS3


def test_create_is_exclusive_and_leaves_no_temp_file(tmp_path):
    s = Store(str(tmp_path))
    s.create("a/x.json", b"1")
    with pytest.raises(FileExistsError):
        s.create("a/x.json", b"2")
    assert s.read_bytes("a/x.json") == b"1"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json"]


class FakeClock:
    """Wall-clock seconds that only move when the test says so."""

    def __init__(self, t: float = 1_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_lease_is_held_released_and_taken_over_when_expired(tmp_path, caplog):
    s, clock = Store(str(tmp_path)), FakeClock()
    a, b = Leases(s, "run-a", ttl_s=60, clock=clock), Leases(s, "run-b", ttl_s=60, clock=clock)
    assert a.acquire("cell") and not b.acquire("cell")
    assert {k: a.holder("cell")[k] for k in ("owner", "expires")} == {"owner": "run-a", "expires": 1_060.0}
    clock.t += 59  # not expired yet (the heartbeat beats every 20 s of real time: it has not run)
    assert not b.free("cell") and not b.acquire("cell")
    a.release("cell")
    assert b.free("cell") and b.acquire("cell")
    b.close()
    assert not (tmp_path / "leases" / "cell.lease").exists()
    # a run killed outright stops renewing: once its lease expires, another run takes the work over (logged)
    assert a.acquire("cell")
    clock.t += 61
    with caplog.at_level(logging.WARNING, logger="zooter.leases"):
        assert b.acquire("cell")
    assert "held by run-a expired" in caplog.text
    assert b.holder("cell")["owner"] == "run-b"
    a.close()
    b.close()


def test_heartbeat_renews_from_the_clock(tmp_path):
    """The heartbeat (real thread, every ttl/3 of real time) rewrites the expiry from the injected clock."""
    s, clock = Store(str(tmp_path)), FakeClock()
    with Leases(s, "run-a", ttl_s=0.03, clock=clock) as a:
        assert a.acquire("cell")
        clock.t += 100  # far past the first expiry
        deadline = time.monotonic() + 5
        while a.holder("cell")["expires"] < clock.t and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.holder("cell")["expires"] == pytest.approx(clock.t + 0.03)
        assert not Leases(s, "run-b", clock=clock).acquire("cell")  # renewed: still a's


def test_compute_once_across_concurrent_runs(tmp_path):
    """Two runs want the same 12 cells at once: each cell is computed exactly once, both end with all 12."""
    s = Store(str(tmp_path))
    keys = list(range(12))
    rel = lambda k: f"cells/{k}"  # noqa: E731
    calls: list[tuple[str, int]] = []
    results = {}

    def run(owner: str) -> None:
        def compute(pending, claim):
            for k in pending:
                if not claim(k):
                    continue
                time.sleep(0.05)
                calls.append((owner, k))
                s.write_bytes(rel(k), owner.encode())
                yield k

        with Leases(s, owner, ttl_s=5) as leases:
            results[owner] = compute_once(leases, keys, rel, lambda k: s.exists(rel(k)), compute, poll_s=0.05)

    threads = [threading.Thread(target=run, args=(o,)) for o in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(k for _, k in calls) == keys  # nothing computed twice
    assert {o for o, _ in calls} == {"a", "b"}  # and the work was split between the runs
    for owner, (computed, by_others) in results.items():
        assert sorted(computed + by_others) == keys
        assert all(s.read_bytes(rel(k)) == owner.encode() for k in computed)
    assert not (tmp_path / "leases" / "cells").exists() or not list((tmp_path / "leases" / "cells").iterdir())


def test_concurrent_ingests_never_overwrite_a_shard(tmp_path):
    s = Store(str(tmp_path))
    q = lambda ids: pl.DataFrame({  # noqa: E731
        "query_id": ids, "text": [f"text {i}" for i in ids], "source_line": list(range(1, len(ids) + 1)),
        "input_tags": [[] for _ in ids], "reference": [None] * len(ids)},
        schema={"query_id": pl.String, "text": pl.String, "source_line": pl.Int64,
                "input_tags": pl.List(pl.String), "reference": pl.String})
    a, b = q([f"a{i}" for i in range(9)] + ["both"]), q([f"b{i}" for i in range(9)] + ["both"])
    threads = [threading.Thread(target=write_shards, args=(s, df, 2)) for df in (a, b, a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = s.scan([f"queries/shard-{i:05d}.parquet" for i in store_shards(s)]).collect()
    assert stored["query_id"].n_unique() == stored.height == 19  # each query once, none lost


@pytest.fixture
def outage():
    srv = OutageS3("faults")
    yield srv
    srv.close()


def test_s3_create_is_exclusive(outage):
    s = Store("s3://faults/x", outage.options)
    s.create("lease", b"1")
    with pytest.raises(FileExistsError):
        s.create("lease", b"2")


def test_a_lease_create_whose_answer_was_lost_is_ours(outage, caplog):
    """The connection drops after S3 stored the lease but before its answer came: Store retries the create, which
    then finds the lease. It is this run's own (not another run's to wait out for ttl_s)."""
    s = Store("s3://faults/run", outage.options, retries=2, backoff_s=0.01)
    real, calls = s.fs.pipe_file, []

    def answer_lost(path, data, **kw):
        calls.append(path)
        real(path, data, **kw)
        if len(calls) == 1:
            raise ConnectionError("connection reset after the request was sent")

    s.fs.pipe_file = answer_lost
    with caplog.at_level(logging.INFO, logger="zooter.leases"), Leases(s, owner="me", ttl_s=600) as leases:
        assert leases.acquire("cell") and leases.held == {"cell"}
        assert len(calls) == 2 and "found its own first attempt" in caplog.text
        other = Leases(Store("s3://faults/run", outage.options), owner="other", ttl_s=600)
        assert not other.acquire("cell")  # still exclusive
        leases.release("cell")
        assert other.acquire("cell")
        other.close()


def test_s3_client_retries_once_and_leaves_the_budget_to_the_store(outage):
    # botocore's default (legacy mode, 4 backed-off retries: ~7 s per call on average) would run inside each of the
    # store's attempts; a retry setting of the user's own is kept, and their options are not edited
    s = Store("s3://faults/run", outage.options)
    assert s.fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 2}
    own = {**outage.options, "config_kwargs": {"retries": {"mode": "adaptive", "max_attempts": 7}}}
    assert Store("s3://faults/run", own).fs.config_kwargs["retries"] == {"mode": "adaptive", "max_attempts": 7}
    assert not Store("s3://faults/run", own).exists("x")  # a client made: botocore edits the dict it is given
    assert own["config_kwargs"] == {"retries": {"mode": "adaptive", "max_attempts": 7}}


def test_s3_writes_retry_while_the_endpoint_is_down(outage, caplog):
    # Store's backoff (0.5, 1, 2, 4 s) rides the outage out
    s = Store("s3://faults/run", outage.options, retries=6, backoff_s=0.5)
    s.write_bytes("before", b"x")
    outage.stop()
    # back after 6 s: longer than s3fs's own retries of one call (~2 s, more on a busy machine) last, so Store's own
    # backoff is what rides the outage out
    threading.Timer(6.0, outage.start).start()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="zooter.store"):
        s.write_bytes("during", b"y" * 1000)  # retried until it is
    assert time.monotonic() - t0 >= 5.5 and outage.dropped > 0  # it really was called during the outage
    assert "write" in caplog.text and "retry 1/6" in caplog.text  # by Store's own backoff
    assert outage.keys("faults", "run/") == ["run/before", "run/during"]
    assert s.read_bytes("during") == b"y" * 1000


def test_s3_outage_past_the_retry_budget_fails_clearly_and_a_rerun_completes(outage):
    s = Store("s3://faults/run", outage.options, retries=1, backoff_s=0.2)
    outage.stop()
    with pytest.raises(StoreUnavailable, match=r"s3://faults/run: write cell failed 2 times .* unreachable"):
        s.write_bytes("cell", b"z" * 1000)
    outage.start()
    assert outage.keys("faults") == []  # nothing partial is visible
    s.write_bytes("cell", b"z" * 1000)  # the rerun
    assert outage.keys("faults") == ["run/cell"]


def test_a_released_lease_stays_released_while_the_heartbeat_runs(tmp_path):
    """A renewal racing a release must not bring the lease file back (it would block other runs until expiry)."""
    class SlowStore(Store):  # lease renewals take a while, as on a remote store
        def write_bytes(self, rel: str, data: bytes) -> None:
            time.sleep(0.02)
            super().write_bytes(rel, data)

    s = SlowStore(str(tmp_path))
    with Leases(s, "run-a", ttl_s=0.03) as a:  # heartbeat every 10 ms
        for i in range(20):
            assert a.acquire(f"c{i % 5}")
            time.sleep(0.015)  # a renewal is under way
            a.release(f"c{i % 5}")
    time.sleep(0.05)
    assert not list((tmp_path / "leases").glob("*.lease"))
