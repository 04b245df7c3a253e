"""evaluate: the router against every single expert, the best single expert, random, oracle and RM ranking.

Everything is measured on the held-out `test` split. Columns:
- `reward`: mean combined reward of the chosen answer (what the router was trained to maximise);
- `rm:<name>`: mean score of the chosen answer under each reward model alone (nulls skipped; for a verifiable
  RM this is accuracy on the queries that have a reference);
- `expert_calls` / `rm_calls`: generations and RM scorings needed per query (the cost Zooter saves);
- `mtr` / `first`: mean rank across tag subsets and the share of subsets ranked first (the paper's MTR),
  among the router, RM ranking and every single expert, by mean reward.
`oracle` takes the best expert per query for each column separately (an upper bound); `rm_ranking` generates
with every expert and keeps the answer with the best combined reward.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from cluster.router import Router
from schemas.artifacts import LABELS, evaluation_dir, fingerprint, labels_path, router_dir
from schemas.store import Store
from tasks.aggregate import ScoreSource, scan_scores
from tasks.train_router import with_features

RANKED = "ranked"


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


def evaluate(test: pl.DataFrame, train: pl.DataFrame, experts: list[str], probs: np.ndarray,
             scores: pl.DataFrame) -> dict:
    """test/train: label rows; probs: router probabilities for `test` rows; scores: long (query_id, expert,
    rm, score) for test queries."""
    ids = test["query_id"].to_list()
    n_e = len(experts)
    rewards = np.array(test["rewards"].to_list(), dtype=float).reshape(len(ids), n_e)
    best = int(np.argmax(_train_means(train, rewards)))
    rms = sorted(scores["rm"].unique().to_list())
    cols = {"reward": rewards} | {f"rm:{k}": _matrix(scores.filter(pl.col("rm") == k), ids, experts) for k in rms}
    choices = {"router": probs.argmax(axis=1), f"best_single ({experts[best]})": np.full(len(ids), best),
               "rm_ranking": rewards.argmax(axis=1)} | {f"expert:{e}": np.full(len(ids), i)
                                                         for i, e in enumerate(experts)}
    rows = []
    for name, c in choices.items():
        calls = (n_e, n_e * len(rms)) if name == "rm_ranking" else (1, 0)
        rows.append({"strategy": name, **{k: _pick(m, c) for k, m in cols.items()},
                     "expert_calls": calls[0], "rm_calls": calls[1]})
    rows.append({"strategy": "random", **{k: _random(m) for k, m in cols.items()}, "expert_calls": 1, "rm_calls": 0})
    rows.append({"strategy": "oracle", **{k: _oracle(m) for k, m in cols.items()},
                 "expert_calls": n_e, "rm_calls": n_e * len(rms)})
    by_tag, mtr = _tag_ranks(test, rewards, {k: v for k, v in choices.items() if not k.startswith("best_single")})
    for r in rows:
        r.update(mtr.get(r["strategy"], {}))
        if r["strategy"].startswith("best_single"):
            r.update(mtr.get(f"expert:{experts[best]}", {}))
    share = np.bincount(choices["router"], minlength=n_e) / max(len(ids), 1)
    return {"experts": experts, "test_queries": len(ids), "best_single": experts[best], "rows": rows,
            "router_share": dict(zip(experts, share.round(4).tolist(), strict=True)), "by_tag": by_tag,
            "per_tag": _per_tag(test, rewards, choices)}


def _per_tag(test: pl.DataFrame, rewards: np.ndarray, choices: dict[str, np.ndarray]) -> dict:
    """Mean reward of every strategy on every tag's test queries, and the plain mean over tags ("tag average":
    with benchmark names as tags and credits as rewards, the per-task accuracies and their average)."""
    per_q = {k: rewards[np.arange(len(c)), c] for k, c in choices.items()}
    per_q |= {"random": rewards.mean(axis=1), "oracle": rewards.max(axis=1)}
    frame = pl.DataFrame({"tags": test["tags"], **per_q}).explode("tags").drop_nulls("tags")
    by = frame.group_by("tags").agg(pl.len().alias("n"), *[pl.col(k).mean() for k in per_q]).sort("tags")
    tags = by["tags"].to_list()
    table = {k: dict(zip(tags, by[k].to_list(), strict=True)) | {"tag_average": float(by[k].mean())}
             for k in per_q} if tags else {}
    return {"tags": tags, "n": by["n"].to_list(), "strategies": table}


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


def _tag_ranks(test: pl.DataFrame, rewards: np.ndarray, choices: dict[str, np.ndarray]) -> tuple[list, dict]:
    per_q = pl.DataFrame({"tags": test["tags"], **{k: rewards[np.arange(len(c)), c] for k, c in choices.items()}})
    by_tag = (per_q.explode("tags").drop_nulls("tags").group_by("tags")
              .agg(pl.len().alias("n"), *[pl.col(k).mean() for k in choices]).sort("tags"))
    if by_tag.height == 0:
        return [], {}
    means = by_tag.select(list(choices)).to_numpy()
    # rank 1 = best mean reward in that subset; ties share the best rank
    ranks = 1 + (means[:, None, :] > means[:, :, None]).sum(-1)
    mtr = {k: {"mtr": float(ranks[:, i].mean()), "first": float((ranks[:, i] == 1).mean())}
           for i, k in enumerate(choices)}
    return by_tag.rename({"tags": "tag"}).to_dicts(), mtr


def to_markdown(report: dict) -> str:
    rows = report["rows"]
    keys = [k for k in rows[0] if k != "strategy"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| strategy | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + r["strategy"] + " | " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    share = ", ".join(f"{e}: {p:.0%}" for e, p in report["router_share"].items())
    md = (f"# Evaluation ({report['test_queries']} held-out queries)\n\n" + "\n".join(lines)
          + f"\n\nRouter sends queries to: {share}. Best single expert (by train reward): "
          f"{report['best_single']}.\n")
    pt = report.get("per_tag") or {}
    if pt.get("tags"):
        cols = pt["tags"] + ["tag_average"]
        md += ("\n## Mean reward per tag (test queries: "
               + ", ".join(f"{t} {n}" for t, n in zip(pt["tags"], pt["n"], strict=True)) + ")\n\n"
               + "| strategy | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|\n"
               + "".join(f"| {k} | " + " | ".join(fmt(v[c]) for c in cols) + " |\n"
                         for k, v in pt["strategies"].items()))
    return md


def bar_chart(report: dict) -> bytes:
    """PNG: per-tag mean reward of the router, best single expert, random and oracle (grouped bars), with the
    tag average as the last group; or the overall reward per strategy when there are no tags."""
    import io

    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    pt = report.get("per_tag") or {}
    strategies = pt.get("strategies") or {r["strategy"]: {"all": r["reward"]} for r in report["rows"]}
    keep = [k for k in strategies if k == "router" or k.startswith("best_single") or k in ("random", "oracle")]
    groups = (pt["tags"] + ["tag_average"]) if pt.get("tags") else ["all"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) * len(keep) / 3), 4), dpi=120)
    width = 0.8 / len(keep)
    for i, k in enumerate(keep):
        vals = [strategies[k].get(g) or 0.0 for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, vals, width, label=k)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=20)
    ax.set_ylabel("mean reward on test queries")
    ax.set_title(f"Router evaluation ({report['test_queries']} test queries)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_evaluate(store: Store, labels_fp: str, router_fp: str, sources: list[ScoreSource],
                 experts: list[tuple[str, str]], shards: list[int], embed_fp: str | None = None) -> tuple[str, dict]:
    """Load labels, the router and the test scores from the store; write report.json, report.md, report.png.
    A router with a frozen encoder is applied to the embed step's cells (`embed_fp`) when given."""
    fp = fingerprint({"labels": labels_fp, "router": router_fp, "code": 1})
    rel = evaluation_dir(fp)
    if store.exists(f"{rel}/report.json"):
        return fp, store.read_json(f"{rel}/report.json")
    labels = pl.from_arrow(store.read_table(labels_path(labels_fp), LABELS))
    names = store.read_meta(labels_path(labels_fp))["experts"]
    test = labels.filter(pl.col("split") == "test")
    train = labels.filter(pl.col("split") == "train")
    router = Router.from_store(store, router_dir(router_fp))
    if router.experts != names:
        raise ValueError(f"router {router_fp} was trained for experts {router.experts}, labels have {names}")
    if embed_fp and router.meta.get("config", {}).get("freeze_encoder"):
        probs = router.probs_from_features(np.array(with_features(store, test, embed_fp)["vector"].to_list()))
    else:
        probs = router.probs(test["text"].to_list())
    scores = (scan_scores(store, experts, sources, shards)
              .join(test.lazy().select("query_id"), on="query_id").select("query_id", "expert", "rm", "score")
              .collect())
    report = evaluate(test, train, names, probs, scores)
    report.update(labels=labels_fp, router=router_fp, evaluation=fp)
    store.write_bytes(f"{rel}/report.md", to_markdown(report).encode())
    store.write_bytes(f"{rel}/report.png", bar_chart(report))
    store.write_json(f"{rel}/report.json", report)
    return fp, report
