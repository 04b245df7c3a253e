"""Benchmark: what the label flow itself costs as queries grow (issue 14, point 1), on this machine, in one run.

The real label flow (`flows.label.label_flow`: preflight, ingest, the stage runner, leases, the store, the Polars
tail) runs with `backend: synthetic` experts and reward models (cluster/synthetic.py: answers and scores from a hash,
no model), so every second measured is orchestration. Each (store, size) cell of the grid is one fresh store and one
run, in its own process (so its peak RSS is that run's driver alone), at `--sizes` queries x `--experts` experts x
`--rms` reward models, `--shard-size` queries per shard, on a local store and on moto's S3 server on 127.0.0.1
(explicit endpoint and credentials, AWS_EC2_METADATA_DISABLED=true).

The router tail (tag, embed, aggregate, train_router, evaluate, publish) runs too, on a tiny random BERT encoder
(1 layer, hidden 32, built from a config; frozen, so embed runs once and the head trains 1 epoch): a real encoder
on 2 CPUs would make the tail, not orchestration, the curve. `label_s` is the label stages alone: from the first
generation job to the last score job (they overlap: the manifest's `jobs_from`/`jobs_until`); `total_s` is the
whole flow (Ray start included).

Store requests: on S3, every HTTP request moto answers, from every process (driver and actors), by method and top
folder; per cell written = all requests of the run / (generation + score cells written). On the local store, the
driver's own `Store` calls (schemas/store.py CALLS); the actors' calls are not counted there (per cell by
construction: generate reads its query shard and writes the cell, score also reads the generation cell).
Timing is only meaningful on an otherwise idle machine. Results: benchmarks/results/scale.json and the goal
entries in benchmarks/results/summary.json.

    make bench-scale
    python benchmarks/scale.py --sizes 1000,5000 --stores local
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["ZOOTER_ALLOW_SYNTHETIC"] = "1"  # the explicit opt-in: this is a benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
KEY, SECRET, BUCKET = "AKIAZOOTERBENCHKEY", "zooter-bench-secret-0001", "zooter-bench"
TAGS = ["math", "code", "writing", "trivia", "reasoning", "chat", "science", "history"]


# --- moto with a request counter ----------------------------------------------------------------------------
class CountingS3:
    """moto's S3 server on 127.0.0.1 (in a thread of this process), counting every request it answers."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no log line per request
        self.counts: collections.Counter[str] = collections.Counter()
        app = DomainDispatcherApplication(create_backend_app)

        def counted(environ, start_response):
            # "/bucket/runs-x/leases/..." -> the folder under the run's prefix
            parts = environ.get("PATH_INFO", "").strip("/").split("/")
            top = parts[2] if len(parts) > 2 else ("list" if "prefix=" in environ.get("QUERY_STRING", "") else "-")
            self.counts[f"{environ['REQUEST_METHOD']} {top}"] += 1
            return app(environ, start_response)

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.server = make_server("127.0.0.1", port, counted, threaded=True, request_handler=MotoRequestHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": KEY, "secret": SECRET}
        import boto3

        boto3.client("s3", endpoint_url=self.options["endpoint_url"], aws_access_key_id=KEY,
                     aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(Bucket=BUCKET)

    def take(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), collections.Counter()
        return out


# --- inputs ---------------------------------------------------------------------------------------------------
def tiny_encoder(root: Path) -> Path:
    """A random 1-layer BERT (hidden 32) with the packaged MiniLM tokenizer: the router's encoder here."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from cluster.packaged import PACKAGED

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(PACKAGED["all-minilm-l6-v2"].files()[0].parent)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)).save_pretrained(root / "enc")
    tok.save_pretrained(root / "enc")
    return root / "enc"


def write_config(work: Path, n: int, experts: int, rms: int, shard_size: int, store: dict, encoder: Path) -> Path:
    import yaml

    data = work / f"queries-{n}.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"id": f"q{i}", "text": f"Question {i}: what follows {i * 7919 % 10007}?",
                                            "tags": [TAGS[i % len(TAGS)], TAGS[i * 3 % len(TAGS)]]}) + "\n"
                                for i in range(n)))
    res = {"num_cpus": 0.25, "batch_size": 64}  # instant models: every pool's actor runs at once
    cfg = {"name": f"scale-{n}", "store": store,
           "data": {"path": str(data), "id_field": "id", "tags_field": "tags", "shard_size": shard_size},
           "experts": [{"name": f"e{i}", "model": "synthetic", "backend": "synthetic", "resources": res}
                       for i in range(experts)],
           "reward_models": [{"name": f"rm{i}", "kind": "classifier", "backend": "synthetic", "max_length": 64 + i,
                              "resources": res} for i in range(rms)],
           "router": {"encoder": str(encoder), "freeze_encoder": True, "epochs": 1, "batch_size": 256,
                      "max_length": 24},
           "ray": {"num_cpus": 4}}
    path = work / f"config-{n}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- one run (a child process) --------------------------------------------------------------------------------
def child(config: str) -> None:
    """Run the label flow once; print one JSON line: wall time, driver peak RSS, driver store calls, manifest."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.label import label_flow
    from schemas.store import CALLS

    with prefect_test_harness(server_startup_timeout=600):
        CALLS.clear()
        t0 = time.perf_counter()
        out = label_flow(config)
        wall = time.perf_counter() - t0
    m = out.manifest
    print(json.dumps({"wall_s": wall, "driver_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "driver_store_calls": dict(CALLS), "manifest": m.model_dump(mode="json")}))


def run_one(cfg: Path, timeout: float) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", str(cfg)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode:
        raise RuntimeError(f"run failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarise(n: int, store: str, got: dict, requests: dict[str, int] | None) -> dict:
    m = got["manifest"]
    gen = [s["seconds"] for s in m["generate"]]
    sco = [s["seconds"] for s in m["score"]]
    cells = sum(s["cells_computed"] for s in m["generate"] + m["score"])
    # the label stages overlap (scoring starts per cell as generation goes on): their span, first job to last
    jobs = [(dt.datetime.fromisoformat(s["jobs_from"]), dt.datetime.fromisoformat(s["jobs_until"]))
            for s in m["generate"] + m["score"] if s.get("jobs_from") and s.get("jobs_until")]
    label_s = ((max(u for _, u in jobs) - min(f for f, _ in jobs)).total_seconds() if jobs
               else max(gen) + max(sco))
    row = {"queries": n, "store": store, "shards": len(m["shards"]), "cells_written": cells,
           "total_s": round(got["wall_s"], 2), "label_s": round(label_s, 2),
           "overhead_ms_per_cell": round(1e3 * label_s / cells, 3),
           "driver_rss_mib": round(got["driver_rss_mib"], 1),
           "stage_s": {"generate": gen, "score": sco, "embed": (m["embed"] or {}).get("seconds"),
                       "tail_s": round(got["wall_s"] - label_s, 2)},
           "driver_store_calls": got["driver_store_calls"],
           "driver_store_calls_per_cell": round(sum(got["driver_store_calls"].values()) / cells, 2)}
    if requests is not None:
        row["s3_requests"] = requests
        row["s3_requests_per_cell"] = round(sum(requests.values()) / cells, 2)
    return row


def stage_requests(n: int, experts: int, rms: int, shard_size: int) -> dict:
    """S3 requests per cell of the real stage runner, store and leases (`run_stage`), its jobs run in-process
    (no Ray, no Prefect: the same store calls, a fraction of the start-up): generate for every expert, then score
    for every RM, on moto. What `--stage-requests` prints."""
    from functools import partial

    import polars as pl

    from cluster.stage import Stage, run_stage
    from cluster.synthetic import SyntheticGenerator, SyntheticScorer
    from schemas.artifacts import GENERATIONS, SCORES, generation_path, score_path
    from schemas.config import ExpertSpec, RewardSpec
    from schemas.leases import Leases
    from schemas.store import Store
    from tasks.generate import expert_fingerprint, generate_cell
    from tasks.ingest import write_shards
    from tasks.score import rm_fingerprint, score_cell

    s3 = CountingS3()
    store = Store(f"s3://{BUCKET}/stages-{n}", s3.options)
    q = pl.DataFrame({"query_id": [f"q{i}" for i in range(n)], "text": [f"Question {i}?" for i in range(n)],
                      "source_line": list(range(1, n + 1)), "input_tags": [[]] * n, "reference": [None] * n},
                     schema={"query_id": pl.String, "text": pl.String, "source_line": pl.Int64,
                             "input_tags": pl.List(pl.String), "reference": pl.String})
    shards = write_shards(store, q, shard_size).shards
    s3.take()
    specs = [ExpertSpec(name=f"e{i}", model="synthetic", backend="synthetic") for i in range(experts)]
    efps = {e.name: expert_fingerprint(e) for e in specs}
    t0, cells = time.perf_counter(), 0
    with Leases(store, "bench") as leases:
        for e in specs:
            fp = efps[e.name]
            job = partial(_in_process, generate_cell, SyntheticGenerator(e.name), spec=e, fp=fp, store=store)
            cells += len(run_stage(store, Stage(step="generate", name=e.name, fingerprint=fp, schema=GENERATIONS,
                                                keys=shards, path=partial(generation_path, e.name, fp), job=job),
                                   leases).computed)
        for i in range(rms):
            rm = RewardSpec(name=f"rm{i}", kind="classifier", backend="synthetic", max_length=64 + i)
            fp = rm_fingerprint(rm)
            job = partial(_in_process, score_cell, SyntheticScorer(str(i)), rm=rm, rm_fp=fp, expert_fps=efps,
                          store=store)
            cells += len(run_stage(store, Stage(
                step="score", name=rm.name, fingerprint=fp, schema=SCORES, keys=[(e, s) for e in efps for s in shards],
                path=lambda k, rm=rm, fp=fp: score_path(rm.name, fp, k[0], efps[k[0]], k[1]), job=job),
                leases).computed)
    req = s3.take()
    return {"queries": n, "cells_written": cells, "seconds": round(time.perf_counter() - t0, 1),
            "s3_requests": req, "s3_requests_per_cell": round(sum(req.values()) / cells, 2)}


def _in_process(cell_job, model, _none, key, **kw):  # the stage's job with its model bound (build=None)
    return cell_job(model, key, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="Query counts, comma-separated.")
    ap.add_argument("--stores", default="local,s3", help="local, s3 or both.")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rms", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=3600, help="Seconds one run may take.")
    ap.add_argument("--out", type=Path, default=RESULTS, help="Where the raw results go.")
    ap.add_argument("--summary", type=Path, default=None, help="Where the goal entries go (default "
                    "benchmarks/results/summary.json).")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--stage-requests", action="store_true", help="Only count S3 requests per cell of the stage "
                    "runner with in-process jobs (no Ray/Prefect start-up) at each size; print JSON lines.")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.stage_requests:
        for n in sizes:
            print(json.dumps(stage_requests(n, args.experts, args.rms, args.shard_size)), flush=True)
        return None
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="zooter-scale-") as tmp:
        work = Path(tmp)
        encoder = tiny_encoder(work)
        s3 = CountingS3() if "s3" in args.stores else None
        for store in args.stores.split(","):
            for n in sizes:
                url = {"url": str(work / f"store-{n}")} if store == "local" else {
                    "url": f"s3://{BUCKET}/run-{n}-{time.time_ns()}", "options": s3.options, "backoff_s": 0.2}
                cfg = write_config(work, n, args.experts, args.rms, args.shard_size, url, encoder)
                if s3:
                    s3.take()
                print(f"{store} {n} queries ...", file=sys.stderr, flush=True)
                got = run_one(cfg, args.timeout)
                row = summarise(n, store, got, s3.take() if store == "s3" else None)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("stage_s", "s3_requests")}),
                      file=sys.stderr, flush=True)
    write_results(rows, args)


def write_results(rows: list[dict], args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from summary import SUMMARY, record

    summary = args.summary or SUMMARY

    out = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
           "experts": args.experts, "reward_models": args.rms, "shard_size": args.shard_size,
           "encoder": "random BERT, 1 layer, hidden 32 (frozen; 1 epoch)", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for store in {r["store"] for r in rows}:
        by = {r["queries"]: r for r in rows if r["store"] == store}
        sizes = sorted(by)
        if len(sizes) >= 2:
            lo, hi = sizes[-2], sizes[-1]
            ratio = by[hi]["total_s"] / by[lo]["total_s"]
            goal = hi / lo * 1.1
            record(f"scale.{store}.wall_ratio_{hi}_{lo}", round(ratio, 2), f"<= {goal:g}", "x", ratio <= goal,
                   {"total_s": {q: by[q]["total_s"] for q in sizes}, "label_s": {q: by[q]["label_s"] for q in sizes},
                    "label_ratio": round(by[hi]["label_s"] / by[lo]["label_s"], 2)}, summary)
        top = by[sizes[-1]]
        rss = top["driver_rss_mib"]
        record(f"scale.{store}.driver_rss_{sizes[-1]}", rss, "<= 2048", "MiB", rss <= 2048 if sizes[-1] >= 100_000
               else None, {q: by[q]["driver_rss_mib"] for q in sizes}, summary)
        if store == "s3":
            per = top["s3_requests_per_cell"]
            record("scale.s3.requests_per_cell", per, "<= 5", "requests", per <= 5,
                   {q: by[q]["s3_requests_per_cell"] for q in sizes}, summary)


if __name__ == "__main__":
    main()
