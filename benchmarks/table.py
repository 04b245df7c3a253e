"""Print benchmarks/results/summary.json as a Markdown table (the README's benchmark table): `make bench-table`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from summary import SUMMARY  # benchmarks/ is this script's sys.path[0]


def markdown(entries: list[dict]) -> str:
    """One row per goal: name, measured value and unit, goal, met (yes / no / - where not decided)."""
    rows = ["| goal | measured | target | met |", "|---|---:|---|:---:|"]
    for e in entries:
        v = "-" if e["value"] is None else f"{e['value']:g} {e['unit']}".strip()
        met = {True: "yes", False: "**no**", None: "-"}[e["passed"]]
        rows.append(f"| {e['name']} | {v} | {e['goal']} {e['unit']} | {met} |")
    return "\n".join(rows)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else SUMMARY
    if not path.exists():
        sys.exit(f"{path.name}: no results yet (run `make bench`)")
    print(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
