"""The stage runner: one loop for every cell-producing step (tag, generate, score, embed).

A step declares a `Stage` (its fingerprint, cell schema, the keys it covers and each key's cell path, the per-key
job and the model builder) and calls `run_stage`. The runner owns everything around the job: which cells are done,
missing or broken (`cell_todo`), leases so that concurrent runs split the work (`compute_once`), the actor pool
(`run_pool`), where its actors ran, progress (stderr) and timing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pyarrow as pa
from tqdm.auto import tqdm

from cluster.pool import run_pool
from schemas.config import Resources
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
    nodes: list[str] = field(default_factory=list)  # Ray node ids of the actors that computed cells

    def add(self, out: dict) -> None:
        """Count one finished job."""
        self.rows += out["rows"]
        self.new_tokens += out.get("new_tokens", 0)
        self.job_seconds += out["seconds"]
        for k, n in out.get("flags", {}).items():
            if n:
                self.flags[k] = self.flags.get(k, 0) + n


def run_stage(store: Store, stage: Stage[K], leases: Leases | None = None) -> StageResult[K]:
    """Compute the stage's missing (or broken) cells, each exactly once across concurrent runs on the store.

    `leases`: the run's Leases (concurrent runs wait for the cells it holds); None leases for this call only."""
    res: StageResult[K] = StageResult(stage.name, stage.fingerprint)
    todo, done, res.repaired = cell_todo(store, [(k, stage.path(k)) for k in stage.keys], stage.schema,
                                         stage.fingerprint)
    nodes: set[str] = set()
    t0 = time.perf_counter()

    def compute(keys: list[K], claim: Callable[[K], bool]) -> Iterator[K]:
        if stage.build is None:
            results: Iterator[tuple[K, dict]] = ((k, stage.job(None, k)) for k in keys if claim(k))
        else:
            results = run_pool(stage.build, stage.job, keys, stage.resources, stage.tensor_parallel, claim, nodes)
        with tqdm(total=len(keys), desc=f"{stage.step} {stage.name}", unit=stage.unit, file=sys.stderr) as bar:
            for k, out in results:
                res.add(out)
                bar.update()
                yield k

    def valid(k: K) -> bool:
        return store.valid_cell(stage.path(k), stage.schema, stage.fingerprint)

    computed, by_others = compute_once(leases or store, todo, stage.path, valid, compute)
    order = {k: i for i, k in enumerate(stage.keys)}
    res.computed = sorted(computed, key=order.__getitem__)
    res.skipped = sorted(done + by_others, key=order.__getitem__)
    res.nodes = sorted(nodes)
    res.seconds = time.perf_counter() - t0
    return res
