"""One place for benchmark results: every benchmark records its goals in benchmarks/results/summary.json.

Each entry is `{"name", "value", "goal", "unit", "passed", "raw"}`: `goal` says the target in words (e.g. "<= 11"),
`raw` holds the figures the value was computed from. Entries are merged by name, so benchmarks can run separately
and `make bench` ends with all of them. No machine-specific paths go in.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SUMMARY = Path(__file__).parent / "results" / "summary.json"


def record(name: str, value: float | None, goal: str, unit: str, passed: bool | None, raw: dict[str, Any],
           path: Path = SUMMARY) -> dict[str, Any]:
    """Add or replace the entry `name`. Atomic (a reader sees the old or the new file) and serialised: the
    read-modify-write holds an exclusive lock on a sibling lock file, so two benchmarks finishing at once both
    keep their entries."""
    entry = {"name": name, "value": value, "goal": goal, "unit": unit, "passed": passed, "raw": raw}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        entries = json.loads(path.read_text()) if path.exists() else []
        entries = [e for e in entries if e["name"] != name] + [entry]
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".summary-")
        with os.fdopen(fd, "w") as f:
            json.dump(sorted(entries, key=lambda e: e["name"]), f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return entry
