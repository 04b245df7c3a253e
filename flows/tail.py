"""What every flow ends with, written once: tag + embed (submitted together, as soon as the shards exist: they need
only the queries) -> aggregate -> train_router -> evaluate -> publish, and the run's results as Prefect artifacts;
and the helpers that run a flow's stages at the same time (`produces`, `settle`). Wiring only; every step lives in
tasks/.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, wait

from cluster.stage import Pipeline, StageAborted
from schemas.artifacts import report_path, run_manifest_path
from schemas.evaluation import EvalReport
from schemas.leases import Leases
from schemas.manifest import RunManifest, StageRecord, record
from schemas.plan import RunPlan
from schemas.store import Store
from tasks.aggregate import run_aggregate
from tasks.embed import run_embed
from tasks.evaluate import run_evaluate, to_markdown
from tasks.plan import write_plan
from tasks.publish import publish
from tasks.tag import Tagger, make_tagger, run_tag
from tasks.train_router import run_train_router

# Prefect artifact keys: stable, so each run adds a new version under the same key.
EVALUATION_KEY, REPORT_KEY, MANIFEST_KEY = "zooter-evaluation", "zooter-report", "zooter-manifest"


def step(fn: Callable[..., Any], name: str) -> Any:
    """A Prefect task around a plain step function. Our content-addressed cells are the cache, so Prefect's
    own input-hash cache is off; retries are left to actor restarts and the idempotent cells."""
    return task(fn, name=name, cache_policy=NO_CACHE)


@contextlib.contextmanager
def timed(m: RunManifest, name: str) -> Iterator[None]:
    """A step's wall time in the manifest (`<name>_s`): `zooter run` prints them in its stage table."""
    t = time.perf_counter()
    try:
        yield
    finally:
        m.timings[f"{name}_s"] = round(time.perf_counter() - t, 2)


@contextlib.contextmanager
def run_scope(store: Store, m: RunManifest, plan: RunPlan) -> Iterator[Leases]:
    """The run's leases (cells, champion.json) for the block, its plan written first; afterwards the leases are
    given back and the manifest is written, also when the block fails (then with the failure as its status)."""
    started, ok = time.perf_counter(), False
    write_plan(store, m.run_id, plan)
    leases = Leases(store, owner=m.run_id)
    try:
        yield leases
        ok = True
    finally:
        leases.close()
        record(store, m, started, ok)


def produces(pipe: Pipeline, future: PrefectFuture, name: str) -> PrefectFuture:
    """Mark a submitted stage as one whose cells others in `pipe` wait for, until its task ends; a task that fails
    before its stage runs (so the stage could not say so) fails the pipeline too."""
    pipe.opened(name)

    def ended(f: PrefectFuture) -> None:
        try:
            state = f.wrapped_future.result()  # the task's final State (the thread runner returns states)
            failure = None if state.is_completed() else state.message or state.name
        except BaseException as e:  # noqa: BLE001 - the task crashed: its waiting consumers must stop
            failure = f"{type(e).__name__}: {e}"
        pipe.closed(name, failure)

    future.add_done_callback(ended)
    return future


def settle(futures: Sequence[PrefectFuture]) -> None:
    """Wait for every submitted stage; re-raise the first real failure (a stage that failed on its own, rather than
    one that stopped because of it: StageAborted), with the stage named (`in stage ...` note, manifest status)."""
    wait(list(futures))
    aborted: StageAborted | None = None
    for f in futures:
        try:
            f.result()
        except StageAborted as e:
            aborted = aborted or e
    if aborted is not None:
        raise aborted


def records(futures: Sequence[PrefectFuture]) -> list[StageRecord]:
    """The manifest records of the settled stages that completed (a failed run lists what it finished)."""
    return [StageRecord.of(f.result()) for f in futures if f.state.is_completed()]


@dataclass
class Inputs:
    """What the router needs besides labels, from the queries alone: submitted as soon as the shards exist."""

    tagger: Tagger
    tag: PrefectFuture
    embed: PrefectFuture | None  # None: the encoder trains too (no cached embeddings)

    @property
    def futures(self) -> list[PrefectFuture]:
        return [self.tag] + ([self.embed] if self.embed is not None else [])


