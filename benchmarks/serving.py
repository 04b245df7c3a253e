"""Benchmark: what serving costs on top of the experts, on this machine, in one run.

    (a) router decision latency at batch 1 (`Router.probs([text])`, the gateway's call) for a MiniLM router
        (packaged:all-minilm-l6-v2, max_length 128, as examples/quickstart.yaml) and an e5-small router
        (packaged:multilingual-e5-small, prefix "query: ", max_length 256, as examples/routerdc.yaml), each with a
        random head (latency does not depend on the head's weights). `before` is the batch path that `probs` took for
        one text until it had a short path (`embed_texts` then `probs_from_features`), `after` is `probs`, both at
        torch's default thread count; `after_1_thread` is `probs` with torch.set_num_threads(1); `int8` is `probs`
        of the same router loaded with `quantize="int8"` (`zooter gateway --quantize int8`); `onnx` and
        `onnx_int8` load it with `runtime="onnx"` (float32, and with `quantize="int8"`: `zooter gateway --runtime
        onnx [--quantize int8]`; the graph is exported into the model cache on first use, not timed).
    (a') each variant's decisions vs the float32 torch router's, for trained routers (`--agreement-store STORE`,
        repeatable: the store's champion): on up to `--agreement-queries` of its labels' test queries, the share
        routed to the same expert and the mean reward of each version's picks (the labels' combined rewards).
    (b) gateway overhead per request at concurrency 1 and 32: `zooter gateway`'s app (uvicorn, as `serve` runs it)
        in front of an instant loopback upstream (a FastAPI app that answers at once), each server in its own
        process. overhead = gateway latency - latency of the same request sent straight to the upstream, by the
        same client (httpx, in this process). Once with an instant router (the HTTP path alone) and once with the
        MiniLM router (what a request really waits for; calls to one router run one at a time).

    (c) routing throughput over HTTP, one at a time vs 32 in flight, per runtime (torch, onnx, onnx int8): the
        gateway app in one process (on .zooter/routerdc's champion if there is one, else an e5-small router as
        RouterDC's with a random head), an httpx client in another, POST /v1/route with RouterDC's test questions.
        Each variant reports requests/s, latency, the router's calls (mean batch, share of the wall time it was
        busy: near 1 means the encoder is the bottleneck, well below means HTTP or the client are) and the time of
        one batch of 32 through the encoder (measured in the gateway's process before it listens). The goal
        (issue 37): at 32 in flight at least the serial rate, p50 within 2x one batch of 32. Run at an earlier
        commit (PYTHONPATH at its tree, --throughput-section routing_throughput_before --commit C) for a before.

Queries for (a) and (b) are MT-Bench's first turns (examples/data/mtbench.jsonl), cycled. Every statistic (p50,
p90, p99 in ms) is the median over `--repeats` repeats; `runs` keeps each repeat's p50. Timing is only meaningful
on an otherwise idle machine: (c) records the load average before, per phase and after. Results go to
benchmarks/results/serving.json.

    make bench-serving
    python benchmarks/serving.py --repeats 3 --calls 200 --requests 400
    python benchmarks/serving.py --only-throughput --repeats 2 --throughput-requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# name -> (encoder, prefix, max_length): the routers of examples/quickstart.yaml and examples/routerdc.yaml
ROUTERS = {"minilm": ("packaged:all-minilm-l6-v2", "", 128),
           "e5-small": ("packaged:multilingual-e5-small", "query: ", 256)}
EXPERTS = ["small", "big"]
ANSWER = {"id": "c1", "object": "chat.completion", "created": 0, "model": "upstream",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def stats(seconds: list[float]) -> dict[str, float]:
    """p50, p90, p99 in milliseconds (nearest rank)."""
    s = sorted(seconds)
    return {f"p{q}": round(1e3 * s[min(len(s) - 1, int(q / 100 * len(s)))], 3) for q in (50, 90, 99)}


def median_of(runs: list[dict[str, float]]) -> dict:
    """Each statistic's median over the repeats, and each repeat's p50."""
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]} | {"runs_p50": [r["p50"]
                                                                                              for r in runs]}


def queries() -> list[str]:
    lines = (ROOT / "examples" / "data" / "mtbench.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def save_router(name: str, out: Path) -> None:
    """A frozen-encoder router with a random head on the encoder `name` of ROUTERS, saved as training saves one."""
    import torch

    from cluster import models
    from cluster.router import build_from_config, save
    from schemas.config import RouterConfig

    encoder, prefix, max_length = ROUTERS[name]
    cfg = RouterConfig(encoder=encoder, prefix=prefix, max_length=max_length, freeze_encoder=True)
    torch.manual_seed(0)
    model, tok = build_from_config(cfg, len(EXPERTS))
    save(model, tok, cfg, out, {"experts": EXPERTS, "encoder_identity": models.identity(encoder)})


# --- (a) router decision latency ----------------------------------------------------------------------------------

def router_latency(name: str, texts: list[str], calls: int, repeats: int, tmp: Path) -> dict:
    import torch

    from cluster.router import Router, embed_texts

    save_router(name, tmp / name)
    t0 = time.perf_counter()
    router = Router(tmp / name, device="cpu")
    load_s = time.perf_counter() - t0
    cfg = router.config
    threads = torch.get_num_threads()

    def before(text: str) -> object:
        return router.probs_from_features(embed_texts(router.model, router.tok, [text], cfg.max_length, cfg.prefix))

    def after(text: str) -> object:
        return router.probs([text])

    variants = {"int8": Router(tmp / name, device="cpu", quantize="int8"),
                "onnx": Router(tmp / name, device="cpu", runtime="onnx"),
                "onnx_int8": Router(tmp / name, device="cpu", runtime="onnx", quantize="int8")}

    def timed(fn: Callable[[str], object], n_threads: int) -> dict[str, float]:
        torch.set_num_threads(n_threads)
        try:
            for text in texts[:10]:  # warm-up
                fn(text)
            took = []
            for i in range(calls):
                t = time.perf_counter()
                fn(texts[i % len(texts)])
                took.append(time.perf_counter() - t)
            return stats(took)
        finally:
            torch.set_num_threads(threads)

    import numpy as np

    same = all(np.array_equal(before(t), after(t)) for t in texts[:20])
    onnx_diff = max(float(np.abs(variants["onnx"].probs([t]) - after(t)).max()) for t in texts)
    runs: dict[str, list] = {"before": [], "after": [], "after_1_thread": []} | {k: [] for k in variants}
    for _ in range(repeats):  # interleaved, so drift on the machine hits every variant alike
        runs["before"].append(timed(before, threads))
        runs["after"].append(timed(after, threads))
        runs["after_1_thread"].append(timed(after, 1))
        for k, r in variants.items():
            runs[k].append(timed(lambda text, r=r: r.probs([text]), threads))
    return {"encoder": ROUTERS[name][0], "max_length": cfg.max_length, "torch_threads": threads,
            "load_s": round(load_s, 2), "same_probabilities": same,
            "onnx_max_prob_diff": float(f"{onnx_diff:.3g}")} | {k: median_of(v) for k, v in runs.items()}


def decision_agreement(store_url: str, n: int) -> dict:
    """Each served variant's decisions vs the float32 torch router's, for the store's champion on (up to) n of its
    test queries (a seeded sample)."""
    import numpy as np
    import polars as pl

    from cluster.router import Router
    from schemas.artifacts import LABELS, labels_path
    from schemas.evaluation import read_champion
    from schemas.store import Store

    store = Store(store_url)
    champ = read_champion(store)
    test = pl.from_arrow(store.read_table(labels_path(champ.labels), LABELS)).filter(pl.col("split") == "test")
    test = test.sample(min(n, test.height), seed=0)
    rewards = np.array(test["rewards"].to_list(), dtype=float)
    texts = test["text"].to_list()
    picks = {}
    for name, (q, runtime) in {"float32": (None, "torch"), "int8": ("int8", "torch"), "onnx": (None, "onnx"),
                               "onnx_int8": ("int8", "onnx")}.items():
        router = Router.from_store(store, champ.router_fp, quantize=q, runtime=runtime)
        picks[name] = router.probs(texts).argmax(axis=1)
    rows = np.arange(len(texts))
    return {"router": champ.router_fp, "encoder": router.config.encoder, "queries": len(texts)} | {
        f"same_decision_{k}": round(float((picks["float32"] == v).mean()), 4) for k, v in picks.items()
        if k != "float32"} | {f"mean_reward_{k}": round(float(np.nanmean(rewards[rows, v])), 4)
                              for k, v in picks.items()}


# --- (b) gateway overhead -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet() -> None:
    """A server process's output (uvicorn's access log: one line per request) goes nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def serve_upstream(port: int) -> None:
    """The instant expert: answers every chat request at once with a fixed completion."""
    import uvicorn
    from fastapi import FastAPI

    _quiet()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> dict:
        return ANSWER

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class InstantRouter:
    """Answers at once: the gateway's overhead without the router's."""

    experts = EXPERTS

    def probs(self, texts: list[str]):
        import numpy as np

        return np.full((len(texts), len(EXPERTS)), 1 / len(EXPERTS))


