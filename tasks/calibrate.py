"""calibrate: the routing lambda that keeps an expert's share, or the mean cost, within a limit.

Cost-aware routing picks argmax_i(p_i - lambda * cost_i / max cost) (`tasks.route.choose`). `calibrate` routes the
champion's validation queries (the labels' train split's validation slice, `tasks.aggregate.train_val`: neither
trained on nor in the test split) and finds the smallest lambda at which every constraint holds, by bisection over
[0, `lambda_max`] (where every query goes to a cheapest expert). The bisection keeps the invariant "the constraints
hold at the upper end", so the lambda it returns always meets them. The mean cost never rises with lambda (each
query's chosen cost is non-increasing), so for `budget` it is the smallest such lambda; so is it for the share of the
most expensive expert. The share of a mid-priced expert can rise and fall with lambda: then it is a lambda where the
constraint starts to hold, not necessarily the first.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from schemas.artifacts import LABELS, labels_path
from schemas.errors import ArtifactError, ConfigError
from schemas.evaluation import Calibration, CurvePoint
from tasks.aggregate import train_val
from tasks.route import RoutingPolicy, choose, lambda_max

STEPS = 60  # bisection halvings: lambda_max / 2**60 is far below any probability difference


def point(probs: np.ndarray, rewards: np.ndarray, costs: np.ndarray, experts: list[str], lam: float) -> CurvePoint:
    """Routing at `lam`: each expert's share, the mean cost and the mean reward of the chosen experts."""
    pick = choose(probs, costs, lam)
    n = max(len(pick), 1)
    share = np.bincount(pick, minlength=len(experts)) / n
    return CurvePoint(cost=float(costs[pick].mean()) if len(pick) else 0.0,
                      reward=float(rewards[np.arange(len(pick)), pick].mean()) if len(pick) else 0.0, lam=lam,
                      share=dict(zip(experts, share.round(4).tolist(), strict=True)))


def parse_share(text: str, experts: list[str]) -> tuple[str, float]:
    """`EXPERT=FRACTION` (as `--max-share` takes it) -> (expert, fraction)."""
    name, sep, value = text.rpartition("=")
    try:
        frac = float(value)
    except ValueError:
        frac = float("nan")
    if not sep or not 0 <= frac <= 1:
        raise ConfigError(f"--max-share {text!r}: use EXPERT=FRACTION with a fraction in [0, 1], e.g. {experts[0]}=0.3")
    if name not in experts:
        raise ConfigError(f"--max-share {text!r}: no expert {name!r} (experts: {', '.join(experts)})")
    return name, frac


def calibrate(probs: np.ndarray, rewards: np.ndarray, costs: np.ndarray, experts: list[str], *,
              max_share: dict[str, float] | None = None, budget: float | None = None,
              router: str = "") -> Calibration:
    """The smallest lambda (see the module docstring) at which every expert in `max_share` gets at most its share
    of the queries and the mean cost is at most `budget`. probs, rewards: (queries, experts); costs: per expert."""
    max_share = max_share or {}
    if not max_share and budget is None:
        raise ConfigError("calibrate: give --max-share EXPERT=FRACTION and/or --budget COST")
    costs = np.asarray(costs, dtype=float)

    def ok(p: CurvePoint) -> bool:
        return all(p.share[e] <= f + 1e-9 for e, f in max_share.items()) and (budget is None or p.cost <= budget)

    def at(lam: float) -> CurvePoint:
        return point(probs, rewards, costs, experts, lam)

    wanted = ", ".join([f"{e} share <= {f:.0%}" for e, f in max_share.items()]
                       + ([f"mean cost <= {budget:g}"] if budget is not None else []))
    base = at(0.0)
    if ok(base):
        return _result(router, probs, max_share, budget, 0.0, base, base)
    hi = lambda_max(costs)
    if hi is None or not ok(end := at(hi)):
        got = base if hi is None else end
        raise ConfigError(f"calibrate: no lambda reaches {wanted}: routing everything to the cheapest expert gives "
                          f"mean cost {got.cost:g} and shares {_shares(got)}")
    lo = 0.0
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(at(mid)) else (mid, hi)
    return _result(router, probs, max_share, budget, hi, at(hi), base)


def _shares(p: CurvePoint) -> str:
    return ", ".join(f"{e} {s:.0%}" for e, s in p.share.items())


def _result(router: str, probs: np.ndarray, max_share: dict[str, float], budget: float | None, lam: float,
            p: CurvePoint, base: CurvePoint) -> Calibration:
    return Calibration(router=router, queries=len(probs), max_share=max_share, budget=budget, lam=lam, point=p,
                       baseline=base)


def _validation(policy: RoutingPolicy) -> pl.DataFrame:
    """The champion's labels' validation slice (its seed's): neither trained on nor in the test split."""
    labels = pl.from_arrow(policy.store.read_table(labels_path(policy.champion.labels), LABELS))
    _, val = train_val(labels, policy.champion.val_seed or 0)
    if val.height == 0:
        raise ArtifactError(f"labels {policy.champion.labels}: no validation queries to calibrate on (the train split "
                            "is too small to hold any out)")
    return val


def run_calibrate(policy: RoutingPolicy, max_share: list[str], budget: float | None) -> Calibration:
    """Calibrate the champion's policy on its labels' validation queries, with the expert costs its evaluation
    recorded from the config. `max_share`: `EXPERT=FRACTION` texts."""
    shares = dict(parse_share(t, policy.experts) for t in max_share)
    if policy.costs is None:
        raise ConfigError(f"calibrate: the champion's evaluation {policy.report.evaluation} has no expert costs; set "
                          "`cost` on every expert (`routing.costs` in a `zooter train` config) and rerun")
    val = _validation(policy)
    rewards = np.array(val["rewards"].to_list(), dtype=float).reshape(val.height, len(policy.experts))
    return calibrate(policy.router().probs(val["text"].to_list()), rewards, policy.costs, policy.experts,
                     max_share=shares, budget=budget, router=policy.router_fp)


def fallback_threshold(probs: np.ndarray, share: float) -> float:
    """A `routing.fallback_below` at which at most `share` of these queries (validation queries: familiar ones)
    fall back: the top probability of the query at rank floor(share * n), lowest first (ties may make fewer fall
    back). As in out-of-distribution detection, the rate of false alarms on familiar queries is what one fixes;
    unfamiliar queries, on which a router is less sure, then fall back more often. share 0: 0.0 (off)."""
    if not 0 <= share <= 1:
        raise ConfigError(f"fallback share {share}: must be in [0, 1]")
    top = np.sort(np.asarray(probs, dtype=float).max(axis=1)) if len(probs) else np.zeros(0)
    k = int(np.floor(share * len(top)))
    if k == 0:
        return 0.0
    return 1.0 if k >= len(top) else float(top[k])


def run_fallback_threshold(policy: RoutingPolicy, share: float) -> float:
    """`fallback_threshold` of the champion's router on its labels' validation queries."""
    return fallback_threshold(policy.router().probs(_validation(policy)["text"].to_list()), share)
