"""score: every reward model scores every (query, answer) of every expert; one cell per (RM, expert, shard).

Reward kinds: `loglik` and `classifier` run in the RM's Ray actor pool (the stage runner, cluster/stage.py);
`verifiable` is a pure function of the answer and the query's reference and runs in-process, and so does
`feedback`: the recording gateway's user feedback on the (query, expert) pair (tasks/traffic.py). A null score means
"no score for this row"; aggregation skips nulls (see tasks/aggregate.py `combine`). Rows are never dropped;
anomalies are flagged: `empty_response` (the expert answered nothing: not an answer, so null under every reward
model) and `nonfinite` (the reward model returned NaN/inf: stored as null). Counts go to the run manifest and
`inspect`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from cluster import models
from cluster.backends import scorer_builder
from cluster.batches import FAILED
from cluster.stage import Stage, StageResult, run_stage
from schemas.artifacts import GENERATIONS, QUERIES, SCORES, fingerprint, generation_path, queries_path, score_path
from schemas.config import MODEL_FREE, ExpertSpec, RewardSpec
from schemas.errors import ZooterError
from schemas.leases import Leases
from schemas.plan import PlannedExpert, PlannedRM
from schemas.store import Store
from tasks.generate import planned
from tasks.ingest import text_id
from tasks.traffic import feedback_identity, feedback_scores

CODE_VERSION = 1
# 2: rows right-padded in their batch (an encoder with absolute positions scored a left-padded row differently from
# the same row alone, so scores depended on their batch mates); loglik judges keep version 1 (scores unchanged)
CLASSIFIER_CODE_VERSION = 2


class Scorer(Protocol):
    """A reward model as the score job sees it (cluster/hf.py `HFLoglikScorer`, `HFClassifierScorer`,
    cluster/vllm_backend.py `VLLMClassifierScorer`)."""

    backend: str  # the backend that actually loaded (vllm falls back to hf), recorded in each cell

    def score(self, queries: list[str], answers: list[str], batch_size: int) -> list[float | None]:
        """One reward per (query, answer); None where the pair has no score."""
        ...

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


def plan_rm(rm: RewardSpec, identity_of: Callable[[str, str | None], str] = models.identity,
            store: Store | None = None) -> PlannedRM:
    """The reward model with its weights' identity and fingerprint, each computed once (`tasks.plan.plan_run`).
    A feedback RM's identity is the store's feedback so far (`store` is required for it)."""
    if rm.kind == "feedback":
        if store is None:
            raise ValueError(f"reward model {rm.name!r}: kind feedback is planned against a store")
        identity = feedback_identity(store)
    else:
        identity = identity_of(rm.model, rm.revision) if rm.model else None
    return PlannedRM(spec=rm, fingerprint=_fingerprint(rm, identity), identity=identity)


def rm_fingerprint(rm: RewardSpec) -> str:
    """What changes a score; `weight` does not (it only matters when rewards are combined). Resolves the weights'
    identity: a run takes it from its plan instead."""
    return plan_rm(rm).fingerprint


def _fingerprint(rm: RewardSpec, identity: str | None) -> str:
    # `normalise` only when not the default: scores made before the option keep their fingerprints
    d: dict[str, Any] = rm.model_dump(mode="json", exclude={"name", "resources", "weight", "model", "revision"}
                                      | ({"normalise"} if rm.normalise == "mean" else set()))
    code = CLASSIFIER_CODE_VERSION if rm.kind == "classifier" else CODE_VERSION
    d.update(weights=identity, code=code)
    return fingerprint(d)


def score_cell(model: Scorer | None, key: tuple[str, int], *, rm: RewardSpec, rm_fp: str,
               expert_fps: dict[str, str], store: Store) -> dict:
    """Score one expert's answers on one shard, key = (expert, shard), and write the cell (the stage's job:
    inside the RM's actor, or in-process with no model for a verifiable reward)."""
    expert, shard = key
    expert_fp = expert_fps[expert]
    t0 = time.perf_counter()
    q = store.read_table(queries_path(shard), QUERIES)
    g = store.read_table(generation_path(expert, expert_fp, shard), GENERATIONS)
    g = g.take(pc.index_in(q["query_id"], g["query_id"]))  # align answers with the shard's query order
    answers = g["response"].to_pylist()
    row_errors: dict[int, str] = {}
    if rm.kind == "verifiable":
        scores = [verify(a, r) for a, r in zip(answers, q["reference"].to_pylist(), strict=True)]
    elif rm.kind == "feedback":  # by the text's hash: a data-file query with its own id gets its traffic's feedback
        fb = feedback_scores(store).filter(expert=expert)
        got = dict(zip(fb["query_id"], fb["score"], strict=True))
        scores = [got.get(text_id(t)) for t in q["text"].to_pylist()]
    else:
        scores, row_errors = score_rows(model, q["text"].to_pylist(), answers, rm.resources.batch_size)
    scores, flags = flag_scores(answers, scores)
    ids = q["query_id"].to_pylist()
    # the generation's failed rows, then the RM's own: no score, flag `error`, the error in the metadata
    failed: dict[int, str] = {}
    if FAILED in g["finish_reason"].to_pylist():
        gen_errors = dict(map(tuple, store.read_meta(generation_path(expert, expert_fp, shard)).get("errors", [])))
        failed = {i: f"generation: {gen_errors.get(qid, 'failed')}"
                  for i, (qid, r) in enumerate(zip(ids, g["finish_reason"].to_pylist(), strict=True)) if r == FAILED}
    failed.update({i: e for i, e in row_errors.items() if i not in failed})
    for i in failed:
        scores[i], flags[i] = None, FAILED
    errors = [[ids[i], failed[i]] for i in sorted(failed)]
    table = pa.table({"query_id": q["query_id"], "score": pa.array(scores, pa.float64()),
                      "flag": pa.array(flags, pa.string())})
    counts = {f: flags.count(f) for f in FLAGS} | ({FAILED: len(errors)} if errors else {})
    store.write_table(score_path(rm.name, rm_fp, expert, expert_fp, shard), table, SCORES, {
        "stage": "scores", "fingerprint": rm_fp, "shard": shard, "reward_model": rm.name, "expert": expert,
        "expert_fingerprint": expert_fp, "backend_used": model.backend if model else None,
        "spec": rm.model_dump(mode="json", exclude={"resources"}), "flags": counts,
        **({"failed": len(errors), "errors": errors} if errors else {})})
    nonfinite = [[ids[i], "reward is not finite"] for i, f in enumerate(flags) if f == "nonfinite"]
    return {"rows": table.num_rows, "seconds": time.perf_counter() - t0, "flags": counts,
            "errors": errors + nonfinite}


