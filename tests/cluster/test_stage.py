"""The stage runner on a real local store: done / missing / repaired cells, leases between two concurrent runners,
counts and placements; in-process or with a fake pool (the real Ray pool: one test at the end)."""

import threading
import time
from dataclasses import replace
from functools import partial

import pyarrow as pa
import pytest

import cluster.stage
from cluster.pool import run_pool
from cluster.stage import Stage, run_stage
from schemas.config import Resources
from schemas.leases import Leases
from schemas.store import Store

SCHEMA = pa.schema([pa.field("query_id", pa.string(), nullable=False), pa.field("value", pa.int64())])
FP = "fp-1"


def cell_path(key: int) -> str:
    return f"toy/{FP}/shard-{key:05d}.parquet"


def toy_job(model, key: int, *, store: Store, calls: list, delay: float = 0.0) -> dict:
    """Writes a 3-row cell; one row flagged on odd keys."""
    time.sleep(delay)
    calls.append((model, key))
    store.write_table(cell_path(key), pa.table({"query_id": [f"{key}-{i}" for i in range(3)],
                                                "value": [key] * 3}), SCHEMA, {"fingerprint": FP, "shard": key})
    return {"rows": 3, "seconds": 0.5, "new_tokens": 2, "flags": {"odd": key % 2, "never": 0}}


def toy_stage(store: Store, calls: list, keys=(0, 1, 2, 3), **kw) -> Stage:
    return Stage(step="toy", name="t", fingerprint=FP, schema=SCHEMA, keys=list(keys), path=cell_path,
                 job=partial(toy_job, store=store, calls=calls, **kw))


def test_missing_cells_are_computed_done_ones_reused_broken_ones_repaired(tmp_path):
    store, calls = Store(str(tmp_path)), []
    first = run_stage(store, toy_stage(store, calls))
    assert (first.computed, first.skipped, first.repaired) == ([0, 1, 2, 3], [], [])
    assert (first.rows, first.new_tokens, first.job_seconds, first.flags) == (12, 8, 2.0, {"odd": 2})
    assert first.nodes == [] and first.seconds > 0 and (first.name, first.fingerprint) == ("t", FP)
    assert sorted(k for _, k in calls) == [0, 1, 2, 3] and {m for m, _ in calls} == {None}  # in-process, no model

    calls.clear()
    (tmp_path / cell_path(1)).write_bytes((tmp_path / cell_path(1)).read_bytes()[:-30])  # truncated
    store.write_table(cell_path(2), pa.table({"query_id": ["x"], "value": [0]}), SCHEMA, {"fingerprint": "other"})
    again = run_stage(store, toy_stage(store, calls, keys=(3, 2, 1, 0, 4)))
    assert again.computed == [2, 1, 4] and again.repaired == [2, 1] and again.skipped == [3, 0]  # in key order
    assert sorted(k for _, k in calls) == [1, 2, 4] and again.rows == 9
    assert all(store.valid_cell(cell_path(k), SCHEMA, FP) for k in range(5))


def test_a_pool_gets_the_claimed_keys_and_its_placements_come_back(tmp_path, monkeypatch):
    store, calls, seen = Store(str(tmp_path)), [], {}

    def fake_pool(build, job, keys, res, tp, claim, nodes, gate, usage):
        seen.update(res=res, tp=tp)
        model = build()
        for k in keys:
            if claim(k):
                nodes.add(f"node-{k % 2}")
                yield k, job(model, k)

    monkeypatch.setattr(cluster.stage, "run_pool", fake_pool)
    stage = replace(toy_stage(store, calls, keys=(0, 1, 2)), build=lambda: "model", resources=Resources(pool_size=2),
                    tensor_parallel=2)
    toy_job("other-run", 1, store=store, calls=[])  # already done: never claimed
    res = run_stage(store, stage)
    assert calls == [("model", 0), ("model", 2)]
    assert (res.computed, res.skipped, res.nodes) == ([0, 2], [1], ["node-0"])
    assert seen == {"res": Resources(pool_size=2), "tp": 2}


