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

Queries are MT-Bench's first turns (examples/data/mtbench.jsonl), cycled. Every statistic (p50, p90, p99 in ms) is
the median over `--repeats` repeats; `runs` keeps each repeat's p50. Timing is only meaningful on an otherwise
idle machine. Results go to benchmarks/results/serving.json.

    make bench-serving
    python benchmarks/serving.py --repeats 3 --calls 200 --requests 400
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
def process(target: Callable[..., None], *args: object, health: str) -> Iterator[None]:
    """Run a server in a fresh process until `health` answers 200; stop it afterwards."""
    import httpx

    p = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    p.start()
    deadline = time.monotonic() + 180
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="Repeats of every measurement (>= 3: medians).")
    ap.add_argument("--calls", type=int, default=200, help="Router calls per variant and repeat.")
    ap.add_argument("--requests", type=int, default=400, help="Requests per concurrency, target and repeat.")
    ap.add_argument("--agreement-store", action="append", default=[], help="A store whose champion's decisions "
                    "in each variant are compared with float32 torch's on its test queries (repeatable).")
    ap.add_argument("--agreement-queries", type=int, default=1000, help="Test queries sampled per store.")
    ap.add_argument("--skip-gateway", action="store_true", help="Measure router latency and agreement only.")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args()

    import torch
    import transformers

    texts = queries()
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
    out = Path(args.out)
    if args.skip_gateway and out.exists():  # keep the last gateway measurement
        res["gateway_overhead"] = json.loads(out.read_text()).get("gateway_overhead")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    from summary import record

    variants = ("before", "after", "after_1_thread", "int8", "onnx", "onnx_int8")
    for name, r in res["router_decision_batch_1"].items():
        best = min(variants[1:], key=lambda k: r[k]["p50"])
        record(f"router decision p50, batch 1 ({name})", r[best]["p50"], "<= 10", "ms", r[best]["p50"] <= 10,
               {"variant": best} | {k: r[k]["p50"] for k in variants}
               | {"agreement": [a for a in res["agreement"] if a["encoder"] == r["encoder"]]})
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