def submit_inputs(store: Store, m: RunManifest, plan: RunPlan, leases: Leases) -> Inputs:
    """Tag and (frozen encoder only) embed `m.shards`, as concurrent Prefect tasks."""
    cfg = plan.config
    tagger = make_tagger(cfg.tagger, plan)
    embed = (step(run_embed, name="embed").submit(store, cfg.router, m.shards, leases, plan.encoder_identity)
             if cfg.router.freeze_encoder else None)  # the head trains on cached query embeddings
    # the cluster tagger clusters the embed step's vectors: it starts once they exist (no second encoder pool)
    wait = [embed] if embed is not None and cfg.tagger.kind == "cluster" else None
    return Inputs(tagger, step(run_tag, name="tag").submit(store, tagger, m.shards, leases, wait_for=wait), embed)


def train_tail(store: Store, m: RunManifest, plan: RunPlan, leases: Leases, inputs: Inputs | None = None) -> EvalReport:
    """Aggregate, train, evaluate and publish over `m.shards` once tags (and embeddings) exist: `inputs` submitted
    earlier (the label flow submits them with generation), else submitted now. Fills the manifest and returns the
    evaluation report."""
    log = get_run_logger()
    cfg, experts, sources = plan.config, plan.expert_refs, plan.sources
    inputs = inputs or submit_inputs(store, m, plan, leases)
    settle(inputs.futures)
    m.tagger = inputs.tagger.fingerprint  # final once the tagger ran (the cluster tagger's covers its fit)
    m.timings["tag_s"] = round(inputs.tag.result().seconds, 2)
    embed_fp = None
    if inputs.embed is not None:
        emb = inputs.embed.result()
        m.embed, embed_fp = StageRecord.of(emb), emb.fingerprint
    # each step takes the previous one's ref (nothing read back that the run just wrote); the manifest records each
    # ref as it comes, so a run that fails later still names what it made
    with timed(m, "aggregate"):
        labels = step(run_aggregate, name="aggregate")(store, experts, sources, m.tagger, m.shards, cfg.aggregate,
                                                       plan.test_fraction)
    m.labels, m.label_rows = labels.fingerprint, labels.rows
    with timed(m, "train_router"):
        router = step(run_train_router, name="train_router")(store, labels, cfg.router, embed_fp,
                                                             plan.encoder_identity)
    m.router, m.router_nodes = router.fingerprint, router.nodes
    with timed(m, "evaluate"):
        ev = step(run_evaluate, name="evaluate")(
            store, labels, router.fingerprint, sources=sources, experts=experts, shards=m.shards, embed_fp=embed_fp,
            costs=plan.costs, lam=plan.routing.lam, fallback_below=plan.routing.fallback_below)
    m.evaluation, report = ev.fingerprint, ev.report
    with timed(m, "publish"):
        m.champion = step(publish, name="publish")(store, router.fingerprint, ev.fingerprint, report, m.run_id,
                                                   leases, labels)
    log.info("router %s: reward %s; champion/challenger: %s (%s)", m.router, report.router_reward,
             m.champion.decision, m.champion.reason)
    publish_artifacts(store, m, report)
    return report


def publish_artifacts(store: Store, m: RunManifest, report: EvalReport) -> None:
    """The run's results in the Prefect UI: the evaluation table, the Markdown report with the chart's location,
    and a link to the run manifest (written when the run ends)."""
    create_table_artifact(report.table(), key=EVALUATION_KEY,
                          description=f"Evaluation {m.evaluation} on {report.test_queries} held-out queries")
    markdown = to_markdown(report)  # what evaluate wrote as report.md
    create_markdown_artifact(f"{markdown}\n\nChart: {store.uri(report_path(m.evaluation, 'png'))}\n",
                             key=REPORT_KEY, description=f"Evaluation report of router {m.router}")
    create_link_artifact(store.uri(run_manifest_path(m.run_id)), link_text=f"run manifest {m.run_id}", key=MANIFEST_KEY,
                         description="Lineage of this run: config, fingerprints, cells, timings")
