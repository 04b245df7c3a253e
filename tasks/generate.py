"""generate: every expert answers every query, one Parquet cell per (expert fingerprint, shard).

The pure parts (prompt rendering, the fingerprint, building a cell from a model's outputs) live here; the stage
runner (`cluster/stage.py`) runs the cell job in the expert's Ray actor pool. A cell that exists and validates is
never computed again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from cluster import models
from cluster.backends import generator_builder
from cluster.batches import FAILED, Generation, failed_row
from cluster.stage import Stage, StageResult, run_stage
from schemas.artifacts import GENERATIONS, QUERIES, fingerprint, generation_path, queries_path
from schemas.config import ExpertSpec
from schemas.errors import ConfigError, ZooterError
from schemas.leases import Leases
from schemas.plan import PlannedExpert
from schemas.store import Store

CODE_VERSION = 1  # bump when a change here alters generated text
# ExpertSpec fields outside a local (hf/vllm) expert's fingerprint: identity is hashed as `weights`; the rest
# does not change its answers
NOT_LOCAL_OUTPUT = {"name", "resources", "model", "revision", "cost", "base_url", "api_key_env",
                    "max_in_flight", "timeout_s"}


class Generator(Protocol):
    """An expert as the generate job sees it (cluster/hf.py `HFGenerator`, cluster/vllm_backend.py
    `VLLMGenerator`, cluster/openai_backend.py `OpenAIGenerator`)."""

    def render(self, query: str) -> str:
        """The query in the model's chat template (an endpoint's server applies it: the query as it is)."""
        ...

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 stop: list[str], batch_size: int) -> list[Generation]:
        """One answer per prompt, in order."""
        ...


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


def plan_expert(spec: ExpertSpec, identity_of: Callable[[str, str | None], str] = models.identity) -> PlannedExpert:
    """The expert with its weights' identity and fingerprint, each computed once (`tasks.plan.plan_run` calls this
    for every expert of a run, with one `identity_of` for the run; the steps use what it returns)."""
    identity = None if spec.backend in ("openai", "synthetic") else identity_of(spec.model, spec.revision)
    return PlannedExpert(spec=spec, fingerprint=_fingerprint(spec, identity), identity=identity)


def expert_fingerprint(spec: ExpertSpec) -> str:
    """Everything that changes the answers, nothing that does not (pool size, threads, resources, cost; for an
    endpoint: its URL, key and limits). Resolves the weights' identity: a run takes it from its plan instead."""
    return plan_expert(spec).fingerprint


def _fingerprint(spec: ExpertSpec, identity: str | None) -> str:
    if spec.backend == "synthetic":  # benchmarks/tests: the answer is a hash of the name and the prompt
        return fingerprint({"backend": "synthetic", "name": spec.name, "sampling": spec.sampling.model_dump(
            mode="json"), "template": template_text(spec.prompt), "code": CODE_VERSION})
    if spec.backend == "openai":  # the served model id (and `revision`, a label to bump when it is redeployed)
        return fingerprint({"backend": "openai", "model": spec.model, "revision": spec.revision,
                            "sampling": spec.sampling.model_dump(mode="json"), "template": template_text(spec.prompt),
                            "code": CODE_VERSION})
    d: dict[str, Any] = spec.model_dump(mode="json", exclude=NOT_LOCAL_OUTPUT)
    d.update(weights=identity, template=template_text(spec.prompt), code=CODE_VERSION)
    if spec.sampling.temperature > 0:  # the random stream is drawn per batch: batch size shapes sampled output
        d["batch_size"] = spec.resources.batch_size
    return fingerprint(d)


def planned(expert: PlannedExpert | ExpertSpec) -> PlannedExpert:
    """A step's expert: the plan's, or a bare spec planned here (tests, benchmarks, one-off calls)."""
    return expert if isinstance(expert, PlannedExpert) else plan_expert(expert)


def render(model: Generator | None, template: str, texts: list[str]) -> list[str]:
    if template == "chat":
        return [model.render(t) for t in texts]
    return [template.replace("{query}", t) for t in texts]


