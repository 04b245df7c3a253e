"""The sweep that chose examples/routerdc.yaml's defaults: beta x tag temperature x loss x head, on RouterDC.

Selection uses only the *_train files: every point is scored on the router's validation slice (15% of the train
split, by a hash of the id) as the mean over tasks of the chosen expert's credit. The test average is printed
beside it for the README, never used to choose. Run `make routerdc` first (it imports the tables and embeds the
queries once); each point then trains only the head through the same Ray Train task (~1 min on 2 cores).

    python benchmarks/routerdc_sweep.py [--full]   (default: the 6 points of QUICK; --full: all of GRID)
    -> benchmarks/results/routerdc_sweep.json and a Markdown table on stdout
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from cluster.pool import connect
from cluster.router import Router
from schemas.artifacts import LABELS, labels_path
from schemas.config import RayConfig, TrainConfig, load_config
from schemas.store import Store
from tasks.aggregate import ScoreSource, run_aggregate, train_val
from tasks.embed import run_embed
from tasks.evaluate import per_tag_means
from tasks.import_scores import read_import
from tasks.tag import make_tagger, run_tag
from tasks.train_router import run_train_router, with_features

ROOT = Path(__file__).resolve().parent.parent
GRID = {"beta": [0.3, 1.0, 0.0], "tag_temperature": [None, 0.05], "loss": ["kl", "hard"], "head_hidden": [0, 256]}
QUICK = [dict(beta=b, tag_temperature=t, loss="kl", head_hidden=h)
         for b, t, h in [(0.3, None, 256), (0.3, 0.05, 256), (1.0, None, 256), (0.0, 0.05, 256), (0.3, 0.05, 0)]] + \
    [dict(beta=0.3, tag_temperature=0.05, loss="hard", head_hidden=256)]


def tag_average(router: Router, rows: pl.DataFrame, store: Store, embed_fp: str) -> float:
    probs = router.probs_from_features(np.array(with_features(store, rows, embed_fp)["vector"].to_list()))
    rewards = np.array(rows["rewards"].to_list())
    return per_tag_means(rows, rewards, {"router": probs.argmax(1)}).strategies["router"]["tag_average"]


def main() -> None:
    cfg: TrainConfig = load_config(ROOT / "examples/routerdc.yaml", model=TrainConfig)
    store = Store(cfg.store.url)
    rec = read_import(store, cfg.source)
    connect(RayConfig())  # the embed step runs in a Ray actor pool
    tagger = make_tagger(cfg.tagger)
    run_tag(store, tagger, rec.shards)
    embed_fp = run_embed(store, cfg.router, rec.shards).fingerprint
    points = QUICK if "--full" not in sys.argv else [dict(zip(GRID, v, strict=True))
                                                  for v in itertools.product(*GRID.values())]
    results = []
    for p in points:
        t = time.perf_counter()
        a = cfg.aggregate.model_copy(update={k: p[k] for k in ("beta", "tag_temperature")})
        r = cfg.router.model_copy(update={k: p[k] for k in ("loss", "head_hidden")})
        labels_fp, _ = run_aggregate(store, rec.experts, [ScoreSource(rec.name, rec.rm_fingerprint, 1.0)],
                                     tagger.fingerprint, rec.shards, a, cfg.test_fraction)
        router_fp, _ = run_train_router(store, labels_fp, r, embed_fp)
        labels = pl.from_arrow(store.read_table(labels_path(labels_fp), LABELS))
        router = Router.from_store(store, router_fp)
        _, val = train_val(labels)
        test = labels.filter(pl.col("split") == "test")
        results.append({**p, "val_avg": 100 * tag_average(router, val, store, embed_fp),
                        "test_avg": 100 * tag_average(router, test, store, embed_fp),
                        "router": router_fp, "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(results[-1]), flush=True)
    best = max(results, key=lambda x: x["val_avg"])
    out = ROOT / "benchmarks/results/routerdc_sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"points": results, "best_by_val": best}, indent=2))
    print("| beta | tag T | loss | head | val avg | test avg |\n|---|---|---|---|---|---|")
    for x in sorted(results, key=lambda x: -x["val_avg"]):
        print(f"| {x['beta']} | {x['tag_temperature']} | {x['loss']} | {x['head_hidden']} | "
              f"{x['val_avg']:.2f} | {x['test_avg']:.2f} |")


if __name__ == "__main__":
    main()
