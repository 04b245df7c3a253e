"""The train flow: scores already in the store (from `zooter import-scores`) -> a published router.

The label flow's tail (flows/tail.py: tag -> embed -> aggregate -> train_router -> evaluate -> publish) without
generating or scoring anything.
"""

from __future__ import annotations

from prefect import flow

from cluster.pool import alive_nodes, connect
from flows.tail import run_scope, train_tail
from schemas.config import TrainConfig, load_config
from schemas.manifest import Outcome, RunManifest, StageRecord, new_run_id, outcome, redacted
from schemas.store import Store
from tasks.aggregate import ScoreSource
from tasks.import_scores import read_import
from tasks.preflight import preflight_cluster


@flow(name="zooter-train", log_prints=True)
def train_flow(config_path: str) -> Outcome:
    cfg: TrainConfig = load_config(config_path, model=TrainConfig)
    store = Store.from_config(cfg.store)
    rec = read_import(store, cfg.source)  # fails before anything is written
    connect(cfg.ray)  # the embed step's encoder and Ray Train
    preflight_cluster(cfg, alive_nodes())
    m = RunManifest(run_id=new_run_id(), flow="train", config=redacted(cfg), shards=rec.shards, queries=rec.queries)
    m.score = [StageRecord(name=rec.name, fingerprint=rec.rm_fingerprint, cells_reused=len(rec.shards) *
                           len(rec.experts), rows=rec.rows)]
    with run_scope(store, m) as leases:
        report = train_tail(store, m, cfg, rec.experts, [ScoreSource(rec.name, rec.rm_fingerprint, 1.0)],
                            cfg.test_fraction, leases)
    return outcome(store, m, report)