def serve_gateway(store_url: str, experts_file: str, port: int, instant: bool) -> None:
    """The gateway as `gateway.app.serve` runs it (uvicorn at log level info), on the store's champion."""
    import uvicorn

    from gateway.app import create_app
    from gateway.experts import load_endpoints
    from gateway.routers import Routers
    from schemas.store import Store

    _quiet()
    store = Store(store_url)
    routers = Routers(store, load=lambda _s, _fp: InstantRouter()) if instant else Routers(store)
    app = create_app(routers, load_endpoints(store, Path(experts_file)))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")


@contextlib.contextmanager
def process(target: Callable[..., None], *args: object, health: str, start_s: float = 180) -> Iterator[None]:
    """Run a server in a fresh process until `health` answers 200; stop it afterwards."""
    import httpx

    p = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    p.start()
    deadline = time.monotonic() + start_s
    try:
        while True:
            if not p.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{target.__name__} did not start (exit code {p.exitcode})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health, timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield
    finally:
        p.terminate()
        p.join(10)


def crown(store_dir: Path, router_name: str) -> None:
    """Save router `router_name` into the store and make it the champion (an evaluation without costs)."""
    from schemas.artifacts import CHAMPION_PATH, report_path, router_dir
    from schemas.evaluation import Champion, EvalReport
    from schemas.store import Store

    save_router(router_name, store_dir / router_dir("bench"))
    store = Store(str(store_dir))
    report = EvalReport(evaluation="evbench", labels="l0", router="bench", experts=EXPERTS, test_queries=0,
                        best_single=EXPERTS[0], rows=[], router_share={})
    store.write_json(report_path(report.evaluation), report.model_dump(mode="json"))
    store.write_json(CHAMPION_PATH, Champion(
        router=router_dir("bench"), evaluation=f"evaluations/{report.evaluation}", labels="l0", experts=EXPERTS,
        reward=None, run_id="bench", published=dt.datetime.now(dt.UTC).isoformat()).model_dump(mode="json"))


