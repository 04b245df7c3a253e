"""`zooter`: the command line. Validates at the edge, then hands over to the flows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from schemas.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Zooter: reward-guided routing to expert LLMs.")
# Wide enough for the evaluation table when output goes to a file or CI log (no terminal width to detect).
console = Console(width=None if sys.stdout.isatty() else 150)


def _fail(msg: str) -> None:
    # one line, printed verbatim: messages hold paths and lists in brackets, never Rich markup
    console.print(f"[red]error:[/red] {escape(' '.join(msg.splitlines()))}", highlight=False, soft_wrap=True)
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


def _print_outcome(out: dict, json_out: bool) -> None:
    """What `run`, `relabel` and `train` print: the flow's result as JSON, or the report, cells and paths."""
    if json_out:
        sys.stdout.write(json.dumps(out, default=str) + "\n")
        return
    m = out["manifest"]
    _print_report(out["report"])
    computed = sum(s["cells_computed"] for s in m["generate"] + m["score"])
    reused = sum(s["cells_reused"] for s in m["generate"] + m["score"])
    console.print(f"generation + scoring cells: {computed} computed, {reused} reused")
    console.print(f"run {m['run_id']} took {m['timings']['total_s']:.0f}s")
    _print_champion(m)
    console.print(f"manifest: {out['manifest_uri']}\nreport:   {out['report_uri']}")


