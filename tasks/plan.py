"""plan: a run's config resolved once into a `schemas.plan.RunPlan`, before anything loads or is written.

`plan_run` (label and relabel flows) preflights the config (tasks/preflight.py: sources, endpoints, data, store)
and resolves every expert's and reward model's weights identity and fingerprint, the encoder's identity and the
embed fingerprint: each exactly once per run. `plan_train` does the same for `zooter train` over an import. The
flow takes the plan from here (or from the CLI, which planned it to fail before Prefect and Ray start) and hands
its parts to the steps; `write_plan` stores it beside the run's manifest.
"""

from __future__ import annotations

import functools
from pathlib import Path

from cluster import models
from schemas.artifacts import run_manifest_path, run_plan_path
from schemas.config import FlowConfig, TrainConfig, load_config
from schemas.plan import Expert, RunPlan, ScoreSource
from schemas.store import Store
from tasks.embed import embed_fingerprint
from tasks.generate import plan_expert
from tasks.preflight import preflight, preflight_train
from tasks.score import plan_rm


def _embed_fp(cfg: FlowConfig | TrainConfig, identity: str) -> str | None:
    """The embed step runs for a frozen encoder and for the cluster tagger (its features)."""
    return (embed_fingerprint(cfg.router, identity)
            if cfg.router.freeze_encoder or cfg.tagger.kind == "cluster" else None)


def plan_run(config: str | Path | FlowConfig, flow: str = "label") -> RunPlan:
    """The label/relabel flow's plan: preflight, then every identity and fingerprint once. `config`: a path or URL
    (loaded here) or a loaded config. The checked queries travel with it (`RunPlan.inputs`)."""
    cfg = config if isinstance(config, FlowConfig) else load_config(config)
    queries = preflight(cfg)  # fails before any model loads or anything is written
    identity_of = functools.cache(models.identity)  # one look at each model source, however many specs share it
    experts = [plan_expert(e, identity_of) for e in cfg.experts]
    rms = [plan_rm(r, identity_of, Store.from_config(cfg.store)) for r in cfg.reward_models]
    encoder = identity_of(cfg.router.encoder, None)
    return RunPlan(flow=flow, config=cfg, experts=experts, reward_models=rms, expert_refs=[e.ref for e in experts],
                   sources=[r.source for r in rms], encoder_identity=encoder, embed_fingerprint=_embed_fp(cfg, encoder),
                   test_fraction=cfg.test_fraction, costs=cfg.expert_costs(), routing=cfg.routing).with_inputs(queries)


def plan_train(config: str | Path | TrainConfig) -> RunPlan:
    """The train flow's plan over an import: its experts and score source as the import record names them."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, model=TrainConfig)
    rec = preflight_train(cfg)
    encoder = models.identity(cfg.router.encoder)  # the only model source of a train run
    return RunPlan(flow="train", config=cfg, expert_refs=[Expert(*e) for e in rec.experts],
                   sources=[ScoreSource(rec.name, rec.rm_fingerprint, 1.0)], encoder_identity=encoder,
                   embed_fingerprint=_embed_fp(cfg, encoder), test_fraction=cfg.test_fraction,
                   costs=cfg.expert_costs(), routing=cfg.routing, shards=rec.shards).with_inputs(rec)


def write_plan(store: Store, run_id: str, plan: RunPlan) -> None:
    """`runs/<run_id>/plan.json`: the plan as resolved, store options redacted."""
    store.write_json(run_plan_path(run_id), plan.model_dump(mode="json"))


def run_config(store: Store, run_id: str) -> dict:
    """A run's config as its plan recorded it (store options redacted); a run from before plan.json existed kept
    it in its manifest."""
    if store.exists(run_plan_path(run_id)):
        return store.read_json(run_plan_path(run_id))["config"]
    return store.read_json(run_manifest_path(run_id))["config"]