async def load(url: str, model: str, texts: list[str], requests: int, concurrency: int) -> list[float]:
    """Send `requests` chat requests, `concurrency` at a time; each one's latency in seconds."""
    import httpx

    took: list[float] = []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(w: int, n: int) -> None:
            for i in range(w, n, concurrency):
                body = {"model": model, "messages": [{"role": "user", "content": texts[i % len(texts)]}]}
                t = time.perf_counter()
                r = await client.post(f"{url}/chat/completions", json=body)
                took.append(time.perf_counter() - t)
                r.raise_for_status()

        await asyncio.gather(*(worker(w, 2 * concurrency) for w in range(concurrency)))  # warm-up: connections
        took.clear()
        await asyncio.gather(*(worker(w, requests) for w in range(concurrency)))
    return took


def gateway_overhead(texts: list[str], requests: int, repeats: int, tmp: Path) -> dict:
    import yaml

    up_port, gw_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    experts_file = tmp / "experts.yaml"
    experts_file.write_text(yaml.safe_dump({e: {"base_url": upstream, "model": e} for e in EXPERTS}))
    crown(tmp / "store", "minilm")
    out = {}
    with process(serve_upstream, up_port, health=f"http://127.0.0.1:{up_port}/health"):
        for label, instant in (("instant_router", True), ("minilm_router", False)):
            gateway = f"http://127.0.0.1:{gw_port}/v1"
            with process(serve_gateway, str(tmp / "store"), str(experts_file), gw_port, instant,
                         health=f"http://127.0.0.1:{gw_port}/health"):
                out[label] = {}
                for conc in (1, 32):
                    runs: dict[str, list] = {"direct": [], "gateway": [], "overhead": []}
                    for _ in range(repeats):
                        direct = stats(asyncio.run(load(upstream, "upstream", texts, requests, conc)))
                        via = stats(asyncio.run(load(gateway, "zooter", texts, requests, conc)))
                        runs["direct"].append(direct)
                        runs["gateway"].append(via)
                        runs["overhead"].append({k: round(via[k] - direct[k], 3) for k in via})
                    out[label][f"concurrency_{conc}"] = {k: median_of(v) for k, v in runs.items()}
    return out


