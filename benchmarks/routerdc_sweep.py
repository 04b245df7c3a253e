"""The ablation behind examples/routerdc.yaml's defaults on RouterDC: each point changes the config's router or
aggregation, and is trained and evaluated with 3 seeds through the same tasks as `zooter train`.

Selection uses only the *_train files: every point is scored on its validation slices (15 % of the train split,
drawn by each seed) as the mean over tasks of the chosen expert's credit, mean over seeds. The test average (mean
+- sd over seeds) is printed beside it for the README, never used to choose. Run `make routerdc` first (it imports
the tables and embeds the queries once); each point then trains only heads.

    python benchmarks/routerdc_sweep.py [--seeds 3] [--only NAME ...]
    -> benchmarks/results/routerdc_sweep.json and a Markdown table on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from routerdc_seeds import ROOT, one_seed, setup, summarise  # noqa: E402

# name -> (router changes, aggregate changes), each relative to examples/routerdc.yaml; the first is the config.
POINTS: dict[str, tuple[dict, dict]] = {
    "config (examples/routerdc.yaml)": ({}, {}),
    "paper labels: beta 0.3, tag prior = mean s(q)": ({}, {"tag_temperature": None}),
    "no tag prior (beta 1)": ({}, {"beta": 1.0}),
    "tag prior only (beta 0)": ({}, {"beta": 0.0}),
    "linear head": ({"head_hidden": 0}, {}),
    "hard labels (cross-entropy on argmax s*)": ({"loss": "hard"}, {}),
    "5 heads (ensemble)": ({"heads": 5}, {}),
    "epoch chosen by val reward": ({"select": "reward"}, {}),
    "bce: per-expert success heads": ({"loss": "bce"}, {}),
    "bce + 5 heads": ({"loss": "bce", "heads": 5}, {}),
    "bce + 5 heads + epoch by val reward": ({"loss": "bce", "heads": 5, "select": "reward"}, {}),
    "kl + 5 heads + epoch by val reward": ({"heads": 5, "select": "reward"}, {}),
    "beta 0.5": ({}, {"beta": 0.5}),
    "beta 0.1": ({}, {"beta": 0.1}),
    "tag temperature 0.1": ({}, {"tag_temperature": 0.1}),
    "tag temperature 0.02": ({}, {"tag_temperature": 0.02}),
    "label temperature 0.5": ({}, {"temperature": 0.5}),
    "label temperature 2": ({}, {"temperature": 2.0}),
    "tag temperature 0.1 + 5 heads": ({"heads": 5}, {"tag_temperature": 0.1}),
    "dropout 0.3": ({"dropout": 0.3}, {}),
    "weight decay 0.01": ({"weight_decay": 0.01}, {}),
    "10 epochs": ({"epochs": 10}, {}),
    "kl_reverse": ({"loss": "kl_reverse"}, {}),
}
# select "reward" picks the epoch on the same validation slice the point is scored on: its val avg is optimistic.


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per point")
    ap.add_argument("--only", nargs="*", help="run only the points whose name contains one of these")
    args = ap.parse_args()
    s = setup()
    out = ROOT / "benchmarks/results/routerdc_sweep.json"
    old = json.loads(out.read_text()).get("points", []) if out.exists() else []
    done = {p["name"]: p for p in old if "name" in p}  # points of earlier runs of this version are kept
    for name, (r, a) in POINTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        router, agg = s.cfg.router.model_copy(update=r), s.cfg.aggregate.model_copy(update=a)
        runs = [one_seed(s, router, agg, seed) for seed in range(args.seeds)]
        done[name] = {"name": name, "router": r, "aggregate": a, **summarise(runs),
                      "runs": [{k: v for k, v in x.items() if k != "report"} for x in runs]}
        print(json.dumps({k: done[name][k] for k in ("name", "val_avg", "test_avg")}), flush=True)
        points = [done[n] for n in POINTS if n in done]  # config order
        best = max(points, key=lambda p: p["val_avg"]["mean"])["name"]
        out.write_text(json.dumps({"points": points, "best_by_val": best}, indent=2) + "\n")
    points = [done[n] for n in POINTS if n in done]
    print(f"| point | val avg ({args.seeds} seeds) | test avg |\n|---|---|---|")
    for p in points:
        v, t = p["val_avg"], p["test_avg"]
        print(f"| {p['name']} | {v['mean']:.2f} ± {v['sd']:.2f} | {t['mean']:.2f} ± {t['sd']:.2f} |")


if __name__ == "__main__":
    main()