@app.command()
def run(config: Path, json_out: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Run the whole labeling DAG (ingest -> ... -> publish) as one Prefect flow."""
    _preflight(config)
    from flows.label import label_flow

    out = label_flow(str(config.resolve()))
    _print_outcome(out, json_out)


@app.command()
def inspect(store: str = typer.Argument(help="Local directory or s3://bucket/prefix."),
            run_id: str = typer.Option(None, "--run", help="Show this run instead of the latest completed one."),
            json_out: bool = typer.Option(False, "--json", help="Print everything as JSON."),
            plot: Annotated[Path | None, typer.Option("--plot", help="Also write a PNG: tag x expert heatmap of "
                                                      "mean target probability and win-rate bars.")] = None) -> None:
    """Runs, cell matrix, label summary and champion of a store (reads manifests and Parquet only)."""
    from schemas.store import Store
    from tasks.inspect import inspect_store

    try:
        info = inspect_store(Store(store), run_id)
    except ValueError as e:
        _fail(str(e))
    if plot is not None:
        from tasks.plots import plot_labels

        if "labels" not in info:
            _fail(f"--plot: run {info['run']} has no labels to plot")
        plot_labels(info["labels"], plot, title=f"{store} (run {info['run']})")
        console.print(f"plot: {plot}")
    if json_out:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
        return
    t = Table("run", "status", "queries", "computed", "reused", "repaired", "flagged", "seconds",
              title=f"Runs in {store}")
    for r in info["runs"]:
        t.add_row(r["run_id"], r["status"][:40], str(r["queries"]), str(r["cells_computed"]),
                  str(r["cells_reused"]), str(r["cells_repaired"]), str(r["flagged"]),
                  "-" if r["seconds"] is None else f"{r['seconds']:.0f}")
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
    if cells["flags"]:
        t = Table("reward model", "expert", "empty_response", "nonfinite",
                  title="Flagged score rows (kept with a null score, see README)")
        for f in cells["flags"]:
            t.add_row(f["reward_model"], f["expert"], str(f.get("empty_response", 0)), str(f.get("nonfinite", 0)))
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


@app.command("import-scores")
def import_scores_cmd(
        source: Annotated[Path, typer.Argument(help="RouterDC folder, or a long table (.csv/.parquet/.jsonl).")],
        store: str = typer.Option(..., "--store", help="Local directory or s3://bucket/prefix."),
        fmt: str = typer.Option("long", "--format", help="routerdc | long (query, expert, score[, query_id, "
                                "tags|task, split])."),
        name: str = typer.Option("imported", "--name", help="Name of the import (the train config's `source`)."),
        shard_size: int = typer.Option(1000, "--shard-size", min=1)) -> None:
    """Import per-(query, expert) scores as queries + score cells, ready for `zooter train`."""
    from schemas.store import Store
    from tasks.import_scores import import_scores, read_scores

    try:
        rec = import_scores(Store(store), read_scores(fmt, source), name, shard_size)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    console.print(f"imported {rec.rows} scores: {rec.queries} queries x {len(rec.experts)} experts into "
                  f"{len(rec.shards)} shards of {store} (source {rec.name!r}, fingerprint {rec.rm_fingerprint})")


@app.command()
def train(config: Path, json_out: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """aggregate -> train_router -> evaluate -> publish over imported scores (a `zooter-train` Prefect flow)."""
    from schemas.config import TrainConfig
    from schemas.store import Store
    from tasks.import_scores import read_import

    try:
        cfg = load_config(config, model=TrainConfig)
        read_import(Store.from_config(cfg.store), cfg.source)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    from flows.train import train_flow

    _print_outcome(train_flow(str(config.resolve())), json_out)


def _print_report(report: dict) -> None:
    console.print(report_table(report))
    pt = report.get("per_tag") or {}
    if pt.get("tags"):
        cols = pt["tags"] + ["tag_average"]
        t = Table("strategy", *cols, title="Mean reward per tag (test)")
        for k, v in pt["strategies"].items():
            t.add_row(k, *[_cell(v[c]) for c in cols])
        console.print(t)
    share = ", ".join(f"{e} {p:.0%}" for e, p in report["router_share"].items())
    console.print(f"router sends: {share}")


@app.command()
def evaluate(store: str = typer.Option(..., "--store", help="Local directory or s3://bucket/prefix."),
             json_out: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Show the champion router's evaluation report (written by the flows' evaluate step: JSON, Markdown, PNG)."""
    from schemas.artifacts import CHAMPION_PATH
    from schemas.store import Store

    s = Store(store)
    if not s.exists(CHAMPION_PATH):
        _fail(f"{s.uri(CHAMPION_PATH)}: no champion router; run `zooter run` or `zooter train` first")
    ev = s.read_json(CHAMPION_PATH)["evaluation"]
    report = s.read_json(f"{ev}/report.json")
    if json_out:
        sys.stdout.write(json.dumps(report, default=str) + "\n")
        return
    _print_report(report)
    console.print(f"report: {s.uri(ev + '/report.md')}\nchart:  {s.uri(ev + '/report.png')}")


@app.command()
def route(input_path: Annotated[Path, typer.Option("--input", help="Queries: .jsonl, .parquet or .csv.")],
          output: Annotated[Path, typer.Option("--output", help="Output: .jsonl, .parquet or .csv.")],
          store: str = typer.Option(..., "--store", help="Store whose champion router routes."),
          text_field: str = typer.Option("text", "--text-field", help="Field holding the query text."),
          batch_size: int = typer.Option(256, "--batch-size", min=1)) -> None:
    """Route every query to an expert with the champion router; adds `expert` and `probs` to each record."""
    from schemas.store import Store
    from tasks.route import champion, route_file

    try:
        n = route_file(champion(Store(store)), input_path, text_field, output, batch_size)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    console.print(f"routed {n} queries -> {output}")


def _print_champion(m: dict) -> None:
    c = m.get("champion")
    if c:
        console.print(f"champion/challenger: {c['decision']} ({c['reason']}; challenger {_cell(c['challenger_reward'])}"
                      f", champion {_cell(c['champion_reward'])})")


@app.command()
def relabel(config: Path, json_out: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """After an expert pool change: compute only missing cells, re-aggregate, retrain, evaluate, and promote
    the new router only if it is not worse than the champion."""
    _preflight(config)
    from flows.relabel import relabel_flow

    out = relabel_flow(str(config.resolve()))
    _print_outcome(out, json_out)


experts_app = typer.Typer(no_args_is_help=True, help="Edit a config's expert pool; emits zooter.experts.changed.")
app.add_typer(experts_app, name="experts")


def _announce(config: Path, action: str, name: str) -> None:
    from tasks.experts import EVENT, emit_pool_changed

    why = emit_pool_changed(config, action, name)
    if why is None:
        console.print(f"emitted {EVENT}")
    else:  # the config is already written; the event is a convenience for a served relabel deployment
        console.print(f"[yellow]warning:[/yellow] {EVENT} not emitted: {why}", soft_wrap=True)


@experts_app.command("list")
def experts_list(config: Path) -> None:
    """Print the experts of a config."""
    from tasks.experts import list_experts

    try:
        experts = list_experts(config)
    except ConfigError as e:
        _fail(str(e))
    t = Table("name", "model", "backend", "dtype", "prompt", title=f"Experts in {config}")
    for e in experts:
        t.add_row(e.get("name"), str(e.get("model")), e.get("backend", "hf"), e.get("dtype", "bfloat16"),
                  e.get("prompt", "chat"))
    console.print(t)


@experts_app.command("add")
def experts_add(
    config: Path,
    name: str = typer.Option(..., "--name", help="Unique expert name."),
    model: str = typer.Option(..., "--model", help="`packaged:<name>` or a local HF directory."),
    backend: str = typer.Option(None, "--backend", help="hf or vllm (default hf)."),
    dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default bfloat16)."),
    prompt: str = typer.Option(None, "--prompt", help="chat, a template in tasks/prompts/, or a file."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Sampling: upper bound on new tokens."),
    num_cpus: float = typer.Option(None, "--num-cpus", help="CPUs per actor."),
    num_gpus: float = typer.Option(None, "--num-gpus", help="GPUs per actor."),
    pool_size: int = typer.Option(None, "--pool-size", help="Actors in the pool."),
) -> None:
    """Add an expert to the config (validated, written atomically), then emit zooter.experts.changed."""
    from tasks.experts import add_expert

    spec: dict = {"name": name, "model": model}
    spec.update({k: v for k, v in (("backend", backend), ("dtype", dtype), ("prompt", prompt)) if v is not None})
    if max_new_tokens is not None:
        spec["sampling"] = {"max_new_tokens": max_new_tokens}
    res = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("pool_size", pool_size))
           if v is not None}
    if res:
        spec["resources"] = res
    try:
        add_expert(config, spec)
    except ConfigError as e:
        _fail(str(e))
    console.print(f"added expert {name} to {config}")
    _announce(config, "add", name)


