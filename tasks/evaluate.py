"""evaluate: the router against every single expert, the best single expert, random, oracle and RM ranking.

Everything in the strategy table is measured on the held-out `test` split, which only reports: `validation`
holds the router's numbers on its validation slice (training queries held out from its training, drawn by its
seed), and champion/challenger (tasks/publish.py) decides on those. Columns:
- `reward`: mean combined reward of the chosen answer (what the router was trained to maximise);
- `rm`: mean score of the chosen answer under each reward model alone, by name (nulls skipped; for a verifiable
  RM this is accuracy on the queries that have a reference);
- `expert_calls` / `rm_calls`: generations and RM scorings needed per query (the cost Zooter saves);
- `mtr` / `first`: mean rank across tag subsets and the share of subsets ranked first (the paper's MTR),
  among the router, RM ranking and every single expert, by mean reward (`per_tag` holds those means).
`oracle` takes the best expert per query for each column separately (an upper bound); `rm_ranking` generates
with every expert and keeps the answer with the best combined reward.

With a `cost` per expert (per call) the report also holds the quality-cost curve (`CostCurve`): mean reward against
mean cost per query of the router at each lambda of a grid (cost-aware routing, `tasks.route.choose`), of every
single expert and of random mixes of experts. Two numbers summarise it:
- AIQ (RouterBench, Hu et al. 2024): take the strategy's non-decreasing upper convex hull R~(c) over its (cost,
  reward) points (any point on it is reached by mixing two neighbouring operating points at random; beyond its ends
  it stays flat), then AIQ = 1 / (c_max - c_min) * integral of R~(c) dc from c_min to c_max, where [c_min, c_max] is
  the range of the experts' costs (the same for every strategy, so AIQs compare);
- cost to target: the least mean cost at which R~ reaches 95 % of the best single expert's reward (best - 0.05 *
  |best|, so it stays "5 % worse" when rewards are negative).
Without costs, or when every expert costs the same, lambda changes nothing: there is no curve and the report says so.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from functools import partial

import numpy as np
import polars as pl

from schemas.artifacts import (
    HELD_OUT_SCORES,
    curve_path,
    fingerprint,
    held_out_scores_path,
    report_path,
    router_dir,
)
from schemas.errors import ArtifactError, ConfigError
from schemas.evaluation import CostCurve, CurvePoint, EvalReport, PerTag, StrategyRow, Validation, fmt, read_report
from schemas.plan import EvalRef, Expert, LabelsRef
from schemas.store import Store
from tasks.aggregate import ScoreSource, scan_scores, scores_key, train_val
from tasks.baselines import Rows, fit_baselines
from tasks.calibrate import point
from tasks.diagnostics import diagnostics
from tasks.diagnostics import to_markdown as diagnostics_markdown
from tasks.route import Fallback, choose, lambda_max
from tasks.train_router import with_features

# 2: typed report (per-RM means under `rm`, no `by_tag`); 3: validation slice, diagnostics; 4: baseline routers
CODE_VERSION = 4
BASELINE_ROWS = 20_000  # training rows the feature baselines are fitted on at most (a hash-ordered sample)
CURVE_STEPS = 41  # router points: lambda 0, then 40 geometric steps up to lambda_max

log = logging.getLogger("zooter.evaluate")


def _matrix(long: pl.DataFrame, ids: list[str], experts: list[str]) -> np.ndarray:
    """(query_id, expert, score) -> (n, E) float matrix in the given order, NaN where missing."""
    wide = long.pivot(on="expert", index="query_id", values="score", aggregate_function="first")
    wide = pl.DataFrame({"query_id": ids}).join(wide, on="query_id", how="left", maintain_order="left")
    cols = [wide[e].cast(pl.Float64).fill_null(np.nan) if e in wide.columns else pl.Series([np.nan] * len(ids))
            for e in experts]
    return np.stack([c.to_numpy() for c in cols], axis=1) if ids else np.zeros((0, len(experts)))


# Each metric is None when no query has a score in that column (e.g. no test query has a reference answer).
def _pick(m: np.ndarray, choice: np.ndarray) -> float | None:
    v = m[np.arange(len(choice)), choice]
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def _random(m: np.ndarray) -> float | None:
    ok = np.isfinite(m).any(axis=1)
    return float(np.nanmean(m[ok], axis=1).mean()) if ok.any() else None


def _oracle(m: np.ndarray) -> float | None:
    ok = np.isfinite(m).any(axis=1)
    return float(np.nanmax(m[ok], axis=1).mean()) if ok.any() else None


def evaluate(test: pl.DataFrame, train: pl.DataFrame, experts: list[str], probs: np.ndarray, scores: pl.DataFrame,
             *, evaluation: str, labels: str, router: str, costs: dict[str, float] | None = None,
             lam: float = 0.0, validation: Validation | None = None, fallback_below: float = 0.0,
             baselines: dict[str, np.ndarray] | None = None) -> EvalReport:
    """test/train: label rows; probs: router probabilities for `test` rows; scores: long (query_id, expert,
    rm, score) for test queries. `evaluation`, `labels`, `router`: the fingerprints the report names. `costs`
    (expert -> cost of one call) and `lam` (the config's routing lambda): the quality-cost curve. `validation`:
    the router on its validation slice (`validate`), carried into the report. `fallback_below`: the router's
    queries whose top probability is below it go to the best single expert (`routing.fallback_below`).
    `baselines`: name -> each test row's expert index under that baseline router (`baseline_choices`)."""
    ids = test["query_id"].to_list()
    n_e = len(experts)
    rewards = np.array(test["rewards"].to_list(), dtype=float).reshape(len(ids), n_e)
    best = int(np.argmax(_train_means(train, rewards)))
    rms = sorted(scores["rm"].unique().to_list())
    by_rm = {k: _matrix(scores.filter(pl.col("rm") == k), ids, experts) for k in rms}
    choices = {"router": choose(probs, None, 0.0, Fallback(fallback_below, best)),
               f"best_single ({experts[best]})": np.full(len(ids), best),
               "rm_ranking": rewards.argmax(axis=1)} | {f"expert:{e}": np.full(len(ids), i)
                                                         for i, e in enumerate(experts)}
    base = {name: np.asarray(c, dtype=int) for name, c in (baselines or {}).items()}
    choices |= base
    per_tag = per_tag_means(test, rewards, choices)
    # MTR ranks the router, RM ranking and every single expert; best_single shares its expert's rank.
    ranks = _tag_ranks(per_tag, [k for k in choices if not k.startswith("best_single") and k not in base])
    ranks[f"best_single ({experts[best]})"] = ranks.get(f"expert:{experts[best]}", {})

    every = (n_e, n_e * len(rms))  # (generations, RM scorings) per query when every expert answers

    def row(name: str, measure: Callable[[np.ndarray], float | None], calls: tuple[int, int]) -> StrategyRow:
        return StrategyRow(strategy=name, reward=measure(rewards), rm={k: measure(m) for k, m in by_rm.items()},
                           expert_calls=calls[0], rm_calls=calls[1], **ranks.get(name, {}))

    rows = [row(name, partial(_pick, choice=c), every if name == "rm_ranking" else (1, 0))
            for name, c in choices.items()]
    rows += [row("random", _random, (1, 0)), row("oracle", _oracle, every)]
    share = np.bincount(choices["router"], minlength=n_e) / max(len(ids), 1)
    curve, note = None, "no expert costs in the config (set `cost` on every expert)"
    if costs is not None:
        curve = cost_curve(probs, rewards, np.array([costs[e] for e in experts]), experts, best, lam)
        note = None if curve else "every expert costs the same: lambda changes nothing"
    return EvalReport(evaluation=evaluation, labels=labels, router=router, experts=experts, test_queries=len(ids),
                      best_single=experts[best], rows=rows,
                      router_share=dict(zip(experts, share.round(4).tolist(), strict=True)), per_tag=per_tag,
                      costs=costs, lam=lam, curve=curve, curve_note=note, validation=validation,
                      fallback_below=fallback_below,
                      diagnostics=diagnostics(test, probs, experts, experts[best], choices["router"]))


def validate(val: pl.DataFrame, train: pl.DataFrame, probs: np.ndarray, seed: int,
             fallback_below: float = 0.0) -> Validation:
    """The router on its validation slice `val` (probs: its probabilities for those rows); `train`: the rows it
    trained on (they pick the best single expert, as on test)."""
    if val.height == 0:
        return Validation(queries=0, seed=seed, reward=None)
    rewards = np.array(val["rewards"].to_list(), dtype=float).reshape(val.height, probs.shape[1])
    best = int(np.argmax(_train_means(train, rewards)))
    choice = choose(probs, None, 0.0, Fallback(fallback_below, best))
    avg = per_tag_means(val, rewards, {"router": choice}).strategies.get("router", {}).get("tag_average")
    return Validation(queries=val.height, seed=seed, reward=_pick(rewards, choice), tag_average=avg,
                      best_single=_pick(rewards, np.full(val.height, best)))


def hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Vertices of the non-decreasing upper convex hull of (cost, reward) points, cost ascending: the upper hull,
    cut after its highest reward (spending more for less is never chosen)."""
    upper: list[tuple[float, float]] = []
    for p in sorted(set(points), key=lambda q: (q[0], -q[1])):
        if upper and upper[-1][0] == p[0]:  # same cost, lower reward
            continue
        while len(upper) >= 2 and ((upper[-1][0] - upper[-2][0]) * (p[1] - upper[-2][1])
                                   - (upper[-1][1] - upper[-2][1]) * (p[0] - upper[-2][0])) >= 0:
            upper.pop()  # upper[-1] lies on or below the line from upper[-2] to p
        upper.append(p)
    top = max(range(len(upper)), key=lambda i: upper[i][1])
    return upper[:top + 1]


def aiq(vertices: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Area under the hull through `vertices` (flat beyond its ends) over [lo, hi], divided by hi - lo."""
    xs, ys = np.array(vertices).T
    grid = np.unique(np.clip(np.r_[lo, hi, xs], lo, hi))
    return float(np.trapezoid(np.interp(grid, xs, ys), grid) / (hi - lo))


def cost_to_reach(vertices: list[tuple[float, float]], target: float) -> float | None:
    """Least cost at which the hull through `vertices` reaches `target` (None: it never does)."""
    (x0, y0), *rest = vertices
    if y0 >= target:
        return x0
    for x1, y1 in rest:
        if y1 >= target:
            return x0 + (target - y0) * (x1 - x0) / (y1 - y0)
        x0, y0 = x1, y1
    return None


def cost_curve(probs: np.ndarray, rewards: np.ndarray, costs: np.ndarray, experts: list[str], best: int,
               lam: float) -> CostCurve | None:
    """The quality-cost curve on these rows (see the module docstring); None when all experts cost the same."""
    top = lambda_max(costs)
    if top is None:
        return None
    grid = np.r_[0.0, np.geomspace(top * 1e-3, top, CURVE_STEPS - 1)]
    router = [point(probs, rewards, costs, experts, float(x)) for x in grid]
    singles = {e: CurvePoint(cost=float(costs[i]), reward=float(rewards[:, i].mean())) for i, e in enumerate(experts)}
    mix = hull([(p.cost, p.reward) for p in singles.values()])
    router_hull = hull([(p.cost, p.reward) for p in router])
    lo, hi = float(costs.min()), float(costs.max())
    r_best = singles[experts[best]].reward
    target = r_best - 0.05 * abs(r_best)
    return CostCurve(costs=dict(zip(experts, costs.tolist(), strict=True)), router=router, experts=singles,
                     random_mix=[CurvePoint(cost=c, reward=r) for c, r in mix],
                     aiq={"router": aiq(router_hull, lo, hi), "random_mix": aiq(mix, lo, hi)}, target=target,
                     cost_to_target={"router": cost_to_reach(router_hull, target),
                                     "random_mix": cost_to_reach(mix, target),
                                     "best_single": float(costs[best])},
                     operating=point(probs, rewards, costs, experts, lam))


def per_tag_means(test: pl.DataFrame, rewards: np.ndarray, choices: dict[str, np.ndarray]) -> PerTag:
    """Mean reward of every strategy (and random, oracle) on every tag's test queries, and the plain mean over
    tags ("tag average": with benchmark names as tags and credits as rewards, the per-task accuracies and their
    average)."""
    per_q = {k: rewards[np.arange(len(c)), c] for k, c in choices.items()}
    per_q |= {"random": rewards.mean(axis=1), "oracle": rewards.max(axis=1)}
    frame = pl.DataFrame({"tags": test["tags"], **per_q}).explode("tags").drop_nulls("tags")
    by = frame.group_by("tags").agg(pl.len().alias("n"), *[pl.col(k).mean() for k in per_q]).sort("tags")
    tags = by["tags"].to_list()
    table = {k: dict(zip(tags, by[k].to_list(), strict=True)) | {"tag_average": float(by[k].mean())}
             for k in per_q} if tags else {}
    return PerTag(tags=tags, n=by["n"].to_list(), strategies=table)


def _train_means(train: pl.DataFrame, test_rewards: np.ndarray) -> np.ndarray:
    """Per-expert mean training reward, the best single expert's criterion: the mean over tags of the tag means
    when queries carry tags (so a large tag does not outvote the others, as in benchmark averages), else the
    plain mean."""
    n_e = test_rewards.shape[1]
    if not train.height:
        return test_rewards.mean(axis=0)
    r = np.array(train["rewards"].to_list(), dtype=float).reshape(-1, n_e)
    per = pl.DataFrame({"tags": train["tags"], "r": r}).explode("tags").drop_nulls("tags")
    if per.height == 0:
        return r.mean(axis=0)
    means = per.group_by("tags").agg(pl.col("r").arr.to_list().list.eval(pl.element()).alias("rs"))
    return np.mean([np.array(x).mean(axis=0) for x in means["rs"].to_list()], axis=0)


def _tag_ranks(per_tag: PerTag, ranked: list[str]) -> dict[str, dict[str, float]]:
    """{strategy: {mtr, first}}: mean rank over tag subsets (1 = best mean reward, ties share the best rank) and
    the share of subsets ranked first, among `ranked`."""
    if not per_tag.tags:
        return {}
    means = np.array([[per_tag.strategies[k][t] for k in ranked] for t in per_tag.tags], dtype=float)
    ranks = 1 + (means[:, None, :] > means[:, :, None]).sum(-1)
    return {k: {"mtr": float(ranks[:, i].mean()), "first": float((ranks[:, i] == 1).mean())}
            for i, k in enumerate(ranked)}


def to_markdown(report: EvalReport) -> str:
    rows = report.table()
    head = list(rows[0]) if rows else ["strategy"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(map(fmt, r.values())) + " |" for r in rows]
    share = ", ".join(f"{e}: {p:.0%}" for e, p in report.router_share.items())
    md = (f"# Evaluation ({report.test_queries} held-out queries)\n\n" + "\n".join(lines)
          + f"\n\nRouter sends queries to: {share}. Best single expert (by train reward): {report.best_single}.\n")
    if report.left_out:
        md += (f"\n{report.left_out} queries were left out of the labels (and so of this evaluation): a row of "
               "theirs failed alone; the next run retries them (docs/failures.md#row-failures).\n")
    v = report.validation
    if v is not None:
        md += (f"\nValidation slice ({v.queries} training queries held out by seed {v.seed}; champion/challenger "
               f"decides on it, the test split only reports): router reward {fmt(v.reward)}, tag average "
               f"{fmt(v.tag_average)}, best single expert {fmt(v.best_single)}.\n")
    pt = report.per_tag
    if pt.tags:
        cols = [*pt.tags, "tag_average"]
        md += ("\n## Mean reward per tag (test queries: "
               + ", ".join(f"{t} {n}" for t, n in zip(pt.tags, pt.n, strict=True)) + ")\n\n"
               + "| strategy | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|\n"
               + "".join(f"| {k} | " + " | ".join(fmt(v.get(c)) for c in cols) + " |\n"
                         for k, v in pt.strategies.items()))
    return md + _curve_markdown(report) + (diagnostics_markdown(report.diagnostics) if report.diagnostics else "")


def _curve_markdown(report: EvalReport) -> str:
    """The quality-cost section: distinct router operating points, single experts, AIQ and cost to target."""
    c = report.curve
    if c is None:
        return f"\n## Quality and cost\n\nNo quality-cost curve: {report.curve_note}.\n"
    head = "| strategy | lambda | mean cost | reward | " + " | ".join(report.experts) + " |\n"
    lines = [head, "|---" * (4 + len(report.experts)) + "|\n"]
    seen = set()
    for name, p in [("router", q) for q in c.router] + [(f"router (lambda {report.lam:g}, config)", c.operating)]:
        key = (round(p.cost, 9), round(p.reward, 9), name)
        if key[:2] in seen and name == "router":
            continue  # lambda steps that change no decision
        seen.add(key[:2])
        lines.append(f"| {name} | {p.lam:.4g} | {p.cost:.4g} | {p.reward:.4f} | "
                     + " | ".join(f"{p.share[e]:.0%}" for e in report.experts) + " |\n")
    for e, p in c.experts.items():
        lines.append(f"| expert:{e} | - | {p.cost:.4g} | {p.reward:.4f} | "
                     + " | ".join("100%" if x == e else "0%" for x in report.experts) + " |\n")
    reach = ", ".join(f"{k} {fmt(v)}" for k, v in c.cost_to_target.items())
    return ("\n## Quality and cost (test queries; cost of one call: "
            + ", ".join(f"{e} {v:g}" for e, v in c.costs.items()) + ")\n\n" + "".join(lines)
            + f"\nAIQ (mean reward over the cost range {min(c.costs.values()):g}-{max(c.costs.values()):g}): "
            + ", ".join(f"{k} {v:.4f}" for k, v in c.aiq.items())
            + f". Mean cost to reach 95 % of the best single expert's reward ({c.target:.4f}): {reach}.\n")


def run_evaluate(store: Store, labels: LabelsRef | str, router_fp: str, *, sources: list[ScoreSource],
                 experts: list[Expert], shards: list[int], embed_fp: str | None = None,
                 costs: dict[str, float] | None = None, lam: float = 0.0, fallback_below: float = 0.0) -> EvalRef:
    """Evaluate the router on the labels' test split (and its validation slice) and write the report (JSON,
    Markdown, PNG, and curve.png when there is a quality-cost curve); returns its ref. `labels`: the aggregate
    step's ref (rows in memory when the run just computed them) or a labels fingerprint; the router and the test
    scores come from the store. A router with a frozen encoder is applied to the embed step's cells (`embed_fp`)
    when given. `sources`, `experts`, `shards`: what the labels combine (the plan's); `costs`: expert -> cost of one
    call, for every expert or None; `lam`: the routing lambda; `fallback_below`: routing.fallback_below."""
    ref = labels if isinstance(labels, LabelsRef) else LabelsRef.read(store, labels)
    labels_fp = ref.fingerprint
    key = {"labels": labels_fp, "router": router_fp, "code": CODE_VERSION}
    if fallback_below:  # off: the same fingerprint as before the option existed
        key["fallback_below"] = fallback_below
    if ref.left_out:  # labels that left queries out (rows that failed alone) are not the labels made after a retry
        key["labels"] = ref.content_key
    fp = fingerprint(key | {"costs": costs, "lambda": lam} if costs or lam else key)  # no costs: the same fp as before
    if store.exists(report_path(fp)):
        return EvalRef(fingerprint=fp, report=read_report(store, fp))
    labels, names = ref.frame(store), ref.experts
    if costs is not None and (missing := [e for e in names if e not in costs]):
        raise ConfigError(f"expert costs: no cost for {missing}; give every expert a cost (`cost`, or "
                          "`routing.costs` in a `zooter train` config) or none")
    test = labels.filter(pl.col("split") == "test")
    train = labels.filter(pl.col("split") == "train")
    from cluster.router import Router  # torch: imported when a router is evaluated, not by every flow import

    router = Router.from_store(store, router_fp)
    if router.experts != names:
        raise ArtifactError(f"{store.uri(router_dir(router_fp))}: trained for experts {router.experts}, but labels "
                            f"{labels_fp} have {names}")

    fit_rows, val = train_val(labels, router.config.seed)
    base_train = baseline_sample(train)
    frozen = bool(embed_fp and router.config.freeze_encoder)
    features: list[np.ndarray] = []  # test, validation and the baselines' training rows: embeddings read once
    if frozen and test.height + val.height + base_train.height:
        x = np.array(with_features(store, pl.concat([test, val, base_train]), embed_fp)["vector"].to_list())
        features = [x[:test.height], x[test.height:test.height + val.height], x[test.height + val.height:]]
    else:  # the learned router's own encoder
        features = [router.features(rows["text"].to_list()) if rows.height else np.zeros((0, 0))
                    for rows in (test, val, base_train)]

    def router_probs(rows: pl.DataFrame, i: int) -> np.ndarray:
        return router.probs_from_features(features[i]) if rows.height else np.zeros((0, len(names)))

    probs = router_probs(test, 0)
    validation = validate(val, fit_rows, router_probs(val, 1), router.config.seed, fallback_below)
    scores = held_out_scores(store, labels_fp, test, experts, sources, shards)
    baselines = baseline_choices(base_train, features[2], test, features[0], _train_means(train, _rewards(test)))
    report = evaluate(test, train, names, probs, scores, evaluation=fp, labels=labels_fp, router=router_fp,
                      costs=costs and {e: costs[e] for e in names}, lam=lam, validation=validation,
                      fallback_below=fallback_below, baselines=baselines)
    report = report.model_copy(update={"left_out": ref.left_out})
    store.write_bytes(report_path(fp, "md"), to_markdown(report).encode())
    from tasks.plots import bar_chart, plot_cost_curve  # matplotlib: imported only to draw

    store.write_bytes(report_path(fp, "png"), bar_chart(report))
    if report.curve is not None:
        store.write_bytes(curve_path(fp), plot_cost_curve(report.curve, report.lam))
    store.write_json(report_path(fp), report.model_dump(mode="json"))  # last: the report exists when this does
    return EvalRef(fingerprint=fp, report=report)


def _rewards(rows: pl.DataFrame) -> np.ndarray:
    n_e = len(rows["rewards"][0]) if rows.height else 0
    return np.array(rows["rewards"].to_list(), dtype=float).reshape(rows.height, n_e)


def baseline_sample(train: pl.DataFrame, n: int = BASELINE_ROWS) -> pl.DataFrame:
    """The training rows the baselines are fitted on: all of them, or `n` chosen by a hash of the query id."""
    if train.height <= n:
        return train
    keys = [hashlib.sha256(f"baselines:{q}".encode()).hexdigest() for q in train["query_id"].to_list()]
    return train.with_columns(pl.Series("_k", keys)).sort("_k").head(n).drop("_k")  # stable, unlike Polars' hash


def baseline_choices(train: pl.DataFrame, train_x: np.ndarray, test: pl.DataFrame, test_x: np.ndarray,
                     prior: np.ndarray) -> dict[str, np.ndarray]:
    """name -> each test row's expert under every baseline router (tasks/baselines.py), fitted on `train`."""
    if not test.height or not train.height:
        return {}
    fitted = fit_baselines(Rows(train_x, train["tags"].to_list()), _rewards(train), prior)
    return {name: b.route(Rows(test_x, test["tags"].to_list())) for name, b in fitted.items()}


def held_out_scores(store: Store, labels_fp: str, test: pl.DataFrame, experts: list[Expert],
                    sources: list[ScoreSource], shards: list[int]) -> pl.DataFrame:
    """(query_id, expert, rm, score) of the `test` label rows: from the file aggregate wrote beside the labels (one
    read), else (labels written before it did so, or not by `run_aggregate`) from every score cell again."""
    rel = held_out_scores_path(labels_fp, scores_key(experts, sources, shards))
    try:
        scores = pl.from_arrow(store.read_table(rel, HELD_OUT_SCORES)).lazy()
    except ArtifactError as e:
        log.info("%s; reading the score cells instead", e)
        scores = scan_scores(store, experts, sources, shards)
    return (scores.join(test.lazy().select("query_id"), on="query_id").select("query_id", "expert", "rm", "score")
            .collect())
