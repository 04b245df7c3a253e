"""Benchmark: what the Ray actor pool costs over calling the backend directly, on the same shards, in one run.

(a) direct: one HFGenerator in this process answers every shard (`generate_cell`), model load included;
(b) pool: `run_generate` through a one-actor Ray pool, actor start and model load included.
Writes benchmarks/results/pool_overhead.json; the goal is (b) >= 0.9 x (a) in tokens/s.

    make bench                      # packaged SmolLM2, 4 shards x 8 prompts x 24 tokens
    python benchmarks/run.py --shards 2 --tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pool_overhead.json"))
    args = ap.parse_args()

    import ray

    from cluster.hf import HFGenerator
    from schemas.config import DataConfig, ExpertSpec
    from schemas.store import Store
    from tasks.generate import expert_fingerprint, generate_cell, run_generate
    from tasks.ingest import read_queries, write_shards

    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "mtbench.jsonl"
    spec = ExpertSpec(name="bench", model=args.model, dtype="float32",
                      sampling={"max_new_tokens": args.tokens}, resources={"batch_size": args.shard_size})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        queries = read_queries(DataConfig(path=str(data), limit=args.shards * args.shard_size))
        shards = []
        for name in ("direct", "pool"):
            store = Store(f"{tmp}/{name}")
            shards = write_shards(store, queries, args.shard_size).shards
            t = time.perf_counter()
            if name == "direct":
                model = HFGenerator(spec.model, dtype=spec.dtype, threads=1)
                tokens = sum(generate_cell(model, spec, expert_fingerprint(spec), store, s)["new_tokens"]
                             for s in shards)
                del model
            else:
                ray.init(num_cpus=1, include_dashboard=False, _temp_dir=f"{tmp}/ray")
                tokens = run_generate(store, spec, shards).new_tokens
                ray.shutdown()
            secs = time.perf_counter() - t
            results[name] = {"seconds": round(secs, 2), "new_tokens": tokens, "tokens_per_s": round(tokens / secs, 2)}
    results["ratio_pool_over_direct"] = round(results["pool"]["tokens_per_s"] / results["direct"]["tokens_per_s"], 3)
    results["setup"] = vars(args) | {"cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
