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
def models() -> None:
    """List the models that ship inside installed packages (usable as `packaged:<name>`)."""
    from cluster.models import PACKAGED

    for p in PACKAGED.values():
        console.print(f"[bold]packaged:{p.name}[/bold]  ({p.licence})\n    {p.provenance}", soft_wrap=True)


if __name__ == "__main__":
    app()
