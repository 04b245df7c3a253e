"""The train flow: scores already in the store (from `zooter import-scores`) -> a published router.

The label flow's tail (flows/tail.py: tag -> embed -> aggregate -> train_router -> evaluate -> publish) without
generating or scoring anything, on a plan resolved once over the import (tasks/plan.py `plan_train`).
"""

from __future__ import annotations

from prefect import flow

from cluster.pool import alive_nodes, connect
from flows.tail import run_scope, train_tail
from schemas.manifest import Outcome, RunManifest, StageRecord, new_run_id, outcome
from schemas.plan import RunPlan
from schemas.store import Store
from tasks.plan import plan_train
from tasks.preflight import preflight_cluster


@flow(name="zooter-train", log_prints=True)
def train_flow(config_path: str, plan: RunPlan | None = None) -> Outcome:
    """Train on the import `config_path` names; `plan`: already resolved (`zooter train`)."""
    return train_dag(plan or plan_train(config_path))


def train_dag(plan: RunPlan) -> Outcome:
    cfg, rec = plan.config, plan.inputs  # rec: the import record preflight read
    store = Store.from_config(cfg.store)
    connect(cfg.ray)  # the embed step's encoder and Ray Train
    preflight_cluster(cfg, alive_nodes())
    m = RunManifest(run_id=new_run_id(), flow="train", shards=rec.shards, queries=rec.queries)
    m.score = [StageRecord(name=rec.name, fingerprint=rec.rm_fingerprint, cells_reused=len(rec.shards) *
                           len(rec.experts), rows=rec.rows)]
    with run_scope(store, m, plan) as leases:
        report = train_tail(store, m, plan, leases)
    return outcome(store, m, report)
