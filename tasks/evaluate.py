"""evaluate: the router against every single expert, the best single expert, random, oracle and RM ranking.

Everything is measured on the held-out `test` split. Columns:
- `reward`: mean combined reward of the chosen answer (what the router was trained to maximise);
- `rm`: mean score of the chosen answer under each reward model alone, by name (nulls skipped; for a verifiable
  RM this is accuracy on the queries that have a reference);
- `expert_calls` / `rm_calls`: generations and RM scorings needed per query (the cost Zooter saves);
- `mtr` / `first`: mean rank across tag subsets and the share of subsets ranked first (the paper's MTR),
  among the router, RM ranking and every single expert, by mean reward (`per_tag` holds those means).
`oracle` takes the best expert per query for each column separately (an upper bound); `rm_ranking` generates
with every expert and keeps the answer with the best combined reward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import polars as pl

from cluster.router import Router
from schemas.artifacts import LABELS, fingerprint, labels_path, report_path, router_dir
from schemas.errors import ArtifactError
from schemas.evaluation import EvalReport, PerTag, StrategyRow, read_report
from schemas.store import Store
from tasks.aggregate import ScoreSource, scan_scores
from tasks.train_router import with_features

CODE_VERSION = 2  # 2: typed report (per-RM means under `rm`, no `by_tag`)


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
             *, evaluation: str, labels: str, router: str) -> EvalReport:
    """test/train: label rows; probs: router probabilities for `test` rows; scores: long (query_id, expert,
    rm, score) for test queries. `evaluation`, `labels`, `router`: the fingerprints the report names."""
    ids = test["query_id"].to_list()
    n_e = len(experts)
    rewards = np.array(test["rewards"].to_list(), dtype=float).reshape(len(ids), n_e)
    best = int(np.argmax(_train_means(train, rewards)))
    rms = sorted(scores["rm"].unique().to_list())
    by_rm = {k: _matrix(scores.filter(pl.col("rm") == k), ids, experts) for k in rms}
    choices = {"router": probs.argmax(axis=1), f"best_single ({experts[best]})": np.full(len(ids), best),
               "rm_ranking": rewards.argmax(axis=1)} | {f"expert:{e}": np.full(len(ids), i)
                                                         for i, e in enumerate(experts)}
    per_tag = per_tag_means(test, rewards, choices)
    # MTR ranks the router, RM ranking and every single expert; best_single shares its expert's rank.
    ranks = _tag_ranks(per_tag, [k for k in choices if not k.startswith("best_single")])
    ranks[f"best_single ({experts[best]})"] = ranks.get(f"expert:{experts[best]}", {})

    every = (n_e, n_e * len(rms))  # (generations, RM scorings) per query when every expert answers

    def row(name: str, measure: Callable[[np.ndarray], float | None], calls: tuple[int, int]) -> StrategyRow:
        return StrategyRow(strategy=name, reward=measure(rewards), rm={k: measure(m) for k, m in by_rm.items()},
                           expert_calls=calls[0], rm_calls=calls[1], **ranks.get(name, {}))

    rows = [row(name, partial(_pick, choice=c), every if name == "rm_ranking" else (1, 0))
            for name, c in choices.items()]
    rows += [row("random", _random, (1, 0)), row("oracle", _oracle, every)]
    share = np.bincount(choices["router"], minlength=n_e) / max(len(ids), 1)
    return EvalReport(evaluation=evaluation, labels=labels, router=router, experts=experts, test_queries=len(ids),
                      best_single=experts[best], rows=rows,
                      router_share=dict(zip(experts, share.round(4).tolist(), strict=True)), per_tag=per_tag)


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


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def to_markdown(report: EvalReport) -> str:
    rows = report.table()
    head = list(rows[0]) if rows else ["strategy"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(map(_fmt, r.values())) + " |" for r in rows]
    share = ", ".join(f"{e}: {p:.0%}" for e, p in report.router_share.items())
    md = (f"# Evaluation ({report.test_queries} held-out queries)\n\n" + "\n".join(lines)
          + f"\n\nRouter sends queries to: {share}. Best single expert (by train reward): {report.best_single}.\n")
    pt = report.per_tag
    if pt.tags:
        cols = [*pt.tags, "tag_average"]
        md += ("\n## Mean reward per tag (test queries: "
               + ", ".join(f"{t} {n}" for t, n in zip(pt.tags, pt.n, strict=True)) + ")\n\n"
               + "| strategy | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|\n"
               + "".join(f"| {k} | " + " | ".join(_fmt(v.get(c)) for c in cols) + " |\n"
                         for k, v in pt.strategies.items()))
    return md


def bar_chart(report: EvalReport) -> bytes:
    """PNG: per-tag mean reward of the router, best single expert, random and oracle (grouped bars), with the
    tag average as the last group; or the overall reward per strategy when there are no tags."""
    import io

    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    pt = report.per_tag
    strategies = pt.strategies or {r.strategy: {"all": r.reward} for r in report.rows}
    keep = [k for k in strategies if k == "router" or k.startswith("best_single") or k in ("random", "oracle")]
    groups = [*pt.tags, "tag_average"] if pt.tags else ["all"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) * len(keep) / 3), 4), dpi=120)
    width = 0.8 / len(keep)
    for i, k in enumerate(keep):
        vals = [strategies[k].get(g) or 0.0 for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, vals, width, label=k)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=20)
    ax.set_ylabel("mean reward on test queries")
    ax.set_title(f"Router evaluation ({report.test_queries} test queries)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_evaluate(store: Store, labels_fp: str, router_fp: str, sources: list[ScoreSource],
                 experts: list[tuple[str, str]], shards: list[int],
                 embed_fp: str | None = None) -> tuple[str, EvalReport]:
    """Load labels, the router and the test scores from the store; write the report (JSON, Markdown, PNG).
    A router with a frozen encoder is applied to the embed step's cells (`embed_fp`) when given."""
    fp = fingerprint({"labels": labels_fp, "router": router_fp, "code": CODE_VERSION})
    if store.exists(report_path(fp)):
        return fp, read_report(store, fp)
    labels = pl.from_arrow(store.read_table(labels_path(labels_fp), LABELS))
    names = store.read_meta(labels_path(labels_fp))["experts"]
    test = labels.filter(pl.col("split") == "test")
    train = labels.filter(pl.col("split") == "train")
    router = Router.from_store(store, router_fp)
    if router.experts != names:
        raise ArtifactError(f"{store.uri(router_dir(router_fp))}: trained for experts {router.experts}, but labels "
                            f"{labels_fp} have {names}")
    if embed_fp and router.config.freeze_encoder:
        probs = router.probs_from_features(np.array(with_features(store, test, embed_fp)["vector"].to_list()))
    else:
        probs = router.probs(test["text"].to_list())
    scores = (scan_scores(store, experts, sources, shards)
              .join(test.lazy().select("query_id"), on="query_id").select("query_id", "expert", "rm", "score")
              .collect())
    report = evaluate(test, train, names, probs, scores, evaluation=fp, labels=labels_fp, router=router_fp)
    store.write_bytes(report_path(fp, "md"), to_markdown(report).encode())
    store.write_bytes(report_path(fp, "png"), bar_chart(report))
    store.write_json(report_path(fp), report.model_dump(mode="json"))  # last: the report exists when this does
    return fp, report
