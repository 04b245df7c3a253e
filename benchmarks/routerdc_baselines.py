"""The lookup-table baselines on RouterDC's tables, beside the learned router's result: what routing by the task
alone gets when the table is learned on the training split (`tag-lookup`, tasks/baselines.py, as every evaluation
reports it), against the best single expert and the oracle, per task and as the task average, on the test split.

No model runs: the import (`zooter import-scores`, idempotent), the task tags and the labels are what
examples/routerdc.yaml trains on (same aggregation, same split). The feature baselines (cluster-lookup, knn) need
the encoder's embeddings of every query; they are added where the store already holds the embed step's cells for
examples/routerdc.yaml's encoder (after `make routerdc`), else left out and said so.

    python benchmarks/routerdc_baselines.py -> benchmarks/results/routerdc_baselines.json and a Markdown table
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from schemas.artifacts import embeddings_dir
from schemas.config import TrainConfig, load_config
from schemas.store import Store
from tasks.aggregate import ScoreSource, run_aggregate
from tasks.embed import embed_fingerprint
from tasks.evaluate import _rewards, _train_means, baseline_choices, baseline_sample
from tasks.import_scores import import_scores, read_import, read_scores
from tasks.tag import make_tagger, run_tag
from tasks.train_router import with_features

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples/routerdc.yaml"
DATA = ROOT.parent / "shared/datasets/routerdc"
OUT = ROOT / "benchmarks/results/routerdc_baselines.json"


def per_task(test: pl.DataFrame, rewards: np.ndarray, choice: np.ndarray) -> dict[str, float]:
    """Mean credit (percent) of the chosen experts per task, and their plain mean over tasks."""
    got = rewards[np.arange(len(choice)), choice]
    frame = pl.DataFrame({"task": [t[0] for t in test["tags"].to_list()], "r": got})
    by = frame.group_by("task").agg(pl.col("r").mean()).sort("task")
    out = {t: 100 * float(r) for t, r in zip(by["task"], by["r"], strict=True)}
    return out | {"task_average": float(np.mean(list(out.values())))}


def main() -> None:
    load_before = list(os.getloadavg())
    cfg: TrainConfig = load_config(CONFIG, model=TrainConfig)
    store = Store.from_config(cfg.store)
    if not store.exists(f"imports/{cfg.source}.json"):
        import_scores(store, read_scores("routerdc", DATA), cfg.source, 1000)
    rec = read_import(store, cfg.source)
    tagger = make_tagger(cfg.tagger, cfg)
    run_tag(store, tagger, rec.shards)
    labels = run_aggregate(store, rec.experts, [ScoreSource(rec.name, rec.rm_fingerprint, 1.0)],
                           tagger.fingerprint, rec.shards, cfg.aggregate, cfg.test_fraction)
    rows = labels.frame(store)
    train, test = rows.filter(pl.col("split") == "train"), rows.filter(pl.col("split") == "test")
    rewards = _rewards(test)
    base_train = baseline_sample(train)
    embed_fp = embed_fingerprint(cfg.router)
    have = store.exists(embeddings_dir(embed_fp)) and len(store.ls(embeddings_dir(embed_fp))) >= len(rec.shards)
    if have:
        x = np.array(with_features(store, pl.concat([test, base_train]), embed_fp)["vector"].to_list())
        test_x, train_x = x[:test.height], x[test.height:]
    else:
        test_x = train_x = np.zeros((0, 0))
    choices = baseline_choices(base_train, train_x, test, test_x, _train_means(train, rewards))
    best = int(np.argmax(_train_means(train, rewards)))
    result = {
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() or None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cores": os.cpu_count(),
        "load_before": load_before, "load_after": list(os.getloadavg()),
        "config": CONFIG.relative_to(ROOT).as_posix(), "labels": labels.fingerprint,
        "train_queries": train.height, "test_queries": test.height,
        "feature_baselines": "included" if have else "left out: no embeddings in the store (run `make routerdc`)",
        "test": {name: per_task(test, rewards, c) for name, c in choices.items()}
        | {"best_single": per_task(test, rewards, np.full(test.height, best)),
              "oracle": per_task(test, rewards, np.nan_to_num(rewards, nan=-np.inf).argmax(axis=1))},
        "best_single_expert": labels.experts[best]}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    tasks = [t for t in result["test"]["best_single"] if t != "task_average"]
    print("| routing | " + " | ".join(tasks) + " | task average |")
    print("|---" * (len(tasks) + 2) + "|")
    for name, r in result["test"].items():
        print(f"| {name} | " + " | ".join(f"{r[t]:.2f}" for t in tasks) + f" | {r['task_average']:.2f} |")
    print(f"({result['feature_baselines']}; {OUT.relative_to(ROOT)})", file=sys.stderr)


if __name__ == "__main__":
    main()
