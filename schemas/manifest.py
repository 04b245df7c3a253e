"""The run manifest: `runs/<run_id>/manifest.json`, the lineage a user inspects.

Beside the run's plan (`plan.json`: the config resolved, store options redacted): every fingerprint, the cells
each stage computed or reused, row counts, timings and package versions; and the helpers every flow uses to fill
it, write it and return it (`Outcome`).
"""

from __future__ import annotations

import platform
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.artifacts import report_path, run_manifest_path
from schemas.evaluation import EvalReport
from schemas.store import Store

PACKAGES = ("zooter-flow", "torch", "transformers", "ray", "prefect", "polars", "pyarrow", "s3fs")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


class StageCounts(Protocol):
    """What a stage run reports (cluster/stage.py `StageResult`): a StageRecord is built from it."""

    name: str
    fingerprint: str
    computed: Sequence[Any]
    skipped: Sequence[Any]
    repaired: Sequence[Any]
    rows: int
    new_tokens: int
    seconds: float
    nodes: list[str]
    flags: dict[str, int]
    busy: float | None
    jobs_from: datetime | None
    jobs_until: datetime | None


class StageRecord(BaseModel):
    """One cell-producing stage (an expert's generation, a reward model's scoring, embedding) in one run."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="The expert, reward model or encoder the stage ran.")
    fingerprint: str = Field(description="Its fingerprint: the cells' directory and metadata carry it.")
    cells_computed: int = Field(0, description="Cells this run computed.")
    cells_reused: int = Field(0, description="Cells found valid, or written meanwhile by a concurrent run.")
    cells_repaired: int = Field(0, description="Broken files found where a cell belongs (truncated, foreign "
                                "schema), logged and computed over; included in cells_computed.")
    rows: int = Field(0, description="Rows in the cells computed.")
    new_tokens: int = Field(0, description="Tokens generated in the cells computed (generation only).")
    seconds: float = Field(0.0, description="Wall time of the stage, actor start and model load included.")
    nodes: list[str] = Field(default_factory=list, description="Ray node ids the stage's actors ran on.")
    flags: dict[str, int] = Field(default_factory=dict, description="Rows flagged in the cells computed, by "
                                  "flag: empty_response, nonfinite (see tasks/score.py).")
    failed: int = Field(0, description="Rows that failed alone in the cells computed (docs/failures.md#row-failures): "
                        "left out of the labels, retried by the next run; non-finite rewards included.")
    first_error: str | None = Field(None, description="The first failed row's query id and error.")
    busy: float | None = Field(None, description="Share of its actors' time, from model loaded to released, spent "
                               "in jobs (None: no actor ran, e.g. a verifiable reward or nothing to compute).")
    jobs_from: datetime | None = Field(None, description="When its first job in this run started (UTC): stages of "
                                       "a run overlap, e.g. scoring starts while generation goes on.")
    jobs_until: datetime | None = Field(None, description="When its last job in this run ended (UTC).")

    @classmethod
    def of(cls, r: StageCounts) -> StageRecord:
        return cls(name=r.name, fingerprint=r.fingerprint, cells_computed=len(r.computed),
                   cells_reused=len(r.skipped), cells_repaired=len(r.repaired), rows=r.rows,
                   new_tokens=r.new_tokens, seconds=round(r.seconds, 2), nodes=r.nodes, flags=r.flags,
                   failed=getattr(r, "failed", 0), first_error=getattr(r, "first_error", None),
                   busy=None if r.busy is None else round(r.busy, 3), jobs_from=r.jobs_from, jobs_until=r.jobs_until)


class ChampionDecision(BaseModel):
    """Champion/challenger at publish: the run's router replaces the champion only if it is not worse."""

    model_config = ConfigDict(extra="forbid")
    decision: Literal["promoted", "kept"] = Field(description="Whether this run's router became the champion.")
    reason: str = Field(description="Why, in words.")
    challenger: str = Field(description="Router fingerprint of this run.")
    challenger_reward: float | None = Field(description="Its router reward on the split compared (`split`).")
    champion: str | None = Field(None, description="Router fingerprint of the champion before this run (None: "
                                 "there was none).")
    champion_reward: float | None = Field(None, description="The champion's reward on the same queries.")
    compared_on: str | None = Field(None, description="Labels fingerprint whose queries both rewards are "
                                    "measured on.")
    split: Literal["test", "validation"] = Field("test", description="Which split decided: `validation` (the "
                                                 "challenger's validation slice, minus queries the champion trained "
                                                 "on); `test` in manifests from before validation-only promotion.")
    queries: int | None = Field(None, description="Queries both rewards are measured on (None: not recorded).")
    challenger_test_reward: float | None = Field(None, description="The challenger's reward on the test split: "
                                                 "reported, never decided on.")


