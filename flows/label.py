"""The label flow: the whole Zooter DAG as one Prefect flow. Wiring only; every step lives in tasks/.

ingest -> tag -> generate[expert 1..N] -> score[RM 1..K] -> aggregate -> train_router -> evaluate -> publish
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cluster.pool import PLACEMENTS, connect, pool_key
from schemas.artifacts import evaluation_dir, run_manifest_path
from schemas.config import FlowConfig, load_config
from schemas.manifest import ChampionDecision, RunManifest, StageRecord, new_run_id
from schemas.store import Leases, Store
from tasks.aggregate import ScoreSource, run_aggregate
from tasks.embed import run_embed
from tasks.evaluate import run_evaluate
from tasks.generate import StageResult, expert_fingerprint, run_generate
from tasks.ingest import write_shards
from tasks.preflight import preflight
from tasks.publish import publish
from tasks.score import rm_fingerprint, run_score
from tasks.tag import make_tagger, run_tag
from tasks.train_router import run_train_router


def step(fn, name: str):
    """A Prefect task around a plain step function. Our content-addressed cells are the cache, so Prefect's
    own input-hash cache is off; retries are left to actor restarts and the idempotent cells."""
    return task(fn, name=name, cache_policy=NO_CACHE)


def _record(r: StageResult, job: str) -> StageRecord:
    nodes = PLACEMENTS.get(pool_key(job, r.name), []) if r.computed else []
    return StageRecord(name=r.name, fingerprint=r.fingerprint, cells_computed=len(r.computed),
                       cells_reused=len(r.skipped), cells_repaired=len(r.repaired), rows=r.rows,
                       new_tokens=r.new_tokens, seconds=round(r.seconds, 2), nodes=nodes, flags=r.flags)


def record(store: Store, m: RunManifest, started: float, ok: bool) -> None:
    """Write the run manifest when a flow ends, in a `finally:`. A failed run still leaves its lineage: what it
    computed before the failure, and why it stopped (the exception being raised)."""
    e = sys.exc_info()[1]
    m.timings["total_s"] = round(time.perf_counter() - started, 2)
    m.status = "completed" if ok else f"failed: {type(e).__name__}: {e}"
    m.finished = datetime.now(UTC).isoformat()
    store.write_json(run_manifest_path(m.run_id), m.model_dump(mode="json"))


def outcome(store: Store, m: RunManifest, report: dict) -> dict:
    """What a flow returns: the manifest, the evaluation report and where both live."""
    return {"manifest": m.model_dump(mode="json"), "report": report,
            "manifest_uri": store.uri(run_manifest_path(m.run_id)),
            "report_uri": store.uri(f"{evaluation_dir(m.evaluation)}/report.md")}


def redacted(cfg: FlowConfig) -> dict:
    d = cfg.model_dump(mode="json")
    d["store"]["options"] = {k: "***" for k in d["store"]["options"]}
    return d


@flow(name="zooter-label", log_prints=True)
def label_flow(config_path: str) -> dict:
    return label_dag(config_path, "label")


def label_dag(config_path: str, flow_name: str) -> dict:
    """The DAG both flows run; `relabel` is this on the current config (content-addressed cells make it compute
    only what is missing)."""
    log = get_run_logger()
    cfg = load_config(config_path)
    queries = preflight(cfg)  # fails before any model loads or anything is written
    store = Store.from_config(cfg.store)
    m = RunManifest(run_id=new_run_id(), flow=flow_name, config=redacted(cfg))
    t, ok = time.perf_counter(), False
    leases = Leases(store, owner=m.run_id)  # cells this run computes; concurrent runs wait for them

    try:
        ing = step(write_shards, name="ingest")(store, queries, cfg.data.shard_size)
        m.shards, m.queries, m.new_queries = ing.shards, ing.n_queries, ing.n_new
        log.info("ingest: %d queries in %d shards (%d new queries)", ing.n_queries, len(ing.shards), ing.n_new)

        tagger = make_tagger(cfg.tagger)
        step(run_tag, name="tag")(store, tagger, ing.shards)
        m.tagger = tagger.fingerprint

        connect(cfg.ray)
        gens = [step(run_generate, name=f"generate-{e.name}").submit(store, e, ing.shards, leases)
                for e in cfg.experts]
        m.generate = [_record(g.result(), "generate_cell") for g in gens]
        scores = [step(run_score, name=f"score-{rm.name}").submit(store, rm, cfg.experts, ing.shards, leases)
                  for rm in cfg.reward_models]
        m.score = [_record(s.result(), "score_cell") for s in scores]
        log.info("generation + scoring: %d cells computed, %d reused", m.cells_computed,
                 sum(s.cells_reused for s in m.generate + m.score))

        experts = [(e.name, expert_fingerprint(e)) for e in cfg.experts]
        sources = [ScoreSource(rm.name, rm_fingerprint(rm), rm.weight) for rm in cfg.reward_models]
        a = cfg.aggregate
        m.labels, m.label_rows = step(run_aggregate, name="aggregate")(
            store, experts, sources, tagger.fingerprint, ing.shards, a.beta, a.temperature, cfg.data.test_fraction,
            a.tag_temperature)
        embed_fp = None
        if cfg.router.freeze_encoder:  # the head trains on cached query embeddings
            t0 = time.perf_counter()
            embed_fp, n = step(run_embed, name="embed")(store, cfg.router, ing.shards)
            m.embed = StageRecord(name="embed", fingerprint=embed_fp, cells_computed=n,
                                  cells_reused=len(ing.shards) - n, seconds=round(time.perf_counter() - t0, 2))
        m.router, _ = step(run_train_router, name="train_router")(store, m.labels, cfg.router, embed_fp)
        m.evaluation, report = step(run_evaluate, name="evaluate")(store, m.labels, m.router, sources, experts,
                                                                  ing.shards, embed_fp)
        m.champion = ChampionDecision(**step(publish, name="publish")(store, m.router, m.evaluation, report,
                                                                      m.run_id))
        log.info("champion/challenger: %s (%s)", m.champion.decision, m.champion.reason)
        ok = True
    finally:
        leases.close()
        record(store, m, t, ok)
    return outcome(store, m, report)
