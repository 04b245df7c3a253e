"""The train flow: scores already in the store (from `zooter import-scores`) -> a published router.

tag -> embed (frozen encoder only) -> aggregate -> train_router -> evaluate -> publish: the label flow's last
steps, the same task functions, without generating or scoring anything.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from cluster.pool import connect
from flows.label import outcome, record, redacted, step
from schemas.config import TrainConfig, load_config
from schemas.manifest import ChampionDecision, RunManifest, StageRecord, new_run_id
from schemas.store import Store
from tasks.aggregate import ScoreSource, run_aggregate
from tasks.embed import run_embed
from tasks.evaluate import run_evaluate
from tasks.import_scores import read_import
from tasks.publish import publish
from tasks.tag import make_tagger, run_tag
from tasks.train_router import run_train_router


@flow(name="zooter-train", log_prints=True)
def train_flow(config_path: str) -> dict:
    log = get_run_logger()
    cfg: TrainConfig = load_config(config_path, model=TrainConfig)
    store = Store.from_config(cfg.store)
    rec = read_import(store, cfg.source)  # fails before anything is written
    m = RunManifest(run_id=new_run_id(), flow="train", config=redacted(cfg))
    m.shards, m.queries = rec.shards, rec.queries
    m.score = [StageRecord(name=rec.name, fingerprint=rec.rm_fingerprint, cells_reused=len(rec.shards) *
                           len(rec.experts), rows=rec.rows)]
    t, ok = time.perf_counter(), False
    try:
        tagger = make_tagger(cfg.tagger)
        step(run_tag, name="tag")(store, tagger, rec.shards)
        m.tagger = tagger.fingerprint
        embed_fp = None
        if cfg.router.freeze_encoder:
            t0 = time.perf_counter()
            embed_fp, n = step(run_embed, name="embed")(store, cfg.router, rec.shards)
            m.embed = StageRecord(name="embed", fingerprint=embed_fp, cells_computed=n,
                                  cells_reused=len(rec.shards) - n, seconds=round(time.perf_counter() - t0, 2))
        sources = [ScoreSource(rec.name, rec.rm_fingerprint, 1.0)]
        a = cfg.aggregate
        m.labels, m.label_rows = step(run_aggregate, name="aggregate")(
            store, rec.experts, sources, tagger.fingerprint, rec.shards, a.beta, a.temperature, cfg.test_fraction,
            a.tag_temperature)
        connect(cfg.ray)
        m.router, _ = step(run_train_router, name="train_router")(store, m.labels, cfg.router, embed_fp)
        m.evaluation, report = step(run_evaluate, name="evaluate")(store, m.labels, m.router, sources, rec.experts,
                                                                  rec.shards, embed_fp)
        m.champion = ChampionDecision(**step(publish, name="publish")(store, m.router, m.evaluation, report,
                                                                      m.run_id))
        log.info("router %s: reward %.4f", m.router, next(r["reward"] for r in report["rows"]
                                                          if r["strategy"] == "router"))
        ok = True
    finally:
        record(store, m, t, ok)
    return outcome(store, m, report)