def score_rows(model: Scorer, queries: list[str], answers: list[str],
               batch_size: int) -> tuple[list[float | None], dict[int, str]]:
    """The model's scores, where one row fails alone: a batch that raises (a tokenizer or model error on one row)
    is scored again row by row; a row that still raises has no score and its error (row index -> one line). A
    ZooterError is no row's fault: it stops the stage."""
    try:
        return model.score(queries, answers, batch_size=batch_size), {}
    except ZooterError:
        raise
    except Exception:  # noqa: BLE001 - which row? each alone tells
        out: list[float | None] = []
        errors: dict[int, str] = {}
        for i, (qq, a) in enumerate(zip(queries, answers, strict=True)):
            try:
                out += model.score([qq], [a], batch_size=1)
            except ZooterError:
                raise
            except Exception as e:  # noqa: BLE001 - this row's failure, recorded in the cell
                out.append(None)
                errors[i] = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        return out, errors


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


def run_score(store: Store, rm: PlannedRM | RewardSpec, experts: list[PlannedExpert | ExpertSpec],
              shards: list[int], leases: Leases | None = None, max_failed_fraction: float = 1.0) -> StageResult:
    """Write the RM's missing cells for every expert (leased, like run_generate); keys are (expert, shard). In the
    label flow's pipeline a key starts as soon as its generation cell exists (cluster/stage.py `Pipeline`).
    Planned specs come from the run's plan; bare ones are planned here (tests, benchmarks)."""
    planned_rm = rm if isinstance(rm, PlannedRM) else plan_rm(rm, store=store)
    spec, fp = planned_rm.spec, planned_rm.fingerprint
    efps = {e.name: e.fingerprint for e in map(planned, experts)}
    return run_stage(store, Stage(
        step="score", name=spec.name, fingerprint=fp, schema=SCORES, keys=[(e, s) for e in efps for s in shards],
        path=lambda k: score_path(spec.name, fp, k[0], efps[k[0]], k[1]),
        job=partial(score_cell, rm=spec, rm_fp=fp, expert_fps=efps, store=store),
        build=None if spec.kind in MODEL_FREE else scorer_builder(planned_rm),
        resources=spec.resources, tensor_parallel=spec.tensor_parallel_size,
        needs=lambda k: generation_path(k[0], efps[k[0]], k[1]), max_failed_fraction=max_failed_fraction), leases)
