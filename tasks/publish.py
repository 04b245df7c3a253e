"""publish: champion/challenger. The run's router (the challenger) becomes the store's champion (the champion record,
the one `zooter route` uses) only if it is not worse than the current champion on the held-out split.

The comparison is the mean combined reward (`reward` of the `router` row of the evaluation) on the test split
of the challenger's labels:
- same labels (same pool, data and reward models): the champion's own evaluation already is that number;
- different labels (the pool or the data changed): the champion router is run again on the challenger's test
  queries, and each query is charged the reward of the expert it picks in the challenger's labels. The champion
  can only pick experts that are still in the pool: where its favourite was removed, its next-best available
  one counts. Both routers are thus judged on the same queries, the same answers and the same reward scale.
A tie promotes the challenger ("not worse"), so a rerun on new data keeps the champion fresh.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import polars as pl

from schemas.artifacts import CHAMPION_PATH, LABELS, evaluation_dir, labels_path, router_dir
from schemas.evaluation import Champion, EvalReport, read_champion
from schemas.leases import Leases
from schemas.manifest import ChampionDecision
from schemas.store import Store


def champion_reward_on(store: Store, champion: Champion, labels_fp: str) -> float | None:
    """The champion router's mean reward on the test split of `labels_fp` (None when it cannot be measured)."""
    if champion.labels == labels_fp:
        return champion.reward
    from cluster.router import Router  # torch + transformers: only when a re-evaluation is needed

    labels = pl.from_arrow(store.read_table(labels_path(labels_fp), LABELS)).filter(pl.col("split") == "test")
    names: list[str] = store.read_meta(labels_path(labels_fp))["experts"]
    router = Router.from_store(store, champion.router_fp)
    usable = np.array([e in names for e in router.experts])
    if labels.height == 0 or not usable.any():
        return None
    probs = np.where(usable, router.probs(labels["text"].to_list()), -np.inf)
    picked = [names.index(router.experts[i]) for i in probs.argmax(axis=1)]
    rewards = np.array(labels["rewards"].to_list(), dtype=float)
    return float(np.nanmean(rewards[np.arange(labels.height), picked]))


def decide(challenger: float | None, champion: float | None, has_champion: bool) -> tuple[str, str]:
    """(decision, reason): "promoted" or "kept"; a tie promotes the challenger."""
    if not has_champion:
        return "promoted", "no champion yet"
    if champion is None:
        return "promoted", "the champion cannot be measured on this held-out split"
    if challenger is None:
        return "kept", "the challenger has no reward on this held-out split"
    if challenger >= champion:
        return "promoted", "the challenger is not worse than the champion"
    return "kept", "the challenger is worse than the champion"


def publish(store: Store, router_fp: str, eval_fp: str, report: EvalReport, run_id: str,
            leases: Leases | None = None) -> ChampionDecision:
    """Compare the run's router with the champion, write the champion record if it wins; return the decision.
    Concurrent runs publish one after the other, under a lease on the champion record: the run's `leases`, or
    leases of this call's own (closed when it returns)."""
    if leases is None:
        with Leases(store, owner=run_id) as own:
            return publish(store, router_fp, eval_fp, report, run_id, own)
    with leases.hold(CHAMPION_PATH):
        return _publish(store, router_fp, eval_fp, report, run_id)


def _publish(store: Store, router_fp: str, eval_fp: str, report: EvalReport, run_id: str) -> ChampionDecision:
    challenger = report.router_reward
    old = read_champion(store)
    if old is not None and old.router_fp == router_fp:
        return ChampionDecision(decision="kept", reason="the champion is this run's router", challenger=router_fp,
                                challenger_reward=challenger, champion=old.router_fp, champion_reward=old.reward,
                                compared_on=old.labels)
    champ = champion_reward_on(store, old, report.labels) if old else None
    decision, reason = decide(challenger, champ, old is not None)
    if decision == "promoted":
        new = Champion(router=router_dir(router_fp), evaluation=evaluation_dir(eval_fp), labels=report.labels,
                       experts=report.experts, reward=challenger, run_id=run_id,
                       published=datetime.now(UTC).isoformat(), replaced=old.router_fp if old else None)
        store.write_json(CHAMPION_PATH, new.model_dump(mode="json"))
    return ChampionDecision(decision=decision, reason=reason, challenger=router_fp, challenger_reward=challenger,
                            champion=old.router_fp if old else None, champion_reward=champ,
                            compared_on=report.labels if old else None)
