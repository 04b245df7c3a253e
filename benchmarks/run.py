"""`make bench`: every benchmark, one after the other, each in its own process; then the goals table.

Each benchmark writes its figures to benchmarks/results/<name>.json and its goals to benchmarks/results/summary.json
(benchmarks/summary.py `record`); this script only runs them, goes on when one fails (and says so at the end, exit 1),
and prints summary.json as a Markdown table (benchmarks/table.py). Benchmarks another change has not added yet
(a script that does not exist) are skipped with a note.

    make bench                                  # all of them (tens of minutes on 2 cores)
    python benchmarks/run.py --only aggregation,relabel
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# name -> argument lists, one process each, in order
BENCHMARKS: dict[str, list[list[str]]] = {
    "generation": [["generation.py"]],             # backends and the actor pool, tokens/s
    "aggregation": [["aggregation.py"]],           # 10M score rows: Polars vs pandas, peak RSS
    "relabel": [["relabel.py"]],                   # add 1 expert to 3: relabel / full run
    "demo": [["demo.py"]],                         # the demo by stage
    "scale": [["scale.py"]],                       # orchestration cost at 1k/10k/100k queries (synthetic backend)
    "pipeline": [["pipeline.py", "run", "--label", "after"], ["pipeline.py", "summary"]],  # pool busy fraction
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help=f"Comma-separated subset of: {', '.join(BENCHMARKS)}.")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    failed, env = [], {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent),
                                                                               os.environ.get("PYTHONPATH")]))}
    for name in names:
        for argv in BENCHMARKS[name]:
            script = HERE / argv[0]
            if not script.exists():
                print(f"bench: {name}: {argv[0]} does not exist yet, skipped", file=sys.stderr)
                break
            print(f"bench: {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
            t = time.perf_counter()
            rc = subprocess.run([sys.executable, str(script), *argv[1:]], env=env).returncode
            print(f"bench: {name}: exit {rc} after {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
            if rc:
                failed.append(name)
                break
    subprocess.run([sys.executable, str(HERE / "table.py")], check=False)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
