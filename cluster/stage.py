"""The stage runner: one loop for every cell-producing step (tag, generate, score, embed).

A step declares a `Stage` (its fingerprint, cell schema, the keys it covers and each key's cell path, the per-key
job and the model builder) and calls `run_stage`. The runner owns everything around the job: which cells are done,
missing or broken (`cell_todo`), leases so that concurrent runs split the work (`compute_once`), the actor pool
(`run_pool`), where its actors ran, progress (stderr) and timing.

Stages of one run overlap in a `Pipeline`: each stage publishes its cells as they become valid, and a stage whose
keys need another stage's cells (`Stage.needs`: scoring needs each (expert, shard)'s generation cell) starts a key as
soon as that cell exists. The first failure stops every stage of the pipeline.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import pyarrow as pa
from tqdm.auto import tqdm

from cluster.pool import POLL_S, PoolUsage, run_pool
from schemas.config import Resources
from schemas.errors import ArtifactError, ZooterError
from schemas.leases import Leases, compute_once
from schemas.store import Store, cell_todo

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Stage(Generic[K]):
    """What a step declares; `run_stage` does the rest."""

    step: str  # "generate", "score", ... (progress bars and logs)
    name: str  # the expert / reward model / encoder this stage runs: the run manifest's record name
    fingerprint: str  # every cell carries it in its metadata; a cell with another fingerprint is not done
    schema: pa.Schema  # the cells' schema
    keys: Sequence[K]  # what the stage covers: shards, or (expert, shard) pairs
    path: Callable[[K], str]  # the cell path of a key
    # job(model, key) -> {"rows": int, "seconds": float, optional "new_tokens": int, "flags": {flag: count}};
    # it writes the key's cell itself. It runs inside the pool's actors, so it must pickle (a module-level
    # function or a functools.partial of one).
    job: Callable[[Any, K], dict]
    build: Callable[[], Any] | None = None  # the model builder an actor calls once; None: in-process, model None
    resources: Resources = field(default_factory=Resources)
    tensor_parallel: int = 1
    unit: str = "cell"
    # needs(key) -> the path of the cell (another stage's) the key's job reads; in a Pipeline the key starts once
    # that cell is valid. None: the inputs exist before the stage starts (queries).
    needs: Callable[[K], str] | None = None
    # More failed rows (a job's `errors`: rows that failed alone, non-finite rewards) than this share of the
    # stage's rows fail the stage, naming the first error; fewer are counted and left out of the labels.
    max_failed_fraction: float = 1.0


@dataclass
class StageResult(Generic[K]):
    """What one stage did in this run (the run manifest's StageRecord is built from it)."""

    name: str
    fingerprint: str
    computed: list[K] = field(default_factory=list)
    skipped: list[K] = field(default_factory=list)  # valid already, or written meanwhile by a concurrent run
    repaired: list[K] = field(default_factory=list)  # broken files found in place of a cell, computed over
    rows: int = 0
    new_tokens: int = 0
    seconds: float = 0.0  # wall time of the stage, actor start and model load included
    job_seconds: float = 0.0  # summed time inside the jobs (read, model, write)
    flags: dict[str, int] = field(default_factory=dict)  # flagged rows in the cells computed, by flag
    failed: int = 0  # rows that failed alone in the cells computed (a cell with any is computed again next run)
    first_error: str | None = None  # "query q1: ValueError: ..." (the first failed row's, in key order)
    nodes: list[str] = field(default_factory=list)  # Ray node ids of the actors that computed cells
    busy: float | None = None  # share of its actors' time (model loaded, until released) spent in jobs
    jobs_from: datetime | None = None  # when its first job in this run started (UTC)
    jobs_until: datetime | None = None  # when its last job ended

    def add(self, out: dict) -> None:
        """Count one finished job."""
        self.rows += out["rows"]
        end = datetime.now(UTC)
        start = datetime.fromtimestamp(end.timestamp() - out["seconds"], UTC)
        self.jobs_from = min(self.jobs_from or start, start)
        self.jobs_until = max(self.jobs_until or end, end)
        self.new_tokens += out.get("new_tokens", 0)
        self.job_seconds += out["seconds"]
        for k, n in out.get("flags", {}).items():
            if n:
                self.flags[k] = self.flags.get(k, 0) + n
        errors = out.get("errors") or []
        self.failed += len(errors)
        if errors and self.first_error is None:
            self.first_error = f"query {errors[0][0]}: {errors[0][1]}"


class TooManyFailedRows(ZooterError):
    """More rows of a stage failed alone than `data.max_failed_fraction` allows."""


def check_failed(label: str, res: StageResult, fraction: float) -> None:
    """Fail the stage when its failed rows exceed `fraction` of its rows. The cells reused hold no failed row (a
    cell with one is computed again), so the stage's rows are the computed ones plus the reused cells' at the
    computed cells' mean size."""
    if not res.failed:
        return
    total = res.rows + round(len(res.skipped) * res.rows / max(1, len(res.computed)))
    if res.failed > fraction * total:
        raise TooManyFailedRows(
            f"{label}: {res.failed} of {total} rows failed, more than data.max_failed_fraction = {fraction:g}; "
            f"first: {res.first_error}")


class StageAborted(RuntimeError):
    """A stage stopped because another stage of its pipeline failed (the message names that stage)."""


_PIPELINE: contextvars.ContextVar[Pipeline | None] = contextvars.ContextVar("zooter_pipeline", default=None)


class Pipeline:
    """The stages of one run that run at the same time: the cells they made valid so far, the stages that may still
    write some (`opened`/`closed` by the flow), and the first failure.

    `with Pipeline():` makes it the pipeline of every stage started in that context: Prefect's thread task runner
    copies the submitting context into each task, so the stages of tasks submitted inside the block share it.
    Outside any pipeline a stage runs as it always did (its inputs exist)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._valid: set[str] = set()  # cell paths some stage of the run found valid or wrote
        self._open: set[str] = set()  # stages that may still write cells
        self.failed: str | None = None  # "generate gemma3: ValueError: ..."
        self.error: BaseException | None = None  # the first failure as raised in its stage (None: a crash)
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Pipeline:
        self._token = _PIPELINE.set(self)
        return self

    def __exit__(self, typ: object, error: BaseException | None, tb: object) -> None:
        _PIPELINE.reset(self._token)
        if error is not None:  # the flow stopped: so do the stages still running (before Prefect waits for them)
            self.fail("the flow", error)

    def opened(self, name: str) -> None:
        """A stage that writes cells others need has been started (before those others are)."""
        with self._cond:
            self._open.add(name)

    def closed(self, name: str, failure: str | None = None) -> None:
        """That stage ended; `failure`: why it failed (a stage that failed in run_stage has said so already)."""
        with self._cond:
            self._open.discard(name)
            if failure is not None and self.failed is None:
                self.failed = f"{name}: {failure}"
            self._cond.notify_all()

    def fail(self, stage: str, error: BaseException) -> None:
        with self._cond:
            if self.failed is None:
                self.failed, self.error = f"{stage}: {type(error).__name__}: {error}", error
            self._cond.notify_all()

    def publish(self, paths: Sequence[str]) -> None:
        with self._cond:
            self._valid.update(paths)
            self._cond.notify_all()

    def has(self, path: str) -> tuple[bool, bool]:
        """(the cell is valid, stages that may write it are still running)."""
        with self._cond:
            return path in self._valid, bool(self._open)

    def check(self, stage: str) -> None:
        if self.failed is not None:
            raise StageAborted(f"{stage} stopped: {self.failed}")

    def wait(self, stage: str, timeout: float) -> None:
        """Until a cell is published, a stage ends or fails, or `timeout` s; raises once a stage has failed."""
        with self._cond:
            if self.failed is None and timeout > 0:
                self._cond.wait(timeout)
        self.check(stage)


@dataclass
class _Gate(Generic[K]):
    """A stage's keys in its pipeline (cluster/pool.py `Gate`): ready once the cell they need is valid."""

    pipe: Pipeline
    store: Store
    stage: Stage[K]
    label: str

    def ready(self, key: K) -> bool:
        self.pipe.check(self.label)
        if self.stage.needs is None:
            return True
        path = self.stage.needs(key)
        valid, writing = self.pipe.has(path)
        if valid or writing:
            return valid
        if self.store.exists(path):  # written before this run, outside its stages (the job validates it)
            self.pipe.publish([path])
            return True
        raise ArtifactError(f"{self.label}: {self.store.uri(path)} is missing, and no stage of this run writes it")

    def wait(self, timeout: float) -> None:
        self.pipe.wait(self.label, timeout)


def run_stage(store: Store, stage: Stage[K], leases: Leases | None = None) -> StageResult[K]:
    """Compute the stage's missing (or broken) cells, each exactly once across concurrent runs on the store.

    `leases`: the run's Leases (concurrent runs wait for the cells it holds); None leases for this call only.
    In a `Pipeline` (see there) its cells are published as they become valid, keys with `stage.needs` wait for
    theirs, and it stops when another stage fails (as that stage's failure stops it)."""
    label = f"{stage.step} {stage.name}"
    pipe = _PIPELINE.get()
    try:
        return _run(store, stage, leases, pipe)
    except StageAborted:
        raise
    except BaseException as e:
        if pipe is not None:
            pipe.fail(label, e)
        if f"in stage {label}" not in (getattr(e, "__notes__", None) or []):  # the CLI's error line names it
            e.add_note(f"in stage {label}")
        raise


def _run(store: Store, stage: Stage[K], leases: Leases | None, pipe: Pipeline | None) -> StageResult[K]:
    res: StageResult[K] = StageResult(stage.name, stage.fingerprint)
    todo, done, res.repaired = cell_todo(store, [(k, stage.path(k)) for k in stage.keys], stage.schema,
                                         stage.fingerprint)
    gate = None if pipe is None else _Gate(pipe, store, stage, f"{stage.step} {stage.name}")
    if pipe is not None:
        pipe.publish([stage.path(k) for k in done])
    nodes: set[str] = set()
    usage = PoolUsage()
    t0 = time.perf_counter()

    def in_process(keys: list[K], claim: Callable[[K], bool]) -> Iterator[tuple[K, dict]]:
        left = list(keys)
        while left:
            ready = [k for k in left if gate is None or gate.ready(k)]
            if not ready:
                gate.wait(POLL_S)
                continue
            taken = set(ready)
            left = [k for k in left if k not in taken]
            for k in ready:
                if gate is not None:
                    gate.wait(0)  # raises once another stage failed
                if claim(k):
                    yield k, stage.job(None, k)

    def compute(keys: list[K], claim: Callable[[K], bool]) -> Iterator[K]:
        if stage.build is None:
            results: Iterator[tuple[K, dict]] = in_process(keys, claim)
        else:
            results = run_pool(stage.build, stage.job, keys, stage.resources, stage.tensor_parallel, claim, nodes,
                               gate, usage)
        with tqdm(total=len(keys), desc=f"{stage.step} {stage.name}", unit=stage.unit, file=sys.stderr) as bar:
            for k, out in results:
                res.add(out)
                if pipe is not None:
                    pipe.publish([stage.path(k)])
                bar.update()
                yield k

    def valid(k: K) -> bool:
        # compute_once asks this right after taking k's lease, before k is computed: one read per computed cell,
        # and not a redundant one. The listing above is older than the lease, and another run may have written k
        # and given its lease back in between: a released lease leaves no trace, so nothing cheaper shows it, and
        # a second computation would overwrite a cell that run's later stages already read (a generation is not
        # bit-reproducible across machines). Only a proof of absence taken after the lease can replace this read:
        # one listing of the folder after a batch of leases (a run would then hold leases ahead of its actors), or
        # an exclusive write of the cell (If-None-Match) that fails when another run got there first (the jobs'
        # writes and compute_once would change).
        why, meta = store.cell(stage.path(k), stage.schema, stage.fingerprint)
        return why is None and not meta.get("failed")

    computed, by_others = compute_once(leases or store, todo, stage.path, valid, compute)
    if pipe is not None:
        pipe.publish([stage.path(k) for k in by_others])
    order = {k: i for i, k in enumerate(stage.keys)}
    res.computed = sorted(computed, key=order.__getitem__)
    res.skipped = sorted(done + by_others, key=order.__getitem__)
    res.nodes = sorted(nodes)
    res.busy = usage.busy
    res.seconds = time.perf_counter() - t0
    check_failed(f"{stage.step} {stage.name}", res, stage.max_failed_fraction)
    return res
