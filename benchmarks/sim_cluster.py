r"""A simulated GPU cluster, measured (issue 35, items 1 and 2): our stage runner against Ray Data, side by side.

Ray starts on this machine with declared logical resources (`ray.init(num_cpus=64, num_gpus=G)`): Ray places actors
on them and nothing touches a device. The label flow's cell stages run as the flow runs them (flows/label.py
`label_dag` minus Prefect and the router tail): `plan_run` on a written config (preflight, fingerprints), `write_shards`
on a real local store, then `run_generate` per expert and `run_score` per reward model in threads, with the run's
`Leases`, pipelined in one `cluster.stage.Pipeline` (as the flow does) or staged (every generation stage, then every
scoring stage). Experts and reward models are `backend: synthetic` (cluster/synthetic.py) given a latency model: a
call sleeps prompt_tokens / prefill rate + new_tokens / decode rate (an RM: its query + answer tokens / prefill rate)
of its model class, times a time scale chosen per grid point so that the lower bound is `--target-s` seconds; the
synthetic hashing inside a call counts toward that time (cluster/synthetic.py `Latency.spend`).

The same plan then runs on Ray Data (`ray_data_run`): one `map_batches` actor pool per expert over its missing shard
keys, the ten expert branches `union`-ed into one stream, then one `map_batches` actor pool per reward model over the
(expert, shard) rows; each actor builds the same synthetic model once (the backends' builders) and calls the same cell
jobs (`tasks.generate.generate_cell`, `tasks.score.score_cell`), so cells are written at the same content-addressed
paths with the same fingerprints. The run's leases are taken for every missing key before the dataset starts and
given back as each cell is written (Ray Data has no hook to take a lease when a row starts).

Model classes and rates (one model instance; 70B-class with tensor parallelism 4 = 4 GPUs, 1B/8B on 1 GPU):
- The prefill/decode split of a class comes from the two-point throughput table of TensorRT-LLM on H100 (input/output
  128/128 vs 2048/128: LLaMA 7B TP1 9,193 and 2,058 output tok/s, LLaMA 70B TP4 3,317 and 843; NVIDIA/TensorRT-LLM
  docs/source/performance.md, release 0.5.0): time per request = ISL / prefill + OSL / decode, solved for both.
- The level is vLLM's: the split is scaled so the model reproduces a published vLLM run. 8B: `vllm bench serve`
  Llama-3.1-8B-Instruct on ShareGPT, 1000 requests, 229,711 input and 203,068 output tokens in 30.85 s (vllm-project/
  vllm PR #18566); 70B TP4: `benchmark_throughput.py -tp 4` Llama-3.1-70B-Instruct, ISL 1000 / OSL 100, 7.67 req/s,
  766.6 output tok/s (vllm-project/vllm PR #13305, on 4 GPUs of an MI300X node: the only published vLLM TP4 70B
  figure found with its input/output split). Result: 8B 29,340 prefill / 8,826 decode tok/s; 70B TP4 10,820 / 2,631.
- 1B: no published vLLM figure with a split was found (searched the vLLM blog, issues and docs); its rates are the
  8B's times 3 (an assumption, recorded as such in the results).
The vLLM v0.6.0 post (blog.vllm.ai/2024/09/05/perf-update.html: Llama 8B on 1xH100, 70B on 4xH100, ShareGPT) sets
the same TP1/TP4 layout. Every figure and source is in the results JSON (`latency_model`).

Accounting. Per run: `makespan_s` = wall time from the first stage's start to the last cell written (actor start-up
included); `bound_s` = max(GPU-seconds of every job / GPUs, the longest chain: one shard's generation + its slowest
score), from the latency model on the token counts actually in the cells (read back after the run); `busy` = GPU-
seconds spent in jobs / (GPUs x makespan) (ours also per pool: job time / actor held time, cluster/pool.py
`PoolUsage`); `pipelined / staged` and `ray_data / ours` ratios of makespans. Every cell is checked present and valid.

Actors and processes: each pool gets its share of the cluster (`pool_sizes`: its share of the expected GPU-seconds
times the GPUs, in model instances, at least one; staged: shares within each phase, so each phase can fill the
cluster), so about one actor process lives per GPU-sized slot (a TP4 actor holds a placement group of 4 GPU bundles:
one process for 4 GPUs) and each pool starts its actors once. A first grid run gave every pool the whole cluster
(pool_size = GPUs / TP): each pool then starts up to that many processes, on 2 cores at load ~20 (other sessions)
100k x 8 GPUs pipelined took 305 s against a 58 s bound (5.2x), most of it process starts. Worker prestart is off
(`RAY_prestart_worker_first_driver=0`) so 64 declared CPUs do not become 64 idle processes.

    make bench-sim                                   # the grid: 100k and 1M queries x 8, 16, 32 GPUs
    python benchmarks/sim_cluster.py --quick         # one tiny point (the test)
    python benchmarks/sim_cluster.py --sizes 100000 --gpus 8
"""

