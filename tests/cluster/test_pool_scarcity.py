"""Actor pools that together want more than the cluster has: on the session Ray's 2 CPUs each pool finishes on
the actors Ray could place and releases every one of them (pending ones too), so the next pool gets them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

import cluster.pool
from cluster.pool import ModelActor, run_pool
from schemas.config import Resources


def build_model() -> str:
    return "m"


def record(log: Path, model: str, key: object) -> str:
    """Appends the key to `log` (every actor runs on this machine), so a test can count the computations."""
    time.sleep(0.1)
    with log.open("a") as f:
        f.write(f"{key}\n")
    return f"{model}:{key}"


def test_concurrent_pools_wanting_more_cpus_than_the_cluster_has_all_finish(ray_session, tmp_path):
    assert ray_session.cluster_resources()["CPU"] == 2
    log = tmp_path / "computed.txt"
    keys = {p: [f"{p}{i}" for i in range(4)] for p in "abc"}  # 3 pools x 2 actors x 1 CPU = 6 CPUs wanted
    out = _in_threads({p: partial(run_pool, build_model, partial(record, log), ks, Resources(num_cpus=1, pool_size=2))
                       for p, ks in keys.items()})
    for p, ks in keys.items():
        assert sorted(out[p]) == [(k, f"m:{k}") for k in ks]
    assert sorted(log.read_text().split()) == sorted(k for ks in keys.values() for k in ks)  # each computed once
    _wait_for_cpus(ray_session, 2)  # every actor released


def test_a_pool_finishes_on_its_placed_actor_when_the_other_can_never_be_placed(ray_session, tmp_path, monkeypatch):
    made = []

    def actor(build, job, res, tp):  # the second actor asks for a resource no node has
        opts = {"num_cpus": 1, **({"resources": {"absent": 1}} if made else {})}
        made.append(ModelActor.options(**opts).remote(build, job))
        return made[-1], None

    monkeypatch.setattr(cluster.pool, "_actor", actor)
    log, nodes = tmp_path / "computed.txt", set()
    out = _in_threads({"only": partial(run_pool, build_model, partial(record, log), list(range(5)),
                                       Resources(pool_size=2), nodes=nodes)})
    assert len(made) == 2 and dict(out["only"]) == {k: f"m:{k}" for k in range(5)}
    assert sorted(log.read_text().split()) == [str(k) for k in range(5)]
    assert nodes == {ray_session.get_runtime_context().get_node_id()}
    deadline = time.monotonic() + 30
    while _state(made[1]) != "DEAD":  # the unplaced actor was killed, not left queued for the cluster's next CPU
        assert time.monotonic() < deadline, _state(made[1])
        time.sleep(0.2)


def test_a_pool_whose_claims_all_fail_starts_no_actor(ray_session, monkeypatch):
    monkeypatch.setattr(cluster.pool, "_actor", lambda *a: pytest.fail("an actor was started"))
    assert list(run_pool(build_model, record, [1, 2], Resources(pool_size=2), claim=lambda k: False)) == []


class CountedJob:
    """A job that notes in `log` every time it is unpickled, i.e. sent to an actor."""

    def __init__(self, log: Path):
        self.log = log

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        with self.log.open("a") as f:
            f.write("unpickled\n")

    def __call__(self, model: str, key: object) -> str:
        return f"{model}:{key}"


def test_a_pool_sends_its_job_to_each_actor_once(ray_session, tmp_path):
    log = tmp_path / "unpickled.txt"
    out = dict(run_pool(build_model, CountedJob(log), list(range(6)), Resources(num_cpus=1, pool_size=1)))
    assert out == {k: f"m:{k}" for k in range(6)}
    assert log.read_text().split() == ["unpickled"]  # one actor, six keys: one copy of the job (and its Store)


def _in_threads(pools: dict[str, Callable[[], Iterator]], timeout_s: float = 180) -> dict[str, list]:
    """Drains each pool in its own thread, all at once; fails (instead of hanging) when one does not finish."""
    out: dict[str, list] = {}
    errors: list[BaseException] = []

    def drain(name: str) -> None:
        try:
            out[name] = list(pools[name]())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=drain, args=(name,), daemon=True) for name in pools]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"pools deadlocked; finished: {sorted(out)}"
    assert not errors, errors
    return out


def _state(actor) -> str:
    from ray._private import state

    return state.actors(actor_id=actor._actor_id.hex())["State"]


def _wait_for_cpus(ray_session, n: float) -> None:
    deadline = time.monotonic() + 30
    while ray_session.available_resources().get("CPU", 0) < n:
        assert time.monotonic() < deadline, ray_session.available_resources()
        time.sleep(0.2)