def answer(model: Generator, spec: ExpertSpec, texts: list[str], seed: int, batch_size: int,
           max_new_tokens: int | None = None, keep_failed: bool = False) -> list[Generation]:
    """The expert's answers: `texts` rendered with its prompt and sampled with its settings (at most
    `max_new_tokens` new tokens when given, never more than its own limit). The generate step's cells and the
    gateway's local experts both answer through here. A row that failed alone raises `RowFailed` unless
    `keep_failed` (the generate step keeps it in its cell; the gateway answers its caller with the error)."""
    s = spec.sampling
    limit = min(max_new_tokens or s.max_new_tokens, s.max_new_tokens)
    out = model.generate(render(model, template_text(spec.prompt), texts), max_new_tokens=limit,
                         temperature=s.temperature, top_p=s.top_p, seed=seed, stop=s.stop, batch_size=batch_size)
    if not keep_failed and (bad := next((g for g in out if g.finish_reason == FAILED), None)):
        raise RowFailed(f"expert {spec.name!r}: {bad.error}")
    return out


class RowFailed(RuntimeError):
    """A row the expert could not answer (cluster/batches.py `failed_row`), outside a generate cell."""


def answer_rows(model: Generator, spec: ExpertSpec, texts: list[str], seed: int, batch_size: int) -> list[Generation]:
    """`answer`, where one row fails alone: a backend reports a row's own failure as a `failed_row`; a batch that
    raises anyway (a tokenizer or model error on one row) is answered again row by row, and the rows that still
    raise are failed rows. A ZooterError (a bad key, a missing model) is no row's fault: it stops the stage."""
    try:
        return answer(model, spec, texts, seed, batch_size, keep_failed=True)
    except ZooterError:
        raise
    except Exception:  # noqa: BLE001 - which row? each alone tells
        out = []
        for i, t in enumerate(texts):
            try:
                out += answer(model, spec, [t], seed + i, 1, keep_failed=True)
            except ZooterError:
                raise
            except Exception as e:  # noqa: BLE001 - this row's failure, recorded in the cell
                out.append(failed_row(e))
        return out


def generate_cell(model: Generator, shard: int, *, spec: ExpertSpec, fp: str, store: Store) -> dict:
    """Answer one shard and write its cell (the stage's job: runs inside the expert's actor). A row that failed
    alone is kept with an empty response and finish_reason `error`; its error is in the cell's metadata
    (`errors`: [[query_id, error], ...], `failed`: their count), and the next run computes the cell again."""
    t0 = time.perf_counter()
    q = store.read_table(queries_path(shard), QUERIES)
    gens = answer_rows(model, spec, q["text"].to_pylist(), spec.sampling.seed + shard * 100_003,
                       spec.resources.batch_size)
    errors = [[qid, g.error or "failed"] for qid, g in zip(q["query_id"].to_pylist(), gens, strict=True)
              if g.error is not None or g.finish_reason == FAILED]
    empty = sum(not g.response.strip() for g in gens) - len(errors)  # kept; scoring flags them (tasks/score.py)
    table = pa.table({
        "query_id": q["query_id"],
        "response": [g.response for g in gens],
        "prompt_tokens": pa.array([g.prompt_tokens for g in gens], pa.int32()),
        "new_tokens": pa.array([g.new_tokens for g in gens], pa.int32()),
        "finish_reason": [g.finish_reason for g in gens],
    })
    store.write_table(generation_path(spec.name, fp, shard), table, GENERATIONS, {
        "stage": "generations", "fingerprint": fp, "shard": shard, "expert": spec.name,
        "spec": spec.model_dump(mode="json", exclude={"resources"}), "flags": {"empty_response": empty},
        **({"failed": len(errors), "errors": errors} if errors else {})})
    return {"rows": table.num_rows, "new_tokens": sum(g.new_tokens for g in gens),
            "seconds": time.perf_counter() - t0, "flags": {"empty_response": empty}, "errors": errors}


def run_generate(store: Store, expert: PlannedExpert | ExpertSpec, shards: list[int],
                 leases: Leases | None = None, max_failed_fraction: float = 1.0) -> StageResult:
    """Write the expert's missing cells (leased, so a concurrent run never computes the same cell), and those with
    failed rows again; more failed rows than `max_failed_fraction` of its rows fail the stage."""
    expert = planned(expert)
    spec, fp = expert.spec, expert.fingerprint
    return run_stage(store, Stage(
        step="generate", name=spec.name, fingerprint=fp, schema=GENERATIONS, keys=shards,
        path=partial(generation_path, spec.name, fp), job=partial(generate_cell, spec=spec, fp=fp, store=store),
        build=generator_builder(expert), resources=spec.resources,
        tensor_parallel=spec.tensor_parallel_size, unit="shard", max_failed_fraction=max_failed_fraction), leases)
