"""What every flow ends with, written once: tag -> embed -> aggregate -> train_router -> evaluate -> publish, and
the run's results as Prefect artifacts. Wiring only; every step lives in tasks/.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from schemas.artifacts import report_path, run_manifest_path
from schemas.config import FlowConfig, TrainConfig
from schemas.evaluation import EvalReport
from schemas.leases import Leases
from schemas.manifest import RunManifest, StageRecord, record
from schemas.store import Store
from tasks.aggregate import ScoreSource, run_aggregate
from tasks.embed import run_embed
from tasks.evaluate import expert_costs, run_evaluate
from tasks.publish import publish
from tasks.tag import make_tagger, run_tag
from tasks.train_router import run_train_router

# Prefect artifact keys: stable, so each run adds a new version under the same key.
EVALUATION_KEY, REPORT_KEY, MANIFEST_KEY = "zooter-evaluation", "zooter-report", "zooter-manifest"


def step(fn: Callable[..., Any], name: str) -> Any:
    """A Prefect task around a plain step function. Our content-addressed cells are the cache, so Prefect's
    own input-hash cache is off; retries are left to actor restarts and the idempotent cells."""
    return task(fn, name=name, cache_policy=NO_CACHE)


@contextlib.contextmanager
def run_scope(store: Store, m: RunManifest) -> Iterator[Leases]:
    """The run's leases (cells, champion.json) for the block; afterwards they are given back and the manifest is
    written, also when the block fails (then with the failure as its status)."""
    started, ok = time.perf_counter(), False
    leases = Leases(store, owner=m.run_id)
    try:
        yield leases
        ok = True
    finally:
        leases.close()
        record(store, m, started, ok)


def train_tail(store: Store, m: RunManifest, cfg: FlowConfig | TrainConfig, experts: list[tuple[str, str]],
               sources: list[ScoreSource], test_fraction: float, leases: Leases) -> EvalReport:
    """Tag, embed (frozen encoder only), aggregate, train, evaluate and publish over `m.shards`; fills the manifest
    and returns the evaluation report. `experts`: (name, fingerprint) in the router's output order."""
    log = get_run_logger()
    tagger = make_tagger(cfg.tagger)
    step(run_tag, name="tag")(store, tagger, m.shards, leases)
    m.tagger = tagger.fingerprint
    embed_fp = None
    if cfg.router.freeze_encoder:  # the head trains on cached query embeddings
        emb = step(run_embed, name="embed")(store, cfg.router, m.shards, leases)
        m.embed, embed_fp = StageRecord.of(emb), emb.fingerprint
    m.labels, m.label_rows = step(run_aggregate, name="aggregate")(
        store, experts, sources, tagger.fingerprint, m.shards, cfg.aggregate, test_fraction)
    m.router, meta = step(run_train_router, name="train_router")(store, m.labels, cfg.router, embed_fp)
    m.router_nodes = meta.get("nodes", [])
    m.evaluation, report = step(run_evaluate, name="evaluate")(store, m.labels, m.router, sources, experts,
                                                              m.shards, embed_fp, expert_costs(cfg), cfg.routing.lam)
    m.champion = step(publish, name="publish")(store, m.router, m.evaluation, report, m.run_id, leases)
    log.info("router %s: reward %s; champion/challenger: %s (%s)", m.router, report.router_reward,
             m.champion.decision, m.champion.reason)
    publish_artifacts(store, m, report)
    return report


def publish_artifacts(store: Store, m: RunManifest, report: EvalReport) -> None:
    """The run's results in the Prefect UI: the evaluation table, the Markdown report with the chart's location,
    and a link to the run manifest (written when the run ends)."""
    create_table_artifact(report.table(), key=EVALUATION_KEY,
                          description=f"Evaluation {m.evaluation} on {report.test_queries} held-out queries")
    markdown = store.read_bytes(report_path(m.evaluation, "md")).decode()
    create_markdown_artifact(f"{markdown}\n\nChart: {store.uri(report_path(m.evaluation, 'png'))}\n",
                             key=REPORT_KEY, description=f"Evaluation report of router {m.router}")
    create_link_artifact(store.uri(run_manifest_path(m.run_id)), link_text=f"run manifest {m.run_id}", key=MANIFEST_KEY,
                         description="Lineage of this run: config, fingerprints, cells, timings")