from __future__ import annotations

import argparse
import contextvars
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["ZOOTER_ALLOW_SYNTHETIC"] = "1"  # the explicit opt-in: this is a benchmark
os.environ["RAY_prestart_worker_first_driver"] = "0"  # noqa: SIM112 - Ray's own spelling; 64 declared CPUs must not mean 64 idle worker processes
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bar per stage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "sim_cluster.json"

# --- the latency model ---------------------------------------------------------------------------------------------
# (ISL, OSL, output tok/s) pairs of TensorRT-LLM's H100 table: the prefill/decode split of a class.
TRT_SPLIT = {"7b_tp1": ((128, 128, 9193), (2048, 128, 2058)), "70b_tp4": ((128, 128, 3317), (2048, 128, 843))}
# A published vLLM run of the class: (input tokens, output tokens, seconds): the level.
VLLM_RUN = {"7b_tp1": (229_711, 203_068, 30.85), "70b_tp4": (1000 * 1000, 1000 * 100, 1000 / 7.67)}
SOURCES = {
    "split": "NVIDIA/TensorRT-LLM docs/source/performance.md (release 0.5.0), H100 FP8: LLaMA 7B TP1 128/128 9,193 "
             "and 2048/128 2,058 output tok/s; LLaMA 70B TP4 3,317 and 843",
    "8b": "vllm-project/vllm PR #18566: vllm bench serve Llama-3.1-8B-Instruct, ShareGPT 1000 requests, 229,711 in / "
          "203,068 out tokens in 30.85 s (6,582.87 output tok/s)",
    "70b": "vllm-project/vllm PR #13305: benchmark_throughput.py -tp 4 Llama-3.1-70B-Instruct ISL 1000 / OSL 100, "
           "7.67 req/s, 8,796 total / 766.6 output tok/s (4 GPUs of an MI300X node)",
    "1b": "assumption: 3 x the 8B rates (no published vLLM 1B figure with a prefill/decode split was found)",
    "layout": "blog.vllm.ai/2024/09/05/perf-update.html: Llama 8B on 1xH100, 70B on 4xH100 (TP 1 / 4)",
}


def _split(pairs: tuple) -> tuple[float, float]:
    """Seconds per prefill token and per decode token from two (ISL, OSL, output tok/s) points."""
    (i1, o1, t1), (i2, o2, t2) = pairs
    s1, s2 = o1 / t1, o2 / t2  # seconds per request
    cp = (s2 - s1 * o2 / o1) / (i2 - i1 * o2 / o1)
    return cp, (s1 - i1 * cp) / o1


def model_classes() -> dict[str, dict[str, Any]]:
    """Per class: tensor parallelism and the instance's prefill/decode tok/s (the split scaled to vLLM's level)."""
    out = {}
    for cls, trt, tp in (("8b", "7b_tp1", 1), ("70b", "70b_tp4", 4)):
        cp, cd = _split(TRT_SPLIT[trt])
        p, n, secs = VLLM_RUN[trt]
        k = secs / (p * cp + n * cd)  # vLLM's run took k times what the split predicts
        out[cls] = {"tp": tp, "prefill_tps": round(1 / (cp * k)), "decode_tps": round(1 / (cd * k)),
                    "source": SOURCES[cls]}
    out["1b"] = {"tp": 1, "prefill_tps": 3 * out["8b"]["prefill_tps"], "decode_tps": 3 * out["8b"]["decode_tps"],
                 "source": SOURCES["1b"]}
    return out


# The plan: 10 experts (4 x 1B, 4 x 8B, 2 x 70B TP4) and 3 reward models (a 1B and an 8B classifier, a 70B judge).
EXPERTS = [(f"e{i}-{c}", c) for i, c in enumerate(["1b"] * 4 + ["8b"] * 4 + ["70b"] * 2)]
RMS = [("rm0-1b", "1b", "classifier"), ("rm1-8b", "8b", "classifier"), ("rm2-70b", "70b", "loglik")]
FILLER = ("please explain step by step how you would solve this and state the final answer clearly at the end "  # noqa: SIM905
          "with a short check of the result").split()


def query_text(i: int) -> str:
    """~25-30 words: the prompt tokens of a short labeling query."""
    return " ".join([f"Question {i}: what follows {i * 7919 % 10007}?"] + FILLER[: 18 + i % 7])


