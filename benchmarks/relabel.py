"""Benchmark: relabel after adding 1 expert to a pool of N = 3, against a full label run from scratch.

On the demo data (examples/quickstart.yaml with absolute paths, benchmarks/demo.py `demo_config`), same query
`limit` for every run, each run a fresh `zooter` process timed from outside:

    1. `zooter run` with the demo's 3 experts on store A          (setup: the cells a relabel finds)
    2. `zooter relabel` with those 3 + 1 new expert on store A    (timed: the relabel)
    3. `zooter run` with the same 4 experts on an empty store B   (timed: the full run it is compared with)

Goal: wall(2) / wall(3) <= 1/N + 0.1, and run 2's manifest shows 0 generation cells computed for the 3 existing
experts. The new expert is SmolLM2 behind the few-shot Question/Answer prompt: another fingerprint, the cheapest
model, so the figure shows the flow's fixed cost (startup, judge load, aggregate, router training) more than
generation. One repeat (each run takes minutes). Results: benchmarks/results/relabel.json and summary.json.

    python benchmarks/relabel.py --limit 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demo import RESULTS, demo_config, load, zooter  # noqa: E402
from summary import record  # noqa: E402

NEW_EXPERT = {"name": "smollm2-qa", "model": "packaged:smollm2-135m-instruct", "cost": 0.135,
              "prompt": "fewshot_qa", "dtype": "float32",
              "sampling": {"max_new_tokens": 32, "temperature": 0.0, "stop": ["\nQuestion:", "\n\n"]},
              "resources": {"num_cpus": 1, "batch_size": 8, "threads": 1}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=16, help="Queries in every run (the demo has 48).")
    args = ap.parse_args()
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
           "ZOOTER_CACHE": os.environ.get("ZOOTER_CACHE", str(Path(__file__).resolve().parents[1] / ".zooter/cache"))}
    res: dict = {"setup": {"limit": args.limit, "n_existing": 3, "new_expert": NEW_EXPERT["name"],
                           "repeats": 1, "cpus": os.cpu_count()}, "load_before": load()}
    with tempfile.TemporaryDirectory(prefix="zooter-relabel-") as tmp:
        t = Path(tmp)
        three = demo_config(t / "three.yaml", t / "a", args.limit)
        four_a = demo_config(t / "four-a.yaml", t / "a", args.limit, extra_experts=[NEW_EXPERT])
        four_b = demo_config(t / "four-b.yaml", t / "b", args.limit, extra_experts=[NEW_EXPERT])
        walls, cpus, manifests = {}, {}, {}
        for name, cmd, cfg in [("initial_3", "run", three), ("relabel_4", "relabel", four_a),
                               ("scratch_4", "run", four_b)]:
            walls[name], cpus[name], manifests[name] = zooter(cmd, cfg, t / f"{name}.log", env)
            print(f"{name}: {walls[name]:.1f}s, {cpus[name]:.0f} CPU s, load {load()}", file=sys.stderr, flush=True)
    res["load_after"] = load()
    gen = {g["name"]: g["cells_computed"] for g in manifests["relabel_4"]["generate"]}
    existing = [g["name"] for g in manifests["initial_3"]["generate"]]
    recomputed = sum(gen[e] for e in existing)
    ratio = walls["relabel_4"] / walls["scratch_4"]
    goal = 1 / 3 + 0.1
    res |= {"command_s": {k: round(v, 2) for k, v in walls.items()},
            "flow_s": {k: m["timings"]["total_s"] for k, m in manifests.items()},
            "relabel_generation_cells_computed": gen,
            "relabel_score_cells": {s["name"]: {"computed": s["cells_computed"], "reused": s["cells_reused"]}
                                    for s in manifests["relabel_4"]["score"]},
            "ratio_relabel_over_scratch": round(ratio, 3),
            "cpu_s": {k: round(v, 1) for k, v in cpus.items()},
            "ratio_cpu": round(cpus["relabel_4"] / cpus["scratch_4"], 3) if cpus["scratch_4"] else None,
            "ratio_flow_only": round(manifests["relabel_4"]["timings"]["total_s"]
                                     / manifests["scratch_4"]["timings"]["total_s"], 3),
            "existing_generation_cells_recomputed": recomputed}
    (RESULTS / "relabel.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    record("relabel / full run (add 1 expert to 3)", round(ratio, 3), f"<= {goal:.3f}", "ratio", ratio <= goal,
           {k: res[k] for k in ("setup", "command_s", "flow_s", "cpu_s", "ratio_flow_only", "ratio_cpu", "load_before",
                               "load_after")})
    record("relabel: generation cells recomputed for existing experts", recomputed, "== 0", "cells",
           recomputed == 0, {"relabel_generation_cells_computed": gen})


if __name__ == "__main__":
    main()
