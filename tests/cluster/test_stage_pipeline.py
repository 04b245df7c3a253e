"""Stages of one run overlapping in a Pipeline, on a real local store: a consumer stage starts a key as soon as the
producer's cell for it exists, a failure anywhere stops every stage with the failing one named, and gated Ray pools
that want more CPUs than the session Ray's 2 never wait on each other forever."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from functools import partial

import pyarrow as pa
import pytest

from cluster.stage import Pipeline, Stage, StageAborted, run_stage
from schemas.config import Resources
from schemas.errors import ArtifactError
from schemas.store import Store

SCHEMA = pa.schema([pa.field("query_id", pa.string(), nullable=False), pa.field("value", pa.int64())])


def gen_path(key: int) -> str:
    return f"gen/fp-g/shard-{key:05d}.parquet"


def score_path(key: int) -> str:
    return f"score/fp-s/shard-{key:05d}.parquet"


def write(store: Store, path: str, fp: str, key: int) -> None:
    store.write_table(path, pa.table({"query_id": [f"q{key}"], "value": [key]}), SCHEMA, {"fingerprint": fp})


def gen_job(model, key: int, *, store: Store, log: list, hold: Callable[[int], None] = lambda k: None) -> dict:
    t0 = time.perf_counter()
    hold(key)
    write(store, gen_path(key), "fp-g", key)
    log.append(("gen", key))
    return {"rows": 1, "seconds": time.perf_counter() - t0}


def score_job(model, key: int, *, store: Store, log: list, scored: threading.Event | None = None) -> dict:
    t0 = time.perf_counter()
    assert store.valid_cell(gen_path(key), SCHEMA, "fp-g"), f"scored {key} before its generation cell existed"
    write(store, score_path(key), "fp-s", key)
    log.append(("score", key))
    if scored is not None:  # set once the key is logged: whatever it releases is logged after it
        scored.set()
    return {"rows": 1, "seconds": time.perf_counter() - t0}


def stages(store: Store, log: list, keys=(0, 1, 2, 3), gen_kw=None, score_kw=None) -> tuple[Stage, Stage]:
    gen = Stage(step="generate", name="g", fingerprint="fp-g", schema=SCHEMA, keys=list(keys), path=gen_path,
                job=partial(gen_job, store=store, log=log, **(gen_kw or {})))
    score = Stage(step="score", name="s", fingerprint="fp-s", schema=SCHEMA, keys=list(keys), path=score_path,
                  job=partial(score_job, store=store, log=log, **(score_kw or {})), needs=gen_path)
    return gen, score


def run_together(pipe: Pipeline, calls: dict[str, Callable[[], object]], producers=("gen",),
                 timeout_s: float = 120) -> tuple[dict, dict]:
    """Each call in its own thread with a copy of the pipeline's context (as Prefect's thread runner submits);
    `producers` are opened first and closed when their thread ends. Fails instead of hanging."""
    out, errors = {}, {}
    for name in producers:
        pipe.opened(name)

    def go(name: str) -> None:
        try:
            out[name] = calls[name]()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors[name] = e
        finally:
            if name in producers:
                pipe.closed(name)

    with pipe:
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(go, n), daemon=True) for n in calls]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"stages hung; finished: {sorted(out)}, failed: {errors}"
    return out, errors


def test_scoring_starts_before_the_last_generation_ends_and_each_key_after_its_cell(tmp_path):
    store, log, scoring = Store(str(tmp_path)), [], threading.Event()

    def hold(key: int) -> None:  # the last generation job ends only once a score job has ended
        if key == 3:
            assert scoring.wait(60), "no score job ran while generation was still going"

    gen, score = stages(store, log, gen_kw={"hold": hold}, score_kw={"scored": scoring})
    out, errors = run_together(Pipeline(), {"gen": partial(run_stage, store, gen),
                                            "score": partial(run_stage, store, score)})
    assert not errors, errors
    assert out["gen"].computed == out["score"].computed == [0, 1, 2, 3]
    assert out["score"].jobs_from < out["gen"].jobs_until  # the recorded job times show the overlap
    assert log.index(("score", 0)) < log.index(("gen", 3))
    for k in range(4):
        assert log.index(("gen", k)) < log.index(("score", k))


def test_cells_valid_at_start_are_ready_at_once_and_reruns_compute_nothing(tmp_path):
    store, log = Store(str(tmp_path)), []
    for k in (0, 1):
        write(store, gen_path(k), "fp-g", k)
    gen, score = stages(store, log)
    out, errors = run_together(Pipeline(), {"gen": partial(run_stage, store, gen),
                                            "score": partial(run_stage, store, score)})
    assert not errors and out["gen"].skipped == [0, 1] and out["score"].computed == [0, 1, 2, 3]
    again, errors = run_together(Pipeline(), {"gen": partial(run_stage, store, gen),
                                              "score": partial(run_stage, store, score)})
    assert not errors and again["gen"].computed == again["score"].computed == []
    assert again["score"].skipped == [0, 1, 2, 3] and again["score"].jobs_from is None


def test_a_failing_generation_job_stops_every_stage_naming_it(tmp_path):
    store, log = Store(str(tmp_path)), []

    def hold(key: int) -> None:
        if key == 2:
            raise ValueError("model exploded")

    gen, score = stages(store, log, gen_kw={"hold": hold})
    slow = Stage(step="embed", name="e", fingerprint="fp-e", schema=SCHEMA, keys=list(range(1000)),
                 path=lambda k: f"emb/shard-{k:05d}.parquet", job=partial(_slow_job, store=store))
    pipe = Pipeline()
    _, errors = run_together(pipe, {"gen": partial(run_stage, store, gen), "score": partial(run_stage, store, score),
                                    "embed": partial(run_stage, store, slow)})
    assert isinstance(errors["gen"], ValueError) and "in stage generate g" in errors["gen"].__notes__
    for other in ("score", "embed"):  # stopped, not run to the end: embed had 1000 keys of 50 ms
        assert isinstance(errors[other], StageAborted)
        assert str(errors[other]).startswith(f"{other} ") and "generate g: ValueError: model exploded" in str(
            errors[other])
    assert pipe.error is errors["gen"]
    assert ("score", 2) not in log and ("score", 3) not in log


def test_a_needed_cell_that_no_stage_writes_is_an_error_naming_it(tmp_path):
    store, log = Store(str(tmp_path)), []
    write(store, gen_path(0), "fp-g", 0)  # written before the run: ready; shard 1: nobody writes it
    _, score = stages(store, log, keys=(0, 1))
    _, errors = run_together(Pipeline(), {"score": partial(run_stage, store, score)}, producers=())
    assert isinstance(errors["score"], ArtifactError) and "gen/fp-g/shard-00001.parquet" in str(errors["score"])
    assert ("score", 1) not in log


def test_outside_a_pipeline_a_stage_runs_as_before(tmp_path):
    store, log = Store(str(tmp_path)), []
    gen, score = stages(store, log, keys=(0,))
    assert run_stage(store, gen).computed == [0] and run_stage(store, score).computed == [0]


def _slow_job(model, key: int, *, store: Store) -> dict:
    time.sleep(0.05)
    write(store, f"emb/shard-{key:05d}.parquet", "fp-e", key)
    return {"rows": 1, "seconds": 0.05}


# --- real Ray pools on the session's 2 CPUs ------------------------------------------------------------------
def build_model() -> str:
    return "m"


@pytest.mark.slow
def test_an_idle_scorer_gives_back_the_cpus_a_generation_pool_waits_for(ray_session, tmp_path):
    """The quickstart's shape on the session's 2 CPUs: 1-CPU generation pools and a scorer that needs both CPUs.
    Expert a generates, the scorer is placed and scores a's cells, then idles waiting for expert c's, whose pool
    starts only now and cannot be placed while the scorer holds both CPUs: a deadlock, unless an idle pool gives
    its actors back while another pool waits for resources."""
    assert ray_session.cluster_resources()["CPU"] == 2
    store = Store(str(tmp_path))
    keys = [(e, s) for e in "ac" for s in range(2)]
    gens = {e: Stage(step="generate", name=e, fingerprint="fp-g", schema=SCHEMA, keys=list(range(2)),
                     path=partial(_gen_path, e), job=partial(_pool_gen_job, e, store=store), build=build_model,
                     resources=Resources(num_cpus=1, pool_size=1)) for e in "ac"}
    score = Stage(step="score", name="judge", fingerprint="fp-s", schema=SCHEMA, keys=keys, path=_score_path,
                  job=partial(_pool_score_job, store=store), build=build_model,
                  resources=Resources(num_cpus=2, pool_size=1), needs=lambda k: _gen_path(*k))

    def generate_c_later():  # once the scorer holds both CPUs and has nothing left to score
        deadline = time.monotonic() + 120
        while not store.exists(_score_path(("a", 1))):
            assert time.monotonic() < deadline, "the scorer never scored expert a's cells"
            time.sleep(0.1)
        return run_stage(store, gens["c"])

    out, errors = run_together(Pipeline(), {"generate a": partial(run_stage, store, gens["a"]),
                                            "generate c": generate_c_later, "score": partial(run_stage, store, score)},
                               producers=("generate a", "generate c"), timeout_s=240)
    assert not errors, errors
    assert out["score"].computed == keys and out["generate c"].computed == [0, 1]
    assert 0 < out["score"].busy <= 1 and out["score"].nodes == [ray_session.get_runtime_context().get_node_id()]


@pytest.mark.slow
def test_a_pool_gives_its_actors_back_only_while_idle_and_another_pool_starves(ray_session, tmp_path):
    """Without a competitor an idle gated pool keeps its actor (no model reload between keys)."""
    import cluster.pool

    store, builds = Store(str(tmp_path)), tmp_path / "builds.txt"
    keys = [("a", s) for s in range(3)]
    gen = Stage(step="generate", name="a", fingerprint="fp-g", schema=SCHEMA, keys=[0, 1, 2],
                path=partial(_gen_path, "a"), job=partial(_pool_gen_job, "a", store=store, delay=0.5))
    score = Stage(step="score", name="judge", fingerprint="fp-s", schema=SCHEMA, keys=keys,
                  path=_score_path, job=partial(_pool_score_job, store=store), build=partial(_counted_build, builds),
                  resources=Resources(num_cpus=1, pool_size=1),
                  needs=lambda k: _gen_path(*k))
    out, errors = run_together(Pipeline(), {"generate a": partial(run_stage, store, gen),
                                            "score": partial(run_stage, store, score)},
                               producers=("generate a",))
    assert not errors, errors
    assert out["score"].computed == keys and builds.read_text() == "built\n"  # one model load for 3 idle gaps
    assert not cluster.pool._starving


def _gen_path(e: str, s: int) -> str:
    return f"gen/{e}/shard-{s:05d}.parquet"


def _score_path(key: tuple[str, int]) -> str:
    return f"score/{key[0]}/shard-{key[1]:05d}.parquet"


def _pool_gen_job(e: str, model: str, s: int, *, store: Store, delay: float = 0.2) -> dict:
    time.sleep(delay)
    write(store, _gen_path(e, s), "fp-g", s)
    return {"rows": 1, "seconds": delay}


def _pool_score_job(model: str, key: tuple[str, int], *, store: Store) -> dict:
    e, s = key
    assert store.valid_cell(_gen_path(e, s), SCHEMA, "fp-g")
    write(store, _score_path(key), "fp-s", s)
    return {"rows": 1, "seconds": 0.0}


def _counted_build(path) -> str:
    with path.open("a") as f:
        f.write("built\n")
    return "m"