def test_two_concurrent_runners_split_the_work_and_compute_each_cell_once(tmp_path):
    store, calls = Store(str(tmp_path)), []
    keys = list(range(8))
    results = {}

    def runner(owner: str) -> None:
        with Leases(store, owner, ttl_s=30) as leases:
            results[owner] = run_stage(store, toy_stage(store, calls, keys=keys, delay=0.05), leases)

    threads = [threading.Thread(target=runner, args=(o,)) for o in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(k for _, k in calls) == keys  # nothing computed twice
    a, b = results["a"], results["b"]
    assert a.computed and b.computed and sorted(a.computed + b.computed) == keys  # the work was split
    for r in (a, b):
        assert sorted(r.computed + r.skipped) == keys and r.rows == 3 * len(r.computed)
    assert not list((tmp_path / "leases").rglob("*.lease"))  # every lease given back


@pytest.mark.slow
def test_run_pool_pairs_results_with_keys_and_reports_nodes(ray_session):
    import ray

    nodes: set[str] = set()
    out = dict(run_pool(partial(str, "m"), _echo, [3, 0, 7, 5], Resources(pool_size=2), claim=lambda k: k != 7,
                        nodes=nodes))
    assert out == {3: "m:3", 0: "m:0", 5: "m:5"}
    assert nodes == {ray.get_runtime_context().get_node_id()}


def _echo(model: str, key: int) -> str:
    return f"{model}:{key}"


def _user_error(model, key: int) -> dict:
    from schemas.errors import ConfigError

    raise ConfigError(f"expert 'x': the endpoint's answer has no `usage` (key {key})")


def _no_build():
    from schemas.errors import InputError

    raise InputError("/models/x: model directory not found")


def _bug(model, key: int) -> dict:
    raise ZeroDivisionError("a bug")


def _one_line(e: BaseException) -> str:
    """The `error:` line flows/cli.py `command` prints for a ZooterError."""
    return " ".join(str(e).splitlines()) + "".join(f" ({n})" for n in getattr(e, "__notes__", []))


def test_a_user_error_in_an_actor_reaches_the_driver_as_itself(tmp_path, ray_session):
    """Issue 37, item 3: a ZooterError raised in a pool's actor, in its job or while it builds its model, is
    re-raised in the driver as that error: its one plain line and the stage's name, no Ray wrapper, ANSI codes or
    traceback; a bug keeps Ray's wrapper and the actor's traceback."""
    from ray.exceptions import RayTaskError

    from schemas.errors import ConfigError, InputError

    store = Store(str(tmp_path))
    stage = Stage(step="generate", name="x", fingerprint=FP, schema=SCHEMA, keys=[0], path=cell_path,
                  job=_user_error, build=partial(str, "m"))
    with pytest.raises(ConfigError) as e:
        run_stage(store, stage)
    assert type(e.value) is ConfigError and not isinstance(e.value, RayTaskError)
    assert _one_line(e.value) == "expert 'x': the endpoint's answer has no `usage` (key 0) (in stage generate x)"
    with pytest.raises(InputError) as e:
        run_stage(store, replace(stage, build=_no_build))
    assert _one_line(e.value) == "/models/x: model directory not found (in stage generate x)"
    with pytest.raises(RayTaskError) as bug:
        run_stage(store, replace(stage, job=_bug))
    assert isinstance(bug.value, ZeroDivisionError) and ", in _bug" in str(bug.value)  # the actor's traceback
    assert not list(tmp_path.rglob("*.parquet"))


def test_the_cli_prints_an_actor_user_error_as_one_plain_line(tmp_path, ray_session):
    from typer.testing import CliRunner

    from flows.cli import app, command

    store = Store(str(tmp_path))

    @command(name="zz-actor-error-test")
    def _cmd() -> None:
        run_stage(store, Stage(step="score", name="rm", fingerprint=FP, schema=SCHEMA, keys=[0], path=cell_path,
                               job=_user_error, build=partial(str, "m")))

    res = CliRunner().invoke(app, ["zz-actor-error-test"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == ("error: expert 'x': the endpoint's answer has no `usage` (key 0) "
                                                   "(in stage score rm)")
    assert "\x1b" not in res.output and "Traceback" not in res.output