# --- (c) routing throughput over HTTP ------------------------------------------------------------------------------

VARIANTS = {"torch": ("torch", None), "onnx": ("onnx", None), "onnx_int8": ("onnx", "int8")}


def routerdc_queries(n: int) -> list[str] | None:
    """A seeded sample of RouterDC's test questions (all five tasks), or None where the dataset is absent."""
    import random

    folder = Path(os.environ.get("ROUTERDC_DATA", ROOT.parent / "shared" / "datasets" / "routerdc"))
    files = sorted(folder.glob("*test*.json"))
    if not files:
        return None
    texts = [row["question"] for f in files for row in json.loads(f.read_text(encoding="utf-8"))]
    return random.Random(0).sample(texts, min(n, len(texts)))


def serve_routing(store_url: str, port: int, runtime: str, quantize: str | None, probe: list[str]) -> None:
    """The gateway app on the store's champion in `runtime` (as `zooter gateway --runtime R [--quantize int8]`
    builds it), plus /bench/stats: the router's calls (batch sizes, seconds inside `probs`) and the median time of
    one batch of 32 `probe` texts through it, measured before the gateway listens."""
    import functools

    import uvicorn

    from gateway.app import create_app
    from gateway.routers import Routers, load_router
    from schemas.store import Store

    _quiet()
    routers = Routers(Store(store_url), functools.partial(load_router, quantize=quantize, runtime=runtime))
    router = routers.champion.router
    inner = router.probs
    for i in range(3):  # warm-up
        inner(probe[32 * i:32 * (i + 1)])
    batch32 = []
    for i in range(3, 10):
        t = time.perf_counter()
        inner(probe[32 * i:32 * (i + 1)])
        batch32.append(time.perf_counter() - t)
    calls: list[tuple[int, float]] = []

    def probs(texts: list[str]):
        t = time.perf_counter()
        out = inner(texts)
        calls.append((len(texts), time.perf_counter() - t))
        return out

    router.probs = probs
    app = create_app(routers, {})

    @app.get("/bench/stats")
    def stats_() -> dict:
        out = {"batch32_ms": round(1e3 * statistics.median(batch32), 2), "calls": len(calls),
               "texts": sum(n for n, _ in calls), "busy_s": round(sum(s for _, s in calls), 3),
               "runtime": getattr(router, "runtime", runtime), "batch_sizes": sorted(n for n, _ in calls)}
        calls.clear()
        return out

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")  # as `serve` runs it: access log included


def _route_client(conn, url: str, texts: list[str], requests: int, concurrency: int) -> None:
    """The load, in a process of its own: `requests` /v1/route calls, `concurrency` at a time; sends back each
    latency and the wall time."""
    import httpx

    async def run() -> tuple[list[float], float]:
        took: list[float] = []
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
            async def worker(w: int, n: int) -> None:
                for i in range(w, n, concurrency):
                    body = {"model": "zooter", "messages": [{"role": "user", "content": texts[i % len(texts)]}]}
                    t = time.perf_counter()
                    r = await client.post(f"{url}/v1/route", json=body)
                    took.append(time.perf_counter() - t)
                    r.raise_for_status()

            await asyncio.gather(*(worker(w, concurrency) for w in range(concurrency)))  # connections open
            took.clear()
            (await client.get(f"{url}/bench/stats")).raise_for_status()  # the router's counts start here
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(w, requests) for w in range(concurrency)))
            return took, time.perf_counter() - t0

    conn.send(asyncio.run(run()))
    conn.close()


