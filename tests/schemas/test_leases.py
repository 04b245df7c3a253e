"""Exclusive creates, leases and compute_once (concurrent runs compute each cell once), and retries while an
S3 endpoint is down (moto on 127.0.0.1, stopped and restarted)."""

import json
import logging
import os
import threading
import time

import polars as pl
import pytest

from schemas.errors import LeaseTimeout
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
        if calls.count(path) == 1 and path.endswith("cell.lease"):
            raise ConnectionError("connection reset after the request was sent")

    s.fs.pipe_file = answer_lost
    with caplog.at_level(logging.INFO, logger="zooter.leases"), Leases(s, owner="me", ttl_s=600) as leases:
        assert leases.acquire("cell") and leases.held == {"cell"}
        assert calls[-2:] == ["faults/run/leases/cell.lease"] * 2 and "found its own first attempt" in caplog.text
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


# --- leases judged by the store's clock; bounded waits; conditional writes (local and moto S3) -------------------
@pytest.fixture(params=["local", "s3", "s3-unconditional"])
def any_store(request, tmp_path, s3_server):
    """A local store, an S3 store with conditional writes (the default) and one without (the fallback)."""
    if request.param == "local":
        return lambda: Store(str(tmp_path))
    prefix = f"s3://zooter/{request.param}-{request.node.name}-{time.monotonic_ns()}"
    return lambda: Store(prefix, s3_server, conditional_writes=request.param == "s3")


BAD = {"zero-byte": b"", "future-dated": json.dumps({"owner": "wrong-clock", "expires": time.time() + 10 * 365 * 86400,
                                                     "token": "t"}).encode(),
       "malformed": json.dumps({"owner": "bad", "expires": "soon"}).encode(), "not-json": b"\x00\xff{"}


@pytest.mark.parametrize("bad", list(BAD))
def test_a_bad_lease_expires_one_ttl_after_it_was_written(any_store, bad, caplog):
    """Whatever a lease says (nothing, an expiry ten years ahead, a string), it blocks one ttl from its
    modification time by the store's clock, then is taken over."""
    s, clock = any_store(), FakeClock()
    s.write_bytes("leases/cell.lease", BAD[bad])
    with Leases(s, "run-b", ttl_s=60, clock=clock) as b:
        assert not b.free("cell") and not b.acquire("cell")  # just written: live
        clock.t += 58
        assert not b.acquire("cell")
        clock.t += 4  # 62 s after it was written (S3 times have whole seconds)
        with caplog.at_level(logging.WARNING, logger="zooter.leases"):
            assert b.acquire("cell")
        assert "expired" in caplog.text and b.holder("cell")["owner"] == "run-b"


def test_a_lease_is_aged_by_its_modification_time_not_its_content(tmp_path):
    """A lease rewritten with a stale `expires` is live while recent; an old file with a far `expires` is not."""
    s, clock = Store(str(tmp_path)), FakeClock()
    s.write_bytes("leases/old.lease", json.dumps({"owner": "x", "expires": time.time() + 1e9}).encode())
    past = time.time() - 3600
    os.utime(tmp_path / "leases" / "old.lease", (past, past))
    s.write_bytes("leases/new.lease", json.dumps({"owner": "y", "expires": 0}).encode())
    with Leases(s, "me", ttl_s=60, clock=clock) as me:
        assert me.acquire("old") and not me.acquire("new")


def test_a_run_waiting_on_a_live_lease_says_so_and_gives_up(any_store, caplog):
    s = any_store()
    with Leases(s, "run-a", ttl_s=30) as a, Leases(s, "run-b", ttl_s=30, wait_s=1.5) as b:
        assert a.acquire("cells/0")
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="zooter.leases"), \
                pytest.raises(LeaseTimeout, match=r"cells/0 is still leased by run run-a, .* 1.5 s "
                                                  r"\(store.lease_wait_s\)"):
            compute_once(b, [0], lambda k: f"cells/{k}", lambda k: False, lambda keys, claim: [], poll_s=0.1)
        assert 1.5 <= time.monotonic() - t0 < 10
        line = next(r for r in caplog.records if r.levelno == logging.WARNING and "waiting" in r.message)
        assert "cells/0 is held by run-a until" in line.message and "giving up at" in line.message
        with pytest.raises(LeaseTimeout, match="cells/0 is still leased by run run-a"), b.hold("cells/0", poll_s=0.1):
            pass


