"""publish: champion/challenger. The run's router (the challenger) becomes the store's champion (`champion.json`,
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
from schemas.manifest import ChampionDecision
from schemas.store import Leases, Store


def router_reward(report: dict) -> float | None:
    return next(r for r in report["rows"] if r["strategy"] == "router")["reward"]


def champion_reward_on(store: Store, champion: dict, labels_fp: str) -> float | None:
    """The champion router's mean reward on the test split of `labels_fp` (None when it cannot be measured)."""
    if champion.get("labels") == labels_fp:
        return champion.get("reward")
    from cluster.router import Router  # torch + transformers: only when a re-evaluation is needed

    labels = pl.from_arrow(store.read_table(labels_path(labels_fp), LABELS)).filter(pl.col("split") == "test")
    names: list[str] = store.read_meta(labels_path(labels_fp))["experts"]
    router = Router.from_store(store, champion["router"])
    usable = np.array([e in names for e in router.experts])
    if labels.height == 0 or not usable.any():
        return None
    probs = np.where(usable, router.probs(labels["text"].to_list()), -np.inf)
    picked = [names.index(router.experts[i]) for i in probs.argmax(axis=1)]
    rewards = np.array(labels["rewards"].to_list(), dtype=float)
    return float(np.nanmean(rewards[np.arange(labels.height), picked]))


def decide(challenger: float | None, champion: float | None, has_champion: bool) -> tuple[str, str]:
    if not has_champion:
        return "promoted", "no champion yet"
    if champion is None:
        return "promoted", "the champion cannot be measured on this held-out split"
    if challenger is None:
        return "kept", "the challenger has no reward on this held-out split"
    if challenger >= champion:
        return "promoted", "the challenger is not worse than the champion"
    return "kept", "the challenger is worse than the champion"


def publish(store: Store, router_fp: str, eval_fp: str, report: dict, run_id: str) -> dict:
    """Compare the run's router with the champion, write `champion.json` if it wins; return the decision."""
    with Leases(store, owner=run_id).hold(CHAMPION_PATH):  # concurrent runs publish one after the other
        return _publish(store, router_fp, eval_fp, report, run_id)


def _publish(store: Store, router_fp: str, eval_fp: str, report: dict, run_id: str) -> dict:
    challenger = router_reward(report)
    old = store.read_json(CHAMPION_PATH) if store.exists(CHAMPION_PATH) else None
    old_fp = old["router"].removeprefix("routers/") if old else None
    if old_fp == router_fp:
        d = ChampionDecision(decision="kept", reason="the champion is this run's router", challenger=router_fp,
                             challenger_reward=challenger, champion=old_fp, champion_reward=old.get("reward"),
                             compared_on=old.get("labels"))
        return d.model_dump(mode="json")
    champ = champion_reward_on(store, old, report["labels"]) if old else None
    decision, reason = decide(challenger, champ, old is not None)
    d = ChampionDecision(decision=decision, reason=reason, challenger=router_fp, challenger_reward=challenger,
                         champion=old_fp, champion_reward=champ, compared_on=report["labels"] if old else None)
    if decision == "promoted":
        store.write_json(CHAMPION_PATH, {
            "router": router_dir(router_fp), "evaluation": evaluation_dir(eval_fp), "labels": report["labels"],
            "experts": report["experts"], "reward": challenger, "run_id": run_id,
            "published": datetime.now(UTC).isoformat(), "replaced": old_fp})
    return d.model_dump(mode="json")
