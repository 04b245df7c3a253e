"""benchmarks/summary.py: entries recorded by benchmarks running at the same time are all kept."""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from summary import record  # noqa: E402


def _record_many(path: str, worker: int) -> None:
    for i in range(20):
        record(f"w{worker}-{i}", float(i), ">= 0", "x", True, {"worker": worker}, path=Path(path))


def test_concurrent_records_lose_no_entry(tmp_path):
    path = tmp_path / "summary.json"
    record("w0-0", -1.0, ">= 0", "x", False, {}, path=path)  # replaced by the worker's entry of the same name
    procs = [mp.get_context("spawn").Process(target=_record_many, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = json.loads(path.read_text())
    assert sorted(e["name"] for e in entries) == sorted(f"w{w}-{i}" for w in range(4) for i in range(20))
    assert {e["name"]: e["value"] for e in entries}["w0-0"] == 0.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".summary-")] == []  # no temp file left
