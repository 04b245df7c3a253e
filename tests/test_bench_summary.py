"""benchmarks/summary.py: entries recorded by benchmarks running at the same time are all kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from summary import record  # noqa: E402

# one benchmark process: 20 entries of its own, each a read-modify-write of the same file
WRITER = ("import sys\nfrom pathlib import Path\nsys.path.insert(0, sys.argv[1])\nfrom summary import record\n"
          "for i in range(20):\n"
          "    record(f'w{sys.argv[3]}-{i}', float(i), '>= 0', 'x', True, {}, path=Path(sys.argv[2]))\n")


def test_concurrent_records_lose_no_entry(tmp_path):
    path = tmp_path / "summary.json"
    record("w0-0", -1.0, ">= 0", "x", False, {}, path=path)  # replaced by the writer's entry of the same name
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(BENCH), str(path), str(w)]) for w in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    entries = json.loads(path.read_text())
    assert sorted(e["name"] for e in entries) == sorted(f"w{w}-{i}" for w in range(4) for i in range(20))
    assert {e["name"]: e["value"] for e in entries}["w0-0"] == 0.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".summary-")] == []  # no temp file left
