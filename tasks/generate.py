"""generate: every expert answers every query, one Parquet cell per (expert fingerprint, shard).

The pure parts (prompt rendering, the fingerprint, building a cell from a model's outputs) live here; the
expert's Ray actor pool comes from `cluster/`. A cell that exists and validates is never computed again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from cluster import models
from cluster.backends import generator_builder
from cluster.pool import run_pool
from schemas.artifacts import GENERATIONS, QUERIES, fingerprint, generation_path, queries_path
from schemas.config import ConfigError, ExpertSpec
from schemas.store import Leases, Store, cell_todo, compute_once

CODE_VERSION = 1  # bump when a change here alters generated text


def template_text(prompt: str) -> str:
    """`chat`, a template name from tasks/prompts/, or a path to a template file with a {query} placeholder."""
    if prompt == "chat":
        return "chat"
    builtin = files("tasks") / "prompts" / f"{prompt}.txt"
    path = Path(str(builtin)) if builtin.is_file() else Path(prompt)
    if not path.is_file():
        raise ConfigError(f"prompt {prompt!r}: not `chat`, a template in tasks/prompts/, or a file")
    text = path.read_text(encoding="utf-8")
    if "{query}" not in text:
        raise ConfigError(f"prompt template {path}: has no {{query}} placeholder")
    return text


def expert_fingerprint(spec: ExpertSpec) -> str:
    """Everything that changes the answers, nothing that does not (pool size, threads, resources)."""
    d: dict[str, Any] = spec.model_dump(mode="json", exclude={"name", "resources", "model", "revision"})
    d.update(weights=models.identity(spec.model, spec.revision), template=template_text(spec.prompt),
             code=CODE_VERSION)
    if spec.sampling.temperature > 0:  # the random stream is drawn per batch: batch size shapes sampled output
        d["batch_size"] = spec.resources.batch_size
    return fingerprint(d)


def render(model: Any, template: str, texts: list[str]) -> list[str]:
    if template == "chat":
        return [model.render(t) for t in texts]
    return [template.replace("{query}", t) for t in texts]


def generate_cell(model: Any, spec: ExpertSpec, fp: str, store: Store, shard: int) -> dict:
    """Answer one shard and write its cell (runs inside the expert's actor)."""
    t0 = time.perf_counter()
    q = store.read_table(queries_path(shard), QUERIES)
    prompts = render(model, template_text(spec.prompt), q["text"].to_pylist())
    s = spec.sampling
    gens = model.generate(prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                          seed=s.seed + shard * 100_003, stop=s.stop, batch_size=spec.resources.batch_size)
    empty = sum(not g.response.strip() for g in gens)  # kept; scoring flags them (see tasks/score.py)
    table = pa.table({
        "query_id": q["query_id"],
        "response": [g.response for g in gens],
        "prompt_tokens": pa.array([g.prompt_tokens for g in gens], pa.int32()),
        "new_tokens": pa.array([g.new_tokens for g in gens], pa.int32()),
        "finish_reason": [g.finish_reason for g in gens],
    })
    store.write_table(generation_path(spec.name, fp, shard), table, GENERATIONS, {
        "stage": "generations", "fingerprint": fp, "shard": shard, "expert": spec.name,
        "spec": spec.model_dump(mode="json", exclude={"resources"}), "flags": {"empty_response": empty}})
    return {"shard": shard, "rows": table.num_rows, "new_tokens": sum(g.new_tokens for g in gens),
            "seconds": time.perf_counter() - t0, "flags": {"empty_response": empty}}


@dataclass
class StageResult:
    name: str
    fingerprint: str
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # valid already, or written meanwhile by a concurrent run
    repaired: list[int] = field(default_factory=list)  # broken files found in place of a cell, computed over
    rows: int = 0
    new_tokens: int = 0
    seconds: float = 0.0  # wall time of the stage, actor start and model load included
    job_seconds: float = 0.0  # summed time inside the shard jobs (read, model, write)
    flags: dict[str, int] = field(default_factory=dict)  # flagged rows in the cells computed, by flag

    def add(self, out: dict) -> None:
        """Count one finished job (a dict from generate_cell / score_cell)."""
        self.rows += out["rows"]
        self.new_tokens += out.get("new_tokens", 0)
        self.job_seconds += out["seconds"]
        for k, n in out.get("flags", {}).items():
            if n:
                self.flags[k] = self.flags.get(k, 0) + n


def run_generate(store: Store, spec: ExpertSpec, shards: list[int], leases: Leases | None = None) -> StageResult:
    """Write the expert's missing cells (leased, so a concurrent run never computes the same cell)."""
    fp = expert_fingerprint(spec)
    res = StageResult(spec.name, fp)
    rel = lambda s: generation_path(spec.name, fp, s)  # noqa: E731
    todo, res.skipped, res.repaired = cell_todo(store, [(s, rel(s)) for s in shards], GENERATIONS, fp)
    t0 = time.perf_counter()

    def compute(keys: list[int], claim: Callable[[int], bool]) -> Iterator[int]:
        jobs = [(generate_cell, (spec, fp, store, s)) for s in keys]
        pool = run_pool(generator_builder(spec), jobs, spec.resources, spec.tensor_parallel_size,
                        claim=lambda i: claim(keys[i]))
        for out in tqdm(pool, total=len(jobs), desc=f"generate {spec.name}", unit="shard"):
            res.add(out)
            yield out["shard"]

    computed, by_others = compute_once(leases or store, todo, rel,
                                       lambda s: store.valid_cell(rel(s), GENERATIONS, fp), compute)
    res.computed, res.skipped = sorted(computed), sorted(res.skipped + by_others)
    res.seconds = time.perf_counter() - t0
    return res