def test_store_config_carries_the_lease_knobs():
    import pickle

    from schemas.config import StoreConfig

    s = Store.from_config(StoreConfig(url="s3://b/p", lease_wait_s=7, conditional_writes=False))
    s = pickle.loads(pickle.dumps(s))
    assert (s.lease_wait_s, s.conditional_writes, s.conditional) == (7, False, False)
    assert Store("s3://b/p").conditional and not Store("/tmp/x").conditional
    assert StoreConfig(url="x").lease_wait_s == 1800


def _two_runs(s, keys, done_calls):
    rel = lambda k: f"cells/{k}"  # noqa: E731
    calls: list[tuple[str, int]] = []

    def run(owner: str) -> None:
        def compute(pending, claim):
            for k in pending:
                if claim(k):
                    time.sleep(0.05)
                    calls.append((owner, k))
                    s.write_bytes(rel(k), owner.encode())
                    yield k

        def done(k):
            done_calls.append((owner, k))
            return s.exists(rel(k))

        with Leases(s, owner, ttl_s=30) as leases:
            compute_once(leases, keys, rel, done, compute, poll_s=0.05)

    threads = [threading.Thread(target=run, args=(o,)) for o in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return calls


def test_compute_once_on_s3_with_and_without_conditional_writes(s3_server):
    """Both ways compute each cell once between two concurrent runs and leave no lease behind; with conditional
    writes no cell is read back after its lease was created (what the done re-check cost: a GET per cell)."""
    keys = list(range(8))
    for conditional in (True, False):
        s = Store(f"s3://zooter/two-{conditional}-{time.monotonic_ns()}", s3_server, conditional_writes=conditional)
        done_calls: list[tuple[str, int]] = []
        calls = _two_runs(s, keys, done_calls)
        assert sorted(k for _, k in calls) == keys
        rechecked = [c for c in done_calls if c in calls]  # a run reading back a cell it then computed itself
        assert rechecked == [] if conditional else sorted(rechecked) == sorted(calls)
        assert s.ls("leases") in ([], [".runs"]) and s.ls("leases/.runs") == [] and s.ls("leases/cells") == []


def test_a_finished_cells_lease_stays_while_a_run_that_planned_before_is_alive(s3_server):
    """Run A is made (and plans) before run B computes cell 0 and closes: B's lease stays, so A's create fails
    and A finds the cell done instead of computing it again; the last run to close deletes every lease."""
    s = Store(f"s3://zooter/plan-{time.monotonic_ns()}", s3_server)
    rel = lambda k: f"cells/{k}"  # noqa: E731
    computed_by: list[str] = []

    def compute(owner):
        def run(pending, claim):
            for k in pending:
                if claim(k):
                    computed_by.append(owner)
                    s.write_bytes(rel(k), owner.encode())
                    yield k
        return run

    with Leases(s, "run-a", ttl_s=30) as a:  # announced before it plans
        todo = [k for k in [0] if not s.exists(rel(k))]  # A's plan: cell 0 is missing
        with Leases(s, "run-b", ttl_s=30) as b:
            assert compute_once(b, [0], rel, lambda k: s.exists(rel(k)), compute("b")) == ([0], [])
        assert s.exists("leases/cells/0.lease")  # B closed, A is alive: the lease stays
        assert compute_once(a, todo, rel, lambda k: s.exists(rel(k)), compute("a"), poll_s=0.05) == ([], [0])
    assert computed_by == ["b"]
    assert not s.exists("leases/cells/0.lease") and s.ls("leases/.runs") == []