def route_load(url: str, texts: list[str], requests: int, concurrency: int) -> tuple[list[float], float]:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_route_client, args=(theirs, url, texts, requests, concurrency), daemon=True)
    p.start()
    try:
        if not mine.poll(600):
            raise RuntimeError("the load client did not finish in 600 s")
        return mine.recv()
    finally:
        p.join(10)


def routing_throughput(texts: list[str], requests: int, repeats: int, tmp: Path,
                       variants: list[str]) -> dict:
    """Serial vs 32 in flight over HTTP, per runtime: the gateway in one process, the client in another."""
    import httpx

    store = ROOT / ".zooter" / "routerdc"
    if (store / "champion.json").exists():
        router, store_url = "the RouterDC champion (.zooter/routerdc)", str(store)
    else:
        crown(tmp / "store-e5", "e5-small")
        router, store_url = ("an e5-small router as RouterDC's (max_length 256, prefix 'query: ') with a random head: "
                             ".zooter/routerdc has no champion"), str(tmp / "store-e5")
    out: dict = {"router": router, "requests": requests, "concurrency": [1, 32], "client": "httpx.AsyncClient in "
                 "its own process, POST /v1/route", "threads": os.cpu_count()}
    from cluster.router import Router
    from schemas.evaluation import read_champion
    from schemas.store import Store

    fp = read_champion(Store(store_url)).router_fp
    for name in variants:  # ONNX graphs exported into the model cache first (once; not timed)
        runtime, quantize = VARIANTS[name]
        if runtime == "onnx":
            Router.from_store(Store(store_url), fp, quantize, runtime)
    for name in variants:
        runtime, quantize = VARIANTS[name]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with process(serve_routing, store_url, port, runtime, quantize, texts, health=f"{url}/health", start_s=600):
            first = httpx.get(f"{url}/bench/stats", timeout=30).json()
            res: dict = {"runtime": first["runtime"], "batch32_ms": first["batch32_ms"]}
            runs: dict[str, list] = {"serial": [], "concurrent_32": []}
            for _ in range(repeats):  # interleaved: drift on the machine hits both alike
                for label, conc in (("serial", 1), ("concurrent_32", 32)):
                    load_before = round(os.getloadavg()[0], 2)
                    took, wall = route_load(url, texts, requests, conc)
                    st = httpx.get(f"{url}/bench/stats", timeout=30).json()
                    sizes = st["batch_sizes"]
                    runs[label].append(stats(took) | {
                        "per_s": round(len(took) / wall, 2), "wall_s": round(wall, 2),
                        "router_busy": round(st["busy_s"] / wall, 3), "router_calls": st["calls"],
                        "mean_batch": round(st["texts"] / max(1, st["calls"]), 2),
                        "batch_p50": sizes[len(sizes) // 2] if sizes else 0, "load_1m": load_before})
            for label, r in runs.items():
                res[label] = {k: round(statistics.median(x[k] for x in r), 3) for k in r[0]} | {
                    "runs_per_s": [x["per_s"] for x in r], "runs_p50": [x["p50"] for x in r]}
            res["concurrent_vs_serial"] = round(res["concurrent_32"]["per_s"] / res["serial"]["per_s"], 2)
            res["p50_vs_2x_batch32"] = round(res["concurrent_32"]["p50"] / (2 * res["batch32_ms"]), 2)
            out[name] = res
            print(name, json.dumps(res), file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="Repeats of every measurement (>= 3: medians).")
    ap.add_argument("--calls", type=int, default=200, help="Router calls per variant and repeat.")
    ap.add_argument("--requests", type=int, default=400, help="Requests per concurrency, target and repeat.")
    ap.add_argument("--agreement-store", action="append", default=[], help="A store whose champion's decisions "
                    "in each variant are compared with float32 torch's on its test queries (repeatable).")
    ap.add_argument("--agreement-queries", type=int, default=1000, help="Test queries sampled per store.")
    ap.add_argument("--skip-gateway", action="store_true", help="Measure router latency and agreement only.")
    ap.add_argument("--only-throughput", action="store_true", help="Measure (c) only; keep the file's other "
                    "sections.")
    ap.add_argument("--throughput-requests", type=int, default=256, help="(c): requests per concurrency, variant "
                    "and repeat.")
    ap.add_argument("--throughput-variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--throughput-section", default="routing_throughput", help="(c)'s key in the results file "
                    "(e.g. routing_throughput_before, run with PYTHONPATH at an earlier commit's tree).")
    ap.add_argument("--commit", default=None, help="The commit measured (default: git HEAD).")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args()

    import torch
    import transformers

    texts = queries()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip() or None
    out = Path(args.out)
    if args.only_throughput:
        res = json.loads(out.read_text()) if out.exists() else {}
        with tempfile.TemporaryDirectory() as d:
            res[args.throughput_section] = throughput_section(args, commit, Path(d))
        out.write_text(json.dumps(res, indent=2) + "\n")
        record_throughput(res[args.throughput_section], args.throughput_section)
        print(json.dumps(res[args.throughput_section], indent=2))
        return
    # the output path is not a result (and must not carry this machine's absolute paths)
    res: dict = {"setup": {k: v for k, v in vars(args).items() if k not in ("out", "agreement_store")} | {
        "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "queries": f"MT-Bench first turns ({len(texts)}, cycled)",
        "unit": "ms; every statistic is the median over the repeats"}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        res["router_decision_batch_1"] = {name: router_latency(name, texts, args.calls, args.repeats, tmp)
                                          for name in ROUTERS}
        print(json.dumps(res["router_decision_batch_1"], indent=2), file=sys.stderr)
        res["agreement"] = [decision_agreement(s, args.agreement_queries) for s in args.agreement_store]
        print(json.dumps(res["agreement"], indent=2), file=sys.stderr)
        if not args.skip_gateway:
            res["gateway_overhead"] = gateway_overhead(texts, args.requests, args.repeats, tmp)
            res[args.throughput_section] = throughput_section(args, commit, tmp)
    if args.skip_gateway and out.exists():  # keep the last gateway measurements
        res |= {k: v for k, v in json.loads(out.read_text()).items() if k in ("gateway_overhead",
                                                                                args.throughput_section)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    from summary import record

    variants = ("before", "after", "after_1_thread", "int8", "onnx", "onnx_int8")
    for name, r in res["router_decision_batch_1"].items():
        best = min(variants[1:], key=lambda k: r[k]["p50"])
        record(f"router decision p50, batch 1 ({name})", r[best]["p50"], "<= 10", "ms", r[best]["p50"] <= 10,
               {"variant": best} | {k: r[k]["p50"] for k in variants}
               | {"agreement": [a for a in res["agreement"] if a["encoder"] == r["encoder"]]})
    if args.throughput_section in res:
        record_throughput(res[args.throughput_section], args.throughput_section)
    print(json.dumps(res, indent=2))


def throughput_section(args: argparse.Namespace, commit: str | None, tmp: Path) -> dict:
    """(c) with where and when it was measured (commit, date, cores, load before and after)."""
    texts = routerdc_queries(1000)
    what = "RouterDC test questions (1,000 sampled, seed 0)"
    if texts is None:
        texts, what = queries(), "MT-Bench first turns (RouterDC's dataset is absent)"
    head = {"commit": commit, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cores": os.cpu_count(), "load": load_now(), "queries": what}
    body = routing_throughput(texts, args.throughput_requests, args.repeats, tmp, args.throughput_variants)
    return head | body | {"load_after": load_now()}


def load_now() -> dict[str, float]:
    return dict(zip(("load_1m", "load_5m", "load_15m"), (round(x, 2) for x in os.getloadavg()), strict=True))


def record_throughput(sec: dict, name: str) -> None:
    """The goal of issue 37: with 32 in flight at least the serial rate, p50 within 2x one batch of 32."""
    from summary import record

    for v in VARIANTS:
        if v in sec:
            r = sec[v]
            record(f"gateway routing, 32 in flight vs serial ({v}, {name})", r["concurrent_vs_serial"], ">= 1 "
                   "(and p50 <= 2 x batch of 32)", "x", r["concurrent_vs_serial"] >= 1 and r["p50_vs_2x_batch32"] <= 1,
                   {"commit": sec["commit"], "date": sec["date"], "cores": sec["cores"], "load": sec["load"],
                    "serial_per_s": r["serial"]["per_s"], "concurrent_per_s": r["concurrent_32"]["per_s"],
                    "concurrent_p50_ms": r["concurrent_32"]["p50"], "batch32_ms": r["batch32_ms"]})


if __name__ == "__main__":
    main()