class RunManifest(BaseModel):
    """`runs/<run_id>/manifest.json`: one run's lineage."""

    model_config = ConfigDict(extra="forbid")
    run_id: str = Field(description="UTC start time and a random suffix.")
    flow: str = Field(description="label, relabel or train.")
    status: Literal["running", "completed", "failed"] = Field("running", description="Where the run stands.")
    error: str | None = Field(None, description="Why a failed run stopped: `<exception type>: <message>`, with the "
                              "stage named.")
    started: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(), description="Start (UTC, ISO 8601).")
    finished: str | None = Field(None, description="End (UTC, ISO 8601).")
    versions: dict[str, str] = Field(default_factory=package_versions, description="Python and package versions.")
    shards: list[int] = Field(default_factory=list, description="Query shards the run covered.")
    queries: int = Field(0, description="Queries in those shards.")
    new_queries: int = Field(0, description="Queries this run's ingest added to the store.")
    tagger: str | None = Field(None, description="Tagger fingerprint (the tag cells' directory).")
    generate: list[StageRecord] = Field(default_factory=list, description="One record per expert.")
    score: list[StageRecord] = Field(default_factory=list, description="One record per reward model (or import).")
    embed: StageRecord | None = Field(None, description="Query embeddings for a frozen-encoder router.")
    labels: str | None = Field(None, description="Labels fingerprint.")
    label_rows: int = Field(0, description="Rows in the labels.")
    router: str | None = Field(None, description="Router fingerprint.")
    router_nodes: list[str] = Field(default_factory=list, description="Ray node ids the router's Ray Train "
                                    "workers ran on (in the run that trained it; a reused router keeps them).")
    evaluation: str | None = Field(None, description="Evaluation fingerprint.")
    champion: ChampionDecision | None = Field(None, description="The champion/challenger decision at publish.")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds, by step (`total_s`: the run).")

    @model_validator(mode="before")
    @classmethod
    def _earlier(cls, v: object) -> object:
        """Manifests written before plan.json existed: their `config` is dropped (the run's config), and a status
        `failed: <why>` becomes status `failed` with `error` <why>."""
        if isinstance(v, dict) and ("config" in v or str(v.get("status", "")).startswith("failed: ")):
            v = {k: x for k, x in v.items() if k != "config"}
            if str(v.get("status", "")).startswith("failed: "):
                v["status"], v["error"] = "failed", v["status"].removeprefix("failed: ")
        return v

    @property
    def cells_computed(self) -> int:
        return sum(s.cells_computed for s in self.generate + self.score)


class Outcome(BaseModel):
    """What a flow returns and `zooter run|relabel|train --json` prints: the manifest, the evaluation report and
    where both live."""

    model_config = ConfigDict(extra="forbid")
    manifest: RunManifest = Field(description="The run manifest.")
    report: EvalReport = Field(description="The evaluation report.")
    manifest_uri: str = Field(description="Where the manifest is stored.")
    report_uri: str = Field(description="Where the evaluation's report.md is stored.")


def record(store: Store, m: RunManifest, started: float, ok: bool) -> None:
    """Write the run manifest when a flow ends, in a `finally:`. A failed run still leaves its lineage: what it
    computed before the failure, and why it stopped (the exception being raised). `started`: perf_counter()."""
    e = sys.exc_info()[1]
    m.timings["total_s"] = round(time.perf_counter() - started, 2)
    # a stage's failure carries an `in stage ...` note (cluster.stage): the status names the stage
    notes = "".join(f" ({n})" for n in getattr(e, "__notes__", []))
    m.status = "completed" if ok else "failed"
    m.error = None if ok else f"{type(e).__name__}: {e}{notes}"
    m.finished = datetime.now(UTC).isoformat()
    store.write_json(run_manifest_path(m.run_id), m.model_dump(mode="json"))


def outcome(store: Store, m: RunManifest, report: EvalReport) -> Outcome:
    """What a flow returns: the manifest, the evaluation report and where both live."""
    return Outcome(manifest=m, report=report, manifest_uri=store.uri(run_manifest_path(m.run_id)),
                   report_uri=store.uri(report_path(m.evaluation, "md")))
