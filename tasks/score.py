"""score: every reward model scores every (query, answer) of every expert; one cell per (RM, expert, shard).

Reward kinds: `loglik` and `classifier` run in the RM's Ray actor pool (cluster/); `verifiable` is a pure
function of the answer and the query's reference and runs in-process. A null score means "no score for this
row"; aggregation skips nulls (see tasks/aggregate.py `combine`). Rows are never dropped; anomalies are flagged:
`empty_response` (the expert answered nothing: not an answer, so null under every reward model) and
`nonfinite` (the reward model returned NaN/inf: stored as null). Counts go to the run manifest and `inspect`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from cluster import models
from cluster.backends import scorer_builder
from cluster.pool import run_pool
from schemas.artifacts import GENERATIONS, QUERIES, SCORES, fingerprint, generation_path, queries_path, score_path
from schemas.config import ExpertSpec, RewardSpec
from schemas.store import Leases, Store, cell_todo, compute_once
from tasks.generate import StageResult, expert_fingerprint

CODE_VERSION = 1

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def verify(answer: str, reference: str | None) -> float | None:
    """1.0 if the answer matches the reference, else 0.0; None without a reference.

    A numeric reference matches the last number in the answer (so "... = 12." and "12 apples" both match 12);
    any other reference must appear in the answer, case- and whitespace-insensitively.
    """
    if reference is None or not reference.strip():
        return None
    ref_num = _number(reference.strip().rstrip("%"))
    if ref_num is not None:
        nums = _NUM.findall(answer)
        got = _number(nums[-1]) if nums else None
        return float(got is not None and math.isclose(got, ref_num, rel_tol=1e-6, abs_tol=1e-9))
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    return float(norm(reference) in norm(answer))


def rm_fingerprint(rm: RewardSpec) -> str:
    """What changes a score; `weight` does not (it only matters when rewards are combined)."""
    d: dict[str, Any] = rm.model_dump(mode="json", exclude={"name", "resources", "weight", "model", "revision"})
    d.update(weights=models.identity(rm.model, rm.revision) if rm.model else None, code=CODE_VERSION)
    return fingerprint(d)


def score_cell(model: Any, rm: RewardSpec, rm_fp: str, expert: str, expert_fp: str, store: Store,
               shard: int) -> dict:
    """Score one expert's answers on one shard and write the cell (inside the RM's actor, or in-process)."""
    t0 = time.perf_counter()
    q = store.read_table(queries_path(shard), QUERIES)
    g = store.read_table(generation_path(expert, expert_fp, shard), GENERATIONS)
    g = g.take(pc.index_in(q["query_id"], g["query_id"]))  # align answers with the shard's query order
    answers = g["response"].to_pylist()
    if rm.kind == "verifiable":
        scores = [verify(a, r) for a, r in zip(answers, q["reference"].to_pylist(), strict=True)]
    else:
        scores = model.score(q["text"].to_pylist(), answers, batch_size=rm.resources.batch_size)
    scores, flags = flag_scores(answers, scores)
    table = pa.table({"query_id": q["query_id"], "score": pa.array(scores, pa.float64()),
                      "flag": pa.array(flags, pa.string())})
    counts = {f: flags.count(f) for f in FLAGS}
    store.write_table(score_path(rm.name, rm_fp, expert, expert_fp, shard), table, SCORES, {
        "stage": "scores", "fingerprint": rm_fp, "shard": shard, "reward_model": rm.name, "expert": expert,
        "expert_fingerprint": expert_fp, "backend_used": getattr(model, "backend", None),
        "spec": rm.model_dump(mode="json", exclude={"resources"}), "flags": counts})
    return {"expert": expert, "shard": shard, "rows": table.num_rows, "seconds": time.perf_counter() - t0,
            "flags": counts}


FLAGS = ("empty_response", "nonfinite")


def flag_scores(answers: list[str], scores: list[float | None]) -> tuple[list[float | None], list[str | None]]:
    """The documented rule: an empty answer gets no score; NaN/inf is no score. Both rows stay, flagged."""
    out, flags = [], []
    for a, s in zip(answers, scores, strict=True):
        if not a.strip():
            out.append(None)
            flags.append("empty_response")
        elif s is not None and not math.isfinite(s):
            out.append(None)
            flags.append("nonfinite")
        else:
            out.append(s)
            flags.append(None)
    return out, flags


def run_score(store: Store, rm: RewardSpec, experts: list[ExpertSpec], shards: list[int],
              leases: Leases | None = None) -> StageResult:
    """Write the RM's missing cells for every expert (leased, like run_generate)."""
    fp = rm_fingerprint(rm)
    res = StageResult(rm.name, fp)
    efps = {e.name: expert_fingerprint(e) for e in experts}
    rel = lambda k: score_path(rm.name, fp, k[0], efps[k[0]], k[1])  # noqa: E731 - k = (expert, shard)
    keys = [(e.name, s) for e in experts for s in shards]
    todo, done, repaired = cell_todo(store, [(k, rel(k)) for k in keys], SCORES, fp)
    t0 = time.perf_counter()

    def compute(keys: list[tuple[str, int]], claim: Callable[[tuple[str, int]], bool]) -> Iterator[tuple[str, int]]:
        jobs = [(score_cell, (rm, fp, e, efps[e], store, s)) for e, s in keys]
        if rm.kind == "verifiable":
            results = (fn(None, *args) for k, (fn, args) in zip(keys, jobs, strict=True) if claim(k))
        else:
            results = run_pool(scorer_builder(rm), jobs, rm.resources, rm.tensor_parallel_size,
                               claim=lambda i: claim(keys[i]))
        for out in tqdm(results, total=len(jobs), desc=f"score {rm.name}", unit="cell"):
            res.add(out)
            yield out["expert"], out["shard"]

    computed, by_others = compute_once(leases or store, todo, rel, lambda k: store.valid_cell(rel(k), SCORES, fp),
                                       compute)
    res.computed = [s for _, s in computed]
    res.skipped = [s for _, s in done + by_others]
    res.repaired = [s for _, s in repaired]
    res.seconds = time.perf_counter() - t0
    return res
