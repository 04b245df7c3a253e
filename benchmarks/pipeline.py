"""Pipelined vs staged label flow: wall time and how busy the actor pools are (issue 14, point 2).

Runs the label flow in-process on the demo config (examples/quickstart.yaml, `data.limit` queries, a fresh temporary
store: every cell computed) and traces every actor pool from outside (`cluster.stage.run_pool` wrapped): each job's
[start, end] (end when the pool yields it, start = end - the job's own seconds), each pool's lifetime, its CPUs.
The same trace works on the code before and after the change, so both sides are measured the same way:

    python benchmarks/pipeline.py run --label before --code /tmp/old-checkout   # the staged flow (git archive of it)
    python benchmarks/pipeline.py run --label after                             # this checkout
    python benchmarks/pipeline.py summary                                       # ratio -> results/summary.json

Figures: `wall_s` (the flow call, Prefect's temporary server start included), `model_phase_s` (first job start to
last job end over all pools), per pool `busy` = job seconds / (actors x pool lifetime), `cpu_busy` = CPU-seconds
in jobs / (cluster CPUs x model phase), and `score_started_before_generation_ended`. One run per side (a side takes
minutes on 2 shared cores); the before/after runs go on the same machine one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pipeline.json"


def _pool_name(job: Any) -> str:
    """'generate_cell:smollm2', 'score_cell:judge', 'embed_cell:<encoder>' from the stage's job partial."""
    kw = getattr(job, "keywords", {})
    owner = kw.get("spec") or kw.get("rm")
    name = owner.name if owner is not None else kw.get("encoder", "?")
    return f"{getattr(job, 'func', job).__name__}:{name}"


def traced_run(config: Path, limit: int, cpus: int) -> dict[str, Any]:
    """Run the label flow once on a fresh store; return the trace and the manifest's figures."""
    import yaml

    import cluster.stage
    from flows.label import label_flow

    pools: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    run_pool = cluster.stage.run_pool

    def traced(build, job, keys, res, *args, **kw):
        pool = {"pool": _pool_name(job), "num_cpus": res.num_cpus, "actors": min(res.pool_size, len(keys)),
                "start": time.perf_counter() - t0, "jobs": []}
        pools.append(pool)
        try:
            for key, out in run_pool(build, job, keys, res, *args, **kw):
                end = time.perf_counter() - t0
                pool["jobs"].append([round(end - out["seconds"], 3), round(end, 3)])
                yield key, out
        finally:
            pool["end"] = time.perf_counter() - t0

    cluster.stage.run_pool = traced
    cfg = yaml.safe_load(config.read_text())
    with tempfile.TemporaryDirectory(prefix="zooter-pipeline-") as tmp:
        cfg["store"] = str(Path(tmp) / "store")
        cfg["data"]["path"] = str((config.parent / cfg["data"]["path"]).resolve())
        cfg["data"]["limit"] = limit
        cfg.setdefault("ray", {})["num_cpus"] = cpus
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = label_flow(str(path))
    wall = time.perf_counter() - t0
    m = out.manifest
    return {"wall_s": round(wall, 2), "flow_total_s": m.timings.get("total_s"), "pools": pools,
            "stages": {f"{kind}:{r.name}": r.seconds for kind, recs in (("generate", m.generate), ("score", m.score))
                       for r in recs}}


def figures(trace: dict[str, Any], cpus: int) -> dict[str, Any]:
    """Busy fractions and phase times from a trace."""
    jobs = [(p, s, e) for p in trace["pools"] for s, e in p["jobs"]]
    first, last = min(s for _, s, _ in jobs), max(e for _, _, e in jobs)
    busy = {}
    for p in trace["pools"]:
        life = p["end"] - p["start"]
        work = sum(e - s for s, e in p["jobs"])
        busy[p["pool"]] = round(work / (max(p["actors"], 1) * life), 3) if life > 0 else None
    gen_end = max((e for p, _, e in jobs if p["pool"].startswith("generate")), default=None)
    score_start = min((s for p, s, _ in jobs if p["pool"].startswith("score")), default=None)
    cpu_work = sum((e - s) * p["num_cpus"] for p, s, e in jobs)
    return {"model_phase_s": round(last - first, 2), "busy": busy,
            "cpu_busy": round(cpu_work / (cpus * (last - first)), 3),
            "score_started_before_generation_ended": None if gen_end is None or score_start is None
            else score_start < gen_end}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="one traced label flow run")
    run.add_argument("--label", required=True, help="'before' or 'after'")
    run.add_argument("--code", type=Path, help="checkout whose code runs (default: this one)")
    run.add_argument("--config", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    run.add_argument("--limit", type=int, default=16, help="queries (data.limit)")
    run.add_argument("--cpus", type=int, default=2, help="embedded Ray's CPUs (ray.num_cpus)")
    sub.add_parser("summary", help="the after/before ratio into results/summary.json")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.cmd == "run":
        if args.code:  # the driver and (via PYTHONPATH, inherited by Ray's workers) the actors import that code
            sys.path.insert(0, str(args.code.resolve()))
            os.environ["PYTHONPATH"] = str(args.code.resolve())
        trace = traced_run(args.config.resolve(), args.limit, args.cpus)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}  # the other side may have run meanwhile
        cfg = args.config.resolve()
        results[args.label] = {"config": cfg.relative_to(ROOT).as_posix() if cfg.is_relative_to(ROOT) else cfg.name,
                               "limit": args.limit,
                               "cpus": args.cpus, **{k: v for k, v in trace.items() if k != "pools"},
                               **figures(trace, args.cpus), "pools": trace["pools"]}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in results[args.label].items() if k != "pools"}, indent=2))
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.summary import record

    before, after = results["before"], results["after"]
    ratio = round(after["wall_s"] / before["wall_s"], 3)
    results["after_over_before_wall"] = ratio
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    keep = ("wall_s", "model_phase_s", "cpu_busy", "busy", "score_started_before_generation_ended", "limit")
    print(record("pipeline: label flow wall time, pipelined / staged", ratio, "< 1", "ratio", ratio < 1,
                 {side: {k: results[side][k] for k in keep} for side in ("before", "after")}))


if __name__ == "__main__":
    main()
