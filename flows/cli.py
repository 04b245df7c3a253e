"""`zooter`: the command line. Validates at the edge, then hands over to the flows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from schemas.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Zooter: reward-guided routing to expert LLMs.")
# Wide enough for the evaluation table when output goes to a file or CI log (no terminal width to detect).
console = Console(width=None if sys.stdout.isatty() else 150)


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _preflight(config: Path):
    from tasks.preflight import preflight

    try:
        cfg = load_config(config)
        queries = preflight(cfg)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    return cfg, queries


def _cell(v: object) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def report_table(report: dict) -> Table:
    rows = report["rows"]
    keys = [k for k in rows[0] if k != "strategy"]
    t = Table(title=f"Evaluation on {report['test_queries']} held-out queries")
    t.add_column("strategy")
    for k in keys:
        t.add_column(k, justify="right")
    for r in rows:
        t.add_row(r["strategy"], *[_cell(r.get(k)) for k in keys])
    return t


@app.command()
def validate(config: Path) -> None:
    """Check a config and its query file without loading any model or touching the store."""
    cfg, queries = _preflight(config)
    console.print(f"ok: {len(cfg.experts)} experts, {len(cfg.reward_models)} reward models, "
                  f"{queries.height} queries, store {cfg.store.url}")


@app.command()
def run(config: Path, json_out: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Run the whole labeling DAG (ingest -> ... -> publish) as one Prefect flow."""
    _preflight(config)
    from flows.label import label_flow

    out = label_flow(str(config.resolve()))
    if json_out:
        sys.stdout.write(json.dumps(out, default=str) + "\n")
        return
    m = out["manifest"]
    console.print(report_table(out["report"]))
    share = ", ".join(f"{e} {p:.0%}" for e, p in out["report"]["router_share"].items())
    console.print(f"router sends: {share}")
    computed = sum(s["cells_computed"] for s in m["generate"] + m["score"])
    reused = sum(s["cells_reused"] for s in m["generate"] + m["score"])
    console.print(f"generation + scoring cells: {computed} computed, {reused} reused")
    console.print(f"run {m['run_id']} took {m['timings']['total_s']:.0f}s")
    console.print(f"manifest: {out['manifest_uri']}\nreport:   {out['report_uri']}")


@app.command()
def inspect(store: str = typer.Argument(help="Local directory or s3://bucket/prefix."),
            run_id: str = typer.Option(None, "--run", help="Show this run instead of the latest completed one."),
            json_out: bool = typer.Option(False, "--json", help="Print everything as JSON.")) -> None:
    """Runs, cell matrix, label summary and champion of a store (reads manifests and Parquet only)."""
    from schemas.store import Store
    from tasks.inspect import inspect_store

    try:
        info = inspect_store(Store(store), run_id)
    except ValueError as e:
        _fail(str(e))
    if json_out:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
        return
    t = Table("run", "status", "queries", "computed", "reused", "seconds", title=f"Runs in {store}")
    for r in info["runs"]:
        t.add_row(r["run_id"], r["status"][:40], str(r["queries"]), str(r["cells_computed"]),
                  str(r["cells_reused"]), "-" if r["seconds"] is None else f"{r['seconds']:.0f}")
    console.print(t)
    cells = info["cells"]
    t = Table("stage", "expert", *[str(s) for s in cells["shards"]], title=f"Cells of run {info['run']} (shard)")
    mark = lambda ok: "[green]done[/green]" if ok else "[red]missing[/red]"  # noqa: E731
    for e, done in cells["generations"].items():
        t.add_row("generate", e, *map(mark, done))
    for rm, per in cells["scores"].items():
        for e, done in per.items():
            t.add_row(f"score:{rm}", e, *map(mark, done))
    console.print(t)
    if "labels" in info:
        lab = info["labels"]
        t = Table("expert", "mean reward", "win rate", title=f"Labels ({lab['rows']} queries)")
        for r in lab["experts"]:
            t.add_row(r["expert"], _cell(r["mean_reward"]), _cell(r["win_rate"]))
        console.print(t)
        names = [r["expert"] for r in lab["experts"]]
        t = Table("tag", "n", *names, title="Mean target probability by tag")
        for r in lab["tag_target"]:
            t.add_row(r["tag"], str(r["n"]), *[_cell(r[e]) for e in names])
        console.print(t)
    if "champion" in info:
        c = info["champion"]
        console.print(f"champion: {c['router']} (run {c['run_id']}, router reward {_cell(c['reward'])}), "
                      f"evaluation {c['evaluation']}")


@app.command()
def models() -> None:
    """List the models that ship inside installed packages (usable as `packaged:<name>`)."""
    from cluster.models import PACKAGED

    for p in PACKAGED.values():
        console.print(f"[bold]packaged:{p.name}[/bold]  ({p.licence})\n    {p.provenance}", soft_wrap=True)


if __name__ == "__main__":
    app()
