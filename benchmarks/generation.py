"""Benchmark: generation throughput of the backends and of the project's actor pool, same prompts, one run.

    (a) vllm_bare  a bare `vllm.LLM.generate` over all prompts in this process (engine start excluded)
    (b) vllm_pool  the same model through the project's Ray actor pool (`run_generate`, backend vllm)
    (c) hf_pool    the same model through the actor pool with the hf backend
    (d) hf_direct  the hf backend called in this process (`generate_cell` per shard)

For the pools, `steady` counts only the shard jobs (reading the shard, generating, writing the cell) and
`end_to_end` adds actor start and model load. Results go to benchmarks/results/generation.json; the goal is
(b) steady >= 0.9 x (a).

    python benchmarks/generation.py                      # packaged SmolLM2, 48 MT-Bench prompts x 32 tokens, fp32
    python benchmarks/generation.py --prompts 16 --tokens 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _rate(tokens: int, seconds: float) -> dict:
    return {"new_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.json"))
    args = ap.parse_args()

    import ray

    from cluster.hf import HFGenerator
    from schemas.config import DataConfig, ExpertSpec
    from schemas.store import Store
    from tasks.generate import expert_fingerprint, generate_cell, render, run_generate
    from tasks.ingest import read_queries, write_shards

    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "mtbench.jsonl"
    queries = read_queries(DataConfig(path=str(data), limit=args.prompts))
    has_vllm = importlib.util.find_spec("vllm") is not None
    # the output path is not a result (and must not carry this machine's absolute paths)
    res: dict = {"setup": {k: v for k, v in vars(args).items() if k != "out"}
                 | {"cpus": os.cpu_count(), "dtype": "float32", "greedy": True}}

    def spec(backend: str) -> ExpertSpec:
        return ExpertSpec(name=f"bench-{backend}", model=args.model, backend=backend, dtype="float32",
                          max_model_len=1024, sampling={"max_new_tokens": args.tokens},
                          resources={"batch_size": args.shard_size, "num_cpus": 1, "threads": 1})

    with tempfile.TemporaryDirectory() as tmp:
        def fresh(name: str) -> tuple[Store, list[int]]:
            store = Store(f"{tmp}/{name}")
            return store, write_shards(store, queries, args.shard_size).shards

        # (d) hf in this process
        store, shards = fresh("hf_direct")
        g = HFGenerator(args.model, dtype="float32", threads=1)
        t = time.perf_counter()
        toks = sum(generate_cell(g, s, spec=spec("hf"), fp=expert_fingerprint(spec("hf")), store=store)["new_tokens"]
                   for s in shards)
        res["hf_direct"] = _rate(toks, time.perf_counter() - t)
        prompts = render(g, "chat", queries["text"].to_list())
        del g

        # (a) bare vLLM in this process, same rendered prompts
        if has_vllm:
            from vllm import LLM, SamplingParams

            from cluster.models import resolve

            llm = LLM(model=str(resolve(args.model)), dtype="float32", max_model_len=1024, enforce_eager=True)
            llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm-up
            t = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(max_tokens=args.tokens, temperature=0), use_tqdm=False)
            res["vllm_bare"] = _rate(sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - t)
            del llm, outs

        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=f"{tmp}/ray")
        for backend in ["hf"] + (["vllm"] if has_vllm else []):
            store, shards = fresh(f"{backend}_pool")
            t = time.perf_counter()
            r = run_generate(store, spec(backend), shards)
            total = time.perf_counter() - t
            res[f"{backend}_pool"] = {"steady": _rate(r.new_tokens, r.job_seconds),
                                      "end_to_end": _rate(r.new_tokens, total)}
        ray.shutdown()

    if has_vllm:
        res["ratio_vllm_pool_steady_over_bare"] = round(
            res["vllm_pool"]["steady"]["tokens_per_s"] / res["vllm_bare"]["tokens_per_s"], 3)
        res["ratio_vllm_bare_over_hf_direct"] = round(
            res["vllm_bare"]["tokens_per_s"] / res["hf_direct"]["tokens_per_s"], 3)
    res["ratio_hf_pool_steady_over_direct"] = round(
        res["hf_pool"]["steady"]["tokens_per_s"] / res["hf_direct"]["tokens_per_s"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    if has_vllm:
        from summary import record  # benchmarks/ is this script's sys.path[0]

        r = res["ratio_vllm_pool_steady_over_bare"]
        record("generation: vllm pool / bare vllm (steady)", r, ">= 0.9", "ratio", r >= 0.9,
               {k: res[k] for k in ("setup", "vllm_bare", "vllm_pool", "hf_direct", "hf_pool")})


if __name__ == "__main__":
    main()
