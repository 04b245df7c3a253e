"""The RouterDC result with its spread: examples/routerdc.yaml's router trained with several seeds, each measured on
its own validation slice (the seed draws it) and on the test split, per task and on average (mean +- sd).

A seed changes the head's initialisation, the batch order and the validation slice (tasks.aggregate.train_val),
i.e. everything a rerun on other data would change, except the data. Each seed is a real `train_router` +
`evaluate` run through the same tasks as `zooter train` (the routers and reports land in the store, content-
addressed: a rerun only reads them). Nothing here chooses anything: see benchmarks/routerdc_sweep.py for that.

    python benchmarks/routerdc_seeds.py [--seeds 3]   (after `make routerdc`'s import)
    -> benchmarks/results/routerdc_seeds.json, a Markdown table on stdout, and an entry in summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.pool import connect
from schemas.config import AggregateConfig, RouterConfig, TrainConfig, load_config
from schemas.evaluation import EvalReport
from schemas.store import Store
from tasks.aggregate import ScoreSource, run_aggregate
from tasks.embed import run_embed
from tasks.evaluate import run_evaluate
from tasks.import_scores import read_import
from tasks.tag import make_tagger, run_tag
from tasks.train_router import run_train_router

sys.path.insert(0, str(Path(__file__).parent))
from summary import record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples/routerdc.yaml"
GOAL = 60.0  # ID-test average over 3 seeds (issue 16)


@dataclass
class Setup:
    """What every seed shares: the store, the import, the tags and the embedding cells."""

    cfg: TrainConfig
    store: Store
    experts: list[tuple[str, str]]
    sources: list[ScoreSource]
    shards: list[int]
    tagger_fp: str
    embed_fp: str | None


def setup(config: Path = CONFIG) -> Setup:
    cfg: TrainConfig = load_config(config, model=TrainConfig)
    store = Store.from_config(cfg.store)
    rec = read_import(store, cfg.source)
    connect(cfg.ray)  # the embed step's actor pool and Ray Train
    tagger = make_tagger(cfg.tagger, cfg)
    run_tag(store, tagger, rec.shards)
    embed_fp = run_embed(store, cfg.router, rec.shards).fingerprint if cfg.router.freeze_encoder else None
    return Setup(cfg, store, rec.experts, [ScoreSource(rec.name, rec.rm_fingerprint, 1.0)], rec.shards,
                 tagger.fingerprint, embed_fp)


def one_seed(s: Setup, router: RouterConfig, agg: AggregateConfig, seed: int) -> dict:
    """Train and evaluate one seed; returns its validation and test numbers (percent for credits)."""
    t = time.perf_counter()
    labels_fp, _ = run_aggregate(s.store, s.experts, s.sources, s.tagger_fp, s.shards, agg, s.cfg.test_fraction)
    router_fp, _ = run_train_router(s.store, labels_fp, router.model_copy(update={"seed": seed}), s.embed_fp)
    _, rep = run_evaluate(s.store, labels_fp, router_fp, s.sources, s.experts, s.shards, s.embed_fp)
    return {"seed": seed, "router": router_fp, "val_avg": 100 * rep.validation.tag_average,
            "val_queries": rep.validation.queries, "test_avg": 100 * rep.per_tag.strategies["router"]["tag_average"],
            "test": {t: 100 * v for t, v in rep.per_tag.strategies["router"].items() if t != "tag_average"},
            "seconds": round(time.perf_counter() - t, 1), "report": rep}


def summarise(runs: list[dict]) -> dict:
    """mean and sd (ddof 1) of every number across seeds: per task on test, test average, validation average."""
    def ms(xs: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(xs)), "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0}

    tasks = list(runs[0]["test"])
    return {"seeds": [r["seed"] for r in runs], "val_avg": ms([r["val_avg"] for r in runs]),
            "test_avg": ms([r["test_avg"] for r in runs]),
            "test": {t: ms([r["test"][t] for r in runs]) for t in tasks}}


def references(rep: EvalReport) -> dict[str, float]:
    """Test-split references (the same for every seed): the best single expert (chosen on train), per-task perfect
    routing (the best expert of each task *on test*: an upper bound of routing by task alone) and the oracle."""
    st = rep.per_tag.strategies
    experts = [k for k in st if k.startswith("expert:")]
    per_task = np.mean([max(st[e][t] for e in experts) for t in rep.per_tag.tags])
    best = next(k for k in st if k.startswith("best_single"))
    return {"best_single": 100 * st[best]["tag_average"], "per_task_best": 100 * float(per_task),
            "oracle": 100 * st["oracle"]["tag_average"]}


def table(summary: dict, refs: dict[str, float]) -> str:
    tasks = list(summary["test"])
    f = lambda m: f"{m['mean']:.2f} ± {m['sd']:.2f}"  # noqa: E731
    lines = ["| | " + " | ".join(tasks) + " | test avg | val avg |", "|---" * (len(tasks) + 3) + "|",
             f"| router ({len(summary['seeds'])} seeds) | " + " | ".join(f(summary["test"][t]) for t in tasks)
             + f" | **{f(summary['test_avg'])}** | {f(summary['val_avg'])} |"]
    return "\n".join(lines) + "\n\nReferences (test): " + ", ".join(f"{k} {v:.2f}" for k, v in refs.items()) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    args = ap.parse_args()
    s = setup()
    runs = []
    for seed in range(args.seeds):
        runs.append(one_seed(s, s.cfg.router, s.cfg.aggregate, seed))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "report"}), flush=True)
    summary, refs = summarise(runs), references(runs[0]["report"])
    out = ROOT / "benchmarks/results/routerdc_seeds.json"
    out.write_text(json.dumps({"config": "examples/routerdc.yaml", "summary": summary, "references": refs,
                               "runs": [{k: v for k, v in r.items() if k != "report"} for r in runs]}, indent=2)
                   + "\n")
    avg = summary["test_avg"]
    record("routerdc_id_test_avg", round(avg["mean"], 2), f">= {GOAL} (mean over {args.seeds} seeds)", "points",
           avg["mean"] >= GOAL, {"sd": round(avg["sd"], 2), "val_avg": summary["val_avg"], **refs})
    print(table(summary, refs))


if __name__ == "__main__":
    main()