def write_config(work: Path, n: int, shards: int, gpus: int, experts: list, rms: list) -> Path:
    import yaml

    data = work / "queries.jsonl"
    with data.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "text": query_text(i)}) + "\n")
    classes = model_classes()

    def res(cls: str) -> dict:
        tp = classes[cls]["tp"]  # TP > 1: the actor holds no GPU, its placement group holds tp (cluster/pool.py)
        return {"num_cpus": 1, "num_gpus": 1 if tp == 1 else 0, "pool_size": max(1, gpus // tp), "batch_size": 64}

    cfg = {"name": "sim-cluster", "store": str(work / "store"),
           "data": {"path": str(data), "id_field": "id", "shard_size": -(-n // shards)},
           "experts": [{"name": name, "model": "synthetic", "backend": "synthetic", "resources": res(c),
                        "tensor_parallel_size": classes[c]["tp"]} for name, c in experts],
           "reward_models": [{"name": name, "kind": kind, "backend": "synthetic", "resources": res(c),
                              "tensor_parallel_size": classes[c]["tp"]} for name, c, kind in rms]}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def scorer_seed(planned_rm: Any) -> str:
    """The seed the synthetic scorer of this RM is built with (its latency is keyed by it)."""
    from cluster.backends import scorer_builder

    return scorer_builder(planned_rm).args[0]


def latency_env(plan: Any, rm_classes: dict[str, str], ex_classes: dict[str, str], scale: float) -> str:
    from cluster.synthetic import LATENCY_ENV  # noqa: F401 - the variable this fills

    classes = model_classes()
    rates = {c: {"prefill_tps": v["prefill_tps"], "decode_tps": v["decode_tps"]} for c, v in classes.items()}
    return json.dumps({"time_scale": scale,
                       "experts": {e.spec.name: rates[ex_classes[e.spec.name]] for e in plan.experts},
                       "scorers": {scorer_seed(r): {"prefill_tps": rates[rm_classes[r.spec.name]]["prefill_tps"]}
                                   for r in plan.reward_models}})


def expected_gpu_s(experts: list, rms: list) -> dict[str, float]:
    """Each pool's expected GPU-seconds per query (mean prompt and answer lengths): its share of the work."""
    classes = model_classes()
    q = sum(len(query_text(i).split()) for i in range(1000)) / 1000
    new = sum(min(48, 8 + u) for u in range(57)) / 57
    w = {name: (q / classes[c]["prefill_tps"] + new / classes[c]["decode_tps"]) * classes[c]["tp"]
         for name, c in experts}
    w.update({name: len(experts) * (q + new) / classes[c]["prefill_tps"] * classes[c]["tp"] for name, c, _ in rms})
    return w


def pool_sizes(gpus: int, experts: list, rms: list, phases: bool) -> dict[str, int]:
    """Actors per pool: the pool's share of the GPU-seconds times the GPUs, in instances (ceil, at least one, at
    most what the cluster holds). `phases` (staged): shares within each phase (generation, then scoring), so each
    phase can fill the cluster; else one share over every pool (they run at once). Total actors stay about one per
    GPU-sized slot, and each pool starts its actors once."""
    classes = model_classes()
    w = expected_gpu_s(experts, rms)
    tp = {name: classes[c]["tp"] for name, c in experts} | {name: classes[c]["tp"] for name, c, _ in rms}
    groups = [[n for n, _ in experts], [n for n, _, _ in rms]] if phases else [list(w)]
    out = {}
    for g in groups:
        total = sum(w[n] for n in g)
        for n in g:
            out[n] = min(max(1, gpus // tp[n]), max(1, math.ceil(gpus * w[n] / total / tp[n])))
    return out


def sized(plan: Any, sizes: dict[str, int]) -> Any:
    """The plan with these pool sizes (resources are outside every fingerprint: the same cells)."""
    def one(m: Any) -> Any:
        res = m.spec.resources.model_copy(update={"pool_size": sizes[m.spec.name]})
        return m.model_copy(update={"spec": m.spec.model_copy(update={"resources": res})})

    return plan.model_copy(update={"experts": [one(e) for e in plan.experts],
                                   "reward_models": [one(r) for r in plan.reward_models]})


def expected_bound(n: int, shards: int, gpus: int, experts: list, rms: list) -> float:
    """The lower bound in modelled seconds before the run (mean answer length), to choose the time scale."""
    classes = model_classes()
    q_tokens = sum(len(query_text(i).split()) for i in range(n))
    new = n * sum(min(48, 8 + u) for u in range(57)) / 57  # the synthetic answers' mean length (max_new_tokens 48)
    gen = {c: (q_tokens / v["prefill_tps"] + new / v["decode_tps"]) for c, v in classes.items()}
    score = {c: (q_tokens + new) / v["prefill_tps"] for c, v in classes.items()}
    gpu_s = sum(gen[c] * classes[c]["tp"] for _, c in experts)
    gpu_s += len(experts) * sum(score[c] * classes[c]["tp"] for _, c, _ in rms)
    chain = max(gen[c] for _, c in experts) / shards + max(score[c] for _, c, _ in rms) / shards
    return max(gpu_s / gpus, chain)


# --- accounting -----------------------------------------------------------------------------------------------------
def modelled(store: Any, plan: Any, shards: list[int], ex_classes: dict, rm_classes: dict, scale: float,
             gpus: int) -> dict[str, Any]:
    """The bound from the token counts in the cells: per job its scaled seconds and GPUs."""
    from schemas.artifacts import GENERATIONS, QUERIES, generation_path, queries_path

    classes = model_classes()
    q_tokens = {s: sum(len(t.split()) for t in store.read_table(queries_path(s), QUERIES)["text"].to_pylist())
                for s in shards}
    gen_gpu_s = score_gpu_s = chain = 0.0
    for e in plan.experts:
        c = classes[ex_classes[e.spec.name]]
        for s in shards:
            new = sum(store.read_table(generation_path(e.spec.name, e.fingerprint, s), GENERATIONS)["new_tokens"]
                      .to_pylist())
            g = (q_tokens[s] / c["prefill_tps"] + new / c["decode_tps"]) * scale
            sc = [(q_tokens[s] + new) / classes[rm_classes[r.spec.name]]["prefill_tps"] * scale
                  for r in plan.reward_models]
            gen_gpu_s += g * c["tp"]
            score_gpu_s += sum(t * classes[rm_classes[r.spec.name]]["tp"] for t, r in zip(sc, plan.reward_models,
                                                                                         strict=True))
            chain = max(chain, g + max(sc))
    total = gen_gpu_s + score_gpu_s
    return {"bound_s": round(max(total / gpus, chain), 3), "gpu_s": round(total, 2),
            "scoring_share": round(score_gpu_s / total, 3), "longest_chain_s": round(chain, 3),
            "gpu_s_over_gpus": round(total / gpus, 3)}


def check_cells(store: Any, plan: Any, shards: list[int]) -> int:
    """Every generation and score cell is there and valid; returns how many."""
    from schemas.artifacts import GENERATIONS, SCORES, generation_path, score_path

    n = 0
    for e in plan.experts:
        for s in shards:
            assert store.valid_cell(generation_path(e.spec.name, e.fingerprint, s), GENERATIONS, e.fingerprint)
            n += 1
            for r in plan.reward_models:
                assert store.valid_cell(score_path(r.spec.name, r.fingerprint, e.spec.name, e.fingerprint, s),
                                        SCORES, r.fingerprint)
                n += 1
    return n


# --- ours: the flow's stages ----------------------------------------------------------------------------------------
def ours_run(store: Any, plan: Any, shards: list[int], pipelined: bool) -> dict[str, Any]:
    """generate per expert and score per RM in threads, as label_dag runs them (pipelined) or phase by phase."""
    from cluster.stage import Pipeline
    from schemas.leases import Leases
    from tasks.generate import run_generate
    from tasks.score import run_score

    stages = len(plan.experts) + len(plan.reward_models)
    t0 = time.perf_counter()
    with Leases(store, owner=f"sim-{'pipelined' if pipelined else 'staged'}") as leases, \
            ThreadPoolExecutor(stages) as pool:
        def submit(fn, *args):  # like Prefect's thread runner: the submitting context (its Pipeline) goes along
            return pool.submit(contextvars.copy_context().run, fn, *args)

        if pipelined:
            with Pipeline() as pipe:
                gens = []
                for e in plan.experts:
                    pipe.opened(e.spec.name)
                    f = submit(run_generate, store, e, shards, leases)
                    f.add_done_callback(lambda f, n=e.spec.name: pipe.closed(
                        n, None if f.exception() is None else repr(f.exception())))
                    gens.append(f)
                scores = [submit(run_score, store, r, plan.experts, shards, leases) for r in plan.reward_models]
                results = [f.result() for f in gens + scores]
        else:
            gens = [submit(run_generate, store, e, shards, leases) for e in plan.experts]
            results = [f.result() for f in gens]
            gen_end = time.perf_counter() - t0
            results += [f.result() for f in [submit(run_score, store, r, plan.experts, shards, leases)
                                            for r in plan.reward_models]]
    makespan = time.perf_counter() - t0
    names = [f"generate {e.spec.name}" for e in plan.experts] + [f"score {r.spec.name}" for r in plan.reward_models]
    tps = [e.spec.tensor_parallel_size for e in plan.experts] + [r.spec.tensor_parallel_size
                                                                 for r in plan.reward_models]
    out = {"makespan_s": round(makespan, 2),
           "job_gpu_s": round(sum(r.job_seconds * tp for r, tp in zip(results, tps, strict=True)), 2),
           "pool_busy": {n: None if r.busy is None else round(r.busy, 3) for n, r in zip(names, results, strict=True)},
           "cells_computed": sum(len(r.computed) for r in results)}
    if not pipelined:
        out["generation_phase_s"] = round(gen_end, 2)
    return out


# --- Ray Data: the same plan --------------------------------------------------------------------------------------
class CellJob:
    """A Ray Data actor: builds the model once, runs the cell job per row (key columns in, the same row out)."""

    def __init__(self, build: Any, job: Any, kind: str, todo: set | None = None):
        self.model, self.job, self.kind, self.todo = build(), job, kind, todo

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        experts, shards = list(batch["expert"]), [int(s) for s in batch["shard"]]
        secs = []
        for e, s in zip(experts, shards, strict=True):
            key = s if self.kind == "generate" else (str(e), s)
            if self.todo is not None and key not in self.todo:
                secs.append(0.0)
                continue
            secs.append(self.job(self.model, key)["seconds"])
        out = {k: v for k, v in batch.items() if k.startswith("s_")}  # the earlier operators' job seconds
        return {**out, "expert": np.asarray(experts), "shard": np.asarray(shards), f"s_{self.kind}": np.asarray(secs)}


def ray_data_run(store: Any, plan: Any, shards: list[int], gpus: int) -> dict[str, Any]:
    """The plan on Ray Data. `streaming` (one dataset: the experts' pools union-ed, then the RMs' pools) where every
    operator's first actor fits the cluster at once; else `per-model` datasets, every expert's at the same time, then
    every RM's: a streaming dataset holds each operator's minimum actor until the whole dataset ends, so one whose
    pools need more GPUs together than the cluster has never places the last one and never finishes (measured: a
    70B TP4 expert beside a 1B expert and two RMs on 4 GPUs waited > 7 minutes)."""
    import ray.data

    from cluster.backends import generator_builder, scorer_builder
    from schemas.artifacts import GENERATIONS, SCORES, generation_path, score_path
    from schemas.leases import Leases
    from schemas.store import cell_todo
    from tasks.generate import generate_cell
    from tasks.score import score_cell

    ray.data.DataContext.get_current().enable_progress_bars = False
    efps = {e.spec.name: e.fingerprint for e in plan.experts}
    footprint = sum(m.spec.tensor_parallel_size for m in [*plan.experts, *plan.reward_models])
    mode = "streaming" if footprint <= gpus else "per-model"
    gen_gpus = {e.spec.name: e.spec.tensor_parallel_size for e in plan.experts}
    score_gpus = {r.spec.name: r.spec.tensor_parallel_size for r in plan.reward_models}
    t0 = time.perf_counter()
    with Leases(store, owner="sim-raydata") as leases:
        held: list[str] = []

        def lease(keys_paths: list[tuple[Any, str]]) -> set:
            got = set()
            for k, p in keys_paths:
                if leases.take(p) is not None:
                    got.add(k)
                    held.append(p)
            return got

        def gen_op(ds: Any, e: Any) -> Any:
            spec = e.spec
            paths = [(s, generation_path(spec.name, e.fingerprint, s)) for s in shards]
            todo = set(cell_todo(store, paths, GENERATIONS, e.fingerprint)[0])
            return ds.map_batches(CellJob, fn_constructor_kwargs={
                "build": generator_builder(e), "kind": "generate",
                "todo": lease([kp for kp in paths if kp[0] in todo]),
                "job": partial(generate_cell, spec=spec, fp=e.fingerprint, store=store)},
                batch_size=1, num_cpus=1, num_gpus=spec.tensor_parallel_size,
                concurrency=(1, spec.resources.pool_size), zero_copy_batch=True)

        def score_op(ds: Any, r: Any) -> Any:
            spec = r.spec
            cells = [((ex, s), score_path(spec.name, r.fingerprint, ex, efps[ex], s)) for ex in efps for s in shards]
            todo = set(cell_todo(store, cells, SCORES, r.fingerprint)[0])
            return ds.map_batches(CellJob, fn_constructor_kwargs={
                "build": scorer_builder(r), "kind": f"score_{spec.name}",
                "todo": lease([c for c in cells if c[0] in todo]),
                "job": partial(score_cell, rm=spec, rm_fp=r.fingerprint, expert_fps=efps, store=store)},
                batch_size=1, num_cpus=1, num_gpus=spec.tensor_parallel_size,
                concurrency=(1, spec.resources.pool_size), zero_copy_batch=True)

        def keys(ex: list[str]) -> Any:
            items = [{"expert": e, "shard": s} for e in ex for s in shards]
            return ray.data.from_items(items, override_num_blocks=len(items))

        rows: list[dict] = []
        if mode == "streaming":
            branches = [gen_op(keys([e.spec.name]), e) for e in plan.experts]
            ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
            for r in plan.reward_models:
                ds = score_op(ds, r)
            rows = list(ds.iter_rows())
        else:
            with ThreadPoolExecutor(max(len(plan.experts), len(plan.reward_models))) as pool:
                for part in pool.map(lambda e: list(gen_op(keys([e.spec.name]), e).iter_rows()), plan.experts):
                    rows += part
                gen_end = time.perf_counter() - t0
                for part in pool.map(lambda r: list(score_op(keys(list(efps)), r).iter_rows()), plan.reward_models):
                    rows += part
        makespan = time.perf_counter() - t0
        for p in held:
            leases.release_later(p)
    gpu_s = 0.0
    for row in rows:
        gpu_s += row.get("s_generate", 0.0) * gen_gpus[str(row["expert"])]
        gpu_s += sum(row.get(f"s_score_{n}", 0.0) * tp for n, tp in score_gpus.items())
    out = {"makespan_s": round(makespan, 2), "job_gpu_s": round(gpu_s, 2), "raydata_plan": mode,
           "operators_min_gpus": footprint}
    if mode == "per-model":
        out["generation_phase_s"] = round(gen_end, 2)
    return out


# --- one grid point (a child process: its own Ray, its own peak RSS) -----------------------------------------------
def start_ray(gpus: int, cpus: int, env: dict[str, str], tmp: Path) -> None:
    import logging

    import ray
    from ray._private import ray_constants

    # loopback only, as cluster/pool.py `connect` does (Ray's single-machine path binds every server to 127.0.0.1)
    cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, _node_ip_address="127.0.0.1",
                 include_dashboard=False, object_store_memory=512 * 1024**2, _temp_dir=str(tmp),
                 logging_level=logging.WARNING, runtime_env={"env_vars": env})
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster


def rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(point: dict) -> dict[str, Any]:
    """One grid point: each mode on a fresh store under one Ray (declared resources, the point's time scale)."""
    from cluster.synthetic import LATENCY_ENV
    from schemas.store import Store
    from tasks.ingest import write_shards
    from tasks.plan import plan_run

    n, gpus, experts, rms = point["queries"], point["gpus"], point["experts"], point["rms"]
    ex_classes = {name: c for name, c in experts}
    rm_classes = {name: c for name, c, _ in rms}
    scale = point["target_s"] / expected_bound(n, point["shards"], gpus, experts, rms)
    base = Path(tempfile.mkdtemp(prefix="zsim-", dir=point.get("tmp")))
    out: dict[str, Any] = {"queries": n, "gpus": gpus, "shards": point["shards"],
                           "shard_size": -(-n // point["shards"]), "time_scale": round(scale, 6),
                           "cells_expected": len(experts) * point["shards"] * (1 + len(rms)),
                           "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           "load_1m_before": round(os.getloadavg()[0], 2), "modes": {}}
    try:
        cfg = write_config(base, n, point["shards"], gpus, experts, rms)
        t = time.perf_counter()
        plan = plan_run(cfg, "label")
        out["plan_s"] = round(time.perf_counter() - t, 2)
        env = {LATENCY_ENV: latency_env(plan, rm_classes, ex_classes, scale), "ZOOTER_ALLOW_SYNTHETIC": "1",
               "HF_HUB_OFFLINE": "1", "RAY_prestart_worker_first_driver": "0"}
        os.environ[LATENCY_ENV] = env[LATENCY_ENV]
        t = time.perf_counter()
        ray_tmp = Path(tempfile.mkdtemp(prefix="zr-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        start_ray(gpus, point["cpus"], env, ray_tmp)
        out["ray_start_s"] = round(time.perf_counter() - t, 2)
        for mode in point["modes"]:
            store = Store(str(base / f"store-{mode}"))
            t = time.perf_counter()
            shards = write_shards(store, plan.inputs, plan.config.data.shard_size).shards
            ingest_s = time.perf_counter() - t
            if mode == "ingest":  # the driver's part alone (plan + ingest): its peak RSS at a size too big to run
                out["modes"][mode] = {"ingest_s": round(ingest_s, 2), "driver_peak_rss_mib": rss_mib()}
                continue
            sizes = pool_sizes(gpus, experts, rms, phases=mode == "staged")
            if mode == "raydata":  # concurrency (1, pool size): Ray Data's autoscaler grows each pool up to it
                got = ray_data_run(store, sized(plan, sizes), shards, gpus)
            else:
                got = ours_run(store, sized(plan, sizes), shards, pipelined=mode == "pipelined")
            got["pool_sizes"] = sizes
            got["ingest_s"] = round(ingest_s, 2)
            got["cells_valid"] = check_cells(store, plan, shards)
            got.update(modelled(store, plan, shards, ex_classes, rm_classes, scale, gpus))
            got["ratio"] = round(got["makespan_s"] / got["bound_s"], 3)
            got["busy"] = round(got["job_gpu_s"] / (gpus * got["makespan_s"]), 3)
            got["driver_peak_rss_mib"] = rss_mib()  # the process's peak so far (this mode and the ones before)
            got["load_after"] = round(os.getloadavg()[0], 2)
            out["modes"][mode] = got
            print(f"  {mode}: makespan {got['makespan_s']} s, bound {got['bound_s']} s, ratio {got['ratio']}",
                  file=sys.stderr, flush=True)
            shutil.rmtree(base / f"store-{mode}", ignore_errors=True)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)
        if "ray_tmp" in locals():
            shutil.rmtree(ray_tmp, ignore_errors=True)
    return out


def run_point(point: dict, timeout: float) -> dict[str, Any]:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(point)], stdout=subprocess.PIPE, text=True,
                       timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode:
        raise RuntimeError(f"grid point {point['queries']} x {point['gpus']} failed ({p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- the grid ---------------------------------------------------------------------------------------------------------
def summarise(row: dict) -> dict:
    m = row["modes"]
    for g in m.values():
        if "makespan_s" in g:
            # how far the jobs' own time exceeded the model (CPU contention: the synthetic rows' hashing, Parquet
            # reads and writes), and the makespan against the bound the measured job times allow (the packing alone)
            g["job_stretch"] = round(g["job_gpu_s"] / g["gpu_s"], 3)
            g["ratio_to_job_time_bound"] = round(g["makespan_s"] / max(g["job_gpu_s"] / row["gpus"],
                                                                       g["longest_chain_s"]), 3)
    pipe, staged, rd = m.get("pipelined"), m.get("staged"), m.get("raydata")
    if pipe and staged:
        row["pipelined_over_staged"] = round(pipe["makespan_s"] / staged["makespan_s"], 3)
    if pipe and rd:
        row["raydata_over_ours"] = round(rd["makespan_s"] / pipe["makespan_s"], 3)
    return row


def table(rows: list[dict]) -> str:
    head = ("| queries | GPUs | shard | mode | makespan s | bound s | ratio | job stretch | vs job-time bound | busy | "
            "scoring | pipe/staged | RayData/ours | RSS MiB |")
    out = [head, "|" + "|".join("---" for _ in range(14)) + "|"]
    for r in rows:
        for mode, g in r["modes"].items():
            if "makespan_s" not in g:  # plan + ingest only
                out.append(f"| {r['queries']:,} | {r['gpus']} | {r['shard_size']:,} | {mode} (driver only) | - | - | "
                           f"- | - | - | - | - | | | {g['driver_peak_rss_mib']} |")
                continue
            out.append(f"| {r['queries']:,} | {r['gpus']} | {r['shard_size']:,} | {mode} | {g['makespan_s']} | "
                       f"{g['bound_s']} | {g['ratio']} | {g.get('job_stretch')} | {g.get('ratio_to_job_time_bound')} | "
                       f"{g['busy']} | {g['scoring_share']} | "
                       f"{r.get('pipelined_over_staged', '-') if mode == 'pipelined' else ''} | "
                       f"{r.get('raydata_over_ours', '-') if mode == 'raydata' else ''} | "
                       f"{g['driver_peak_rss_mib']} |")
    return "\n".join(out)


def goals(rows: list[dict]) -> dict[str, Any]:
    """Each goal over the grid: met, or the measured figures that miss it."""
    ours = [(r, r["modes"]["pipelined"]) for r in rows if "pipelined" in r["modes"]]
    ratio = {f"{r['queries']}x{r['gpus']}": g["ratio"] for r, g in ours}
    pipe = {f"{r['queries']}x{r['gpus']}": r["pipelined_over_staged"] for r, g in ours
            if "pipelined_over_staged" in r and g["scoring_share"] >= 0.25}
    rd = {f"{r['queries']}x{r['gpus']}": r["raydata_over_ours"] for r in rows if "raydata_over_ours" in r}
    big = [max(g["driver_peak_rss_mib"] for g in r["modes"].values()) for r in rows if r["queries"] >= 1_000_000]
    scope = sorted({m for r in rows if r["queries"] >= 1_000_000 for m in r["modes"]})
    return {
        "makespan_le_1.15_bound": {"met": bool(ratio) and all(v <= 1.15 for v in ratio.values()), "ratios": ratio},
        "pipelined_le_0.85_staged": {"met": bool(pipe) and all(v <= 0.85 for v in pipe.values()), "ratios": pipe},
        "driver_rss_le_2GiB_at_1M": {"met": bool(big) and max(big) <= 2048,
                                     "peak_mib": max(big) if big else None, "modes_run": scope},
        "raydata_within_5pct_of_ours": {"met": bool(rd) and all(v <= 1.05 for v in rd.values()), "ratios": rd},
    }


def git_commit() -> str | None:
    p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="Query counts, comma-separated.")
    ap.add_argument("--gpus", default="8,16,32", help="Declared GPUs, comma-separated.")
    ap.add_argument("--shards", type=int, default=20, help="Shards per run (shard size = queries / shards: the "
                    "cell count stays the same at every size).")
    ap.add_argument("--modes", default="pipelined,staged,raydata")
    ap.add_argument("--big-gpus", default="32", help="At >= 1M queries only these GPU counts run (CPU-bound here).")
    ap.add_argument("--big-modes", default="pipelined", help="At >= 1M queries only these modes run.")
    ap.add_argument("--target-s", type=float, default=60.0, help="The lower bound each run is scaled to (s).")
    ap.add_argument("--cpus", type=int, default=64, help="Declared CPUs.")
    ap.add_argument("--timeout", type=float, default=1500, help="Seconds one grid point may take.")
    ap.add_argument("--quick", action="store_true",
                    help="One tiny point (a 1B and an 8B expert, a 1B RM, 4 GPUs, 48 queries in 2 shards).")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tmp", default=None, help="Where the stores go (default: the system temp dir).")
    ap.add_argument("--merge", action="store_true", help="Keep the grid points of --out that this run does not "
                    "measure (e.g. the 1M point run on its own).")
    ap.add_argument("--render", action="store_true", help="Recompute the ratios and goals of --out; print its table.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.render:
        doc = json.loads(args.out.read_text())
        doc["grid"] = [summarise(r) for r in doc["grid"]]
        doc["goals"] = goals(doc["grid"])
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(table(doc["grid"]))
        print(json.dumps(doc["goals"], indent=2))
        return
    load = os.getloadavg()
    started = dt.datetime.now(dt.UTC)
    experts, rms = EXPERTS, RMS
    if args.quick:
        experts, rms = [EXPERTS[0], EXPERTS[4]], [RMS[0]]
        points = [(48, 4, 2, args.modes.split(","))]
        target = 2.0
    else:
        points = []
        for n in map(int, args.sizes.split(",")):
            big = n >= 1_000_000
            for g in map(int, (args.big_gpus if big else args.gpus).split(",")):
                points.append((n, g, args.shards, (args.big_modes if big else args.modes).split(",")))
        target = args.target_s
    rows = []
    for n, g, shards, modes in points:
        print(f"sim_cluster: {n:,} queries on {g} GPUs ({shards} shards): {', '.join(modes)}", file=sys.stderr,
              flush=True)
        point = {"queries": n, "gpus": g, "shards": shards, "modes": modes, "target_s": target, "cpus": args.cpus,
                 "experts": experts, "rms": rms, "tmp": args.tmp}
        rows.append(summarise(run_point(point, args.timeout)))
    if args.merge and args.out.exists():
        new = {(r["queries"], r["gpus"]) for r in rows}
        rows = sorted([r for r in json.loads(args.out.read_text())["grid"] if (r["queries"], r["gpus"]) not in new]
                      + rows, key=lambda r: (r["queries"], r["gpus"]))
    doc = {"commit": git_commit(), "date": started.isoformat(timespec="seconds"),
           "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                       "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)},
           "load": {"load_1m": round(load[0], 2), "load_5m": round(load[1], 2), "load_15m": round(load[2], 2)},
           "quick": args.quick, "declared": {"gpus": [r["gpus"] for r in rows], "ray_cpus": args.cpus},
           "plan": {"experts": {name: c for name, c in experts}, "reward_models": {n: f"{c} {k}" for n, c, k in rms},
                    "pool_size": "ceil(GPUs x the pool's share of the expected GPU-seconds / tensor parallelism), at "
                                 "least 1 (staged: shares within each phase); Ray Data: concurrency (1, that size)",
                    "target_bound_s": target},
           "latency_model": {"classes": model_classes(), "sources": SOURCES,
                             "formula": "prompt_tokens / prefill_tps + new_tokens / decode_tps per call (RM: "
                                        "(query + answer tokens) / prefill_tps), x time_scale, spent in sleep"},
           "grid": rows, "goals": goals(rows),
           "wall_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(rows))
    print(json.dumps(doc["goals"], indent=2))


if __name__ == "__main__":
    main()