@experts_app.command("remove")
def experts_remove(config: Path, name: str = typer.Option(..., "--name", help="Expert to remove.")) -> None:
    """Remove an expert from the config (its cells stay in the store), then emit zooter.experts.changed."""
    from tasks.experts import remove_expert

    try:
        remove_expert(config, name)
    except ConfigError as e:
        _fail(str(e))
    console.print(f"removed expert {name} from {config}")
    _announce(config, "remove", name)


@app.command()
def serve(config: Path,
          cron: str = typer.Option("0 3 * * *", "--cron", help="Relabel schedule (cron, server time zone)."),
          limit: int = typer.Option(None, "--limit", help="At most this many concurrent flow runs.")) -> None:
    """Serve the label and relabel deployments from this process (no work pool needed). The relabel one runs
    on the cron schedule and on every zooter.experts.changed event for this config's store."""
    cfg, _ = _preflight(config)
    from flows.deploy import serve_deployments

    console.print(f"serving zooter-label/label and zooter-relabel/relabel for {config} (store {cfg.store.url})")
    serve_deployments(str(config.resolve()), cron, limit)


@app.command()
def models() -> None:
    """List the models that ship inside installed packages (usable as `packaged:<name>`)."""
    from cluster.models import PACKAGED

    for p in PACKAGED.values():
        console.print(f"[bold]packaged:{p.name}[/bold]  ({p.licence})\n    {p.provenance}", soft_wrap=True)


if __name__ == "__main__":
    app()
