"""`zooter`: the command line. Validates at the edge, then hands over to the flows and steps.

Every command is registered through `command` (flows/console.py), which owns the rules a script relies on: results
on stdout, everything else on stderr; `--json` prints exactly one JSON document; exit codes 0 ok, 1 a bug, 2 bad
input, 3 store unavailable. What a person sees is drawn by flows/report.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from flows import console
from flows.console import Result, messages
from flows.report import _show_inspect, _show_outcome, _show_report, show_table, stage_table
from schemas.config import ConfigError, Dtype, ExpertBackend, load_config

if TYPE_CHECKING:
    from schemas.manifest import Outcome

HELP = """Zooter: reward-guided routing to expert LLMs.

Results go to stdout; logs, progress bars, warnings, Ray actors' output and errors go to stderr. With --json,
stdout is exactly one JSON document, also on failure: {"error": {"message", "type", "exit_code"}}.

Exit codes: 0 ok; 1 internal error (a bug: the traceback is printed); 2 bad input (config, data, arguments,
artifacts: one `error:` line); 3 store unavailable (the store's endpoint did not answer within its retries)."""

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, pretty_exceptions_show_locals=False,
                  rich_markup_mode="markdown")
experts_app = typer.Typer(no_args_is_help=True, help="Edit a config's expert pool; emits zooter.experts.changed.",
                          pretty_exceptions_show_locals=False, rich_markup_mode="markdown")
app.add_typer(experts_app, name="experts")

STORE_HELP = "Local directory or s3://bucket/prefix."
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")]
StoreOpt = Annotated[str, typer.Option("--store", help=STORE_HELP)]
ConfigArg = Annotated[Path, typer.Argument(help="YAML config (e.g. examples/quickstart.yaml; every key is described "
                                           "in schemas/config.py).", show_default=False)]
_STARTED = time.perf_counter()  # when the CLI was imported: `run`'s stage table counts startup from here


def command(on: typer.Typer = app, name: str | None = None) -> Callable[[Callable[..., Result | None]], Any]:
    """Register a command on `zooter` (or a sub-app) under the rules of flows/console.py."""
    return console.command(on, name)


def _outcome(out: Outcome) -> Result:
    return Result(out, lambda c: _show_outcome(c, out))


def main() -> None:
    """The `zooter` console script (and `python -m flows.cli`)."""
    console.OWNS_PROCESS = True
    app()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"zooter-flow {version('zooter-flow')}")
        raise typer.Exit()


@app.callback()
def _root(show_version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    pass


# --- commands -------------------------------------------------------------------------------------------------

def _preflight(config: Path):
    from tasks.preflight import preflight

    cfg = load_config(config)
    return cfg, preflight(cfg)


@command()
def validate(config: ConfigArg, json_out: JsonOpt = False) -> Result:
    """Check a config, its query file, the model sources and the store's existing query shards, without loading
    any model. Reads the store, never writes it."""
    cfg, queries = _preflight(config)
    data = {"config": str(config), "experts": [e.name for e in cfg.experts],
            "reward_models": [r.name for r in cfg.reward_models], "queries": queries.height, "store": cfg.store.url}
    return Result(data, lambda c: c.print(f"ok: {len(cfg.experts)} experts, {len(cfg.reward_models)} reward models, "
                                          f"{queries.height} queries, store {cfg.store.url}"))


@command()
def run(config: ConfigArg, json_out: JsonOpt = False) -> Result:
    """Run the whole labeling DAG (ingest -> ... -> publish) as one Prefect flow."""
    from flows.label import label_flow
    from tasks.plan import plan_run

    plan = plan_run(config, "label")  # bad input fails here, before Prefect and Ray start; the flow takes the plan
    out = label_flow(str(config.resolve()), plan)
    table = stage_table(out.manifest, time.perf_counter() - _STARTED)
    if json_out:  # stdout holds the JSON document only; the table goes to stderr all the same
        messages.print(table)
        return _outcome(out)

    def show(c: Console) -> None:
        _show_outcome(c, out)
        c.print(f"reward: mean combined reward of the answers a strategy picks on the {out.report.test_queries} "
                "held-out queries (higher is better);\n        the oracle picks each query's best expert in hindsight "
                "(an upper bound)")
        messages.print(table)  # after the results, then what to do next with this run's store
        url = plan.config.store.url
        if "://" not in url and Path(url).is_relative_to(Path.cwd()):
            url = str(Path(url).relative_to(Path.cwd()))
        c.print(f"next:\n  zooter inspect --store {url}\n  zooter gateway --store {url} --local-experts\n"
                f"  zooter export --store {url} --output labels.parquet", soft_wrap=True)
    return Result(out, show)


@command()
def relabel(config: ConfigArg,
            traffic: Annotated[bool, typer.Option("--traffic", help="First add the queries the recording gateway "
                                                  "kept (`zooter gateway --record`) that no shard holds yet.")]
            = False,
            since: Annotated[datetime | None, typer.Option("--since", show_default=False, help="--traffic: only "
                                                           "queries routed at or after this UTC time "
                                                           "(YYYY-MM-DD[THH:MM:SS]).")] = None,
            max_queries: Annotated[int | None, typer.Option("--max", min=1, show_default=False, help="--traffic: "
                                                            "at most this many new queries, first routed "
                                                            "first.")] = None,
            json_out: JsonOpt = False) -> Result:
    """After an expert pool change, or with served traffic (--traffic): compute only missing cells, re-aggregate,
    retrain, evaluate, and promote the new router only if it is not worse than the champion."""
    from flows.relabel import relabel_flow
    from tasks.plan import plan_run

    if not traffic and (since is not None or max_queries is not None):
        raise ConfigError("relabel: --since and --max select recorded traffic; give them with --traffic")
    plan = plan_run(config, "relabel")
    return _outcome(relabel_flow(str(config.resolve()), plan, traffic, since, max_queries))


@command()
def train(config: ConfigArg, json_out: JsonOpt = False) -> Result:
    """aggregate -> train_router -> evaluate -> publish over imported scores (a `zooter-train` Prefect flow)."""
    from flows.train import train_flow
    from tasks.plan import plan_train

    plan = plan_train(config)  # fails before the flow starts
    return _outcome(train_flow(str(config.resolve()), plan))


@command()
def inspect(store_arg: Annotated[str | None, typer.Argument(metavar="[STORE]", show_default=False,
                                                            help="The store, as --store (kept for scripts).")] = None,
            store: Annotated[str | None, typer.Option("--store", help=STORE_HELP, show_default=False)] = None,
            run_id: Annotated[str | None, typer.Option("--run", help="Show this run instead of the latest "
                                                       "completed one.")] = None,
            plot: Annotated[Path | None, typer.Option("--plot", help="Also write a PNG: tag x expert heatmap of "
                                                      "mean target probability and win-rate bars.")] = None,
            overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --plot file.")] = False,
            json_out: JsonOpt = False) -> Result:
    """Runs, cell matrix, label summary and champion of a store (reads manifests and Parquet only)."""
    from schemas.store import Store
    from tasks.inspect import inspect_store
    from tasks.outputs import local_root

    if store and store_arg and store != store_arg:
        raise ConfigError(f"two stores given: {store_arg} and --store {store}")
    url = store or store_arg
    if not url:
        raise ConfigError("no store given: zooter inspect --store STORE")
    the_store = Store(url)
    if plot is not None:  # the output is checked before the store is read (as route and export check theirs)
        from tasks.plots import check_plot

        check_plot(plot, local_root(the_store), overwrite)
    info = inspect_store(the_store, run_id)
    if plot is not None:
        from tasks.plots import plot_labels

        if "labels" not in info:
            raise ConfigError(f"--plot: run {info['run']} has no labels to plot")
        plot_labels(info["labels"], plot, title=f"{url} (run {info['run']})")
        info["plot"] = str(plot)
    return Result(info, lambda c: _show_inspect(c, info, url))


@command(name="import-scores")
def import_scores_cmd(
        source: Annotated[Path, typer.Argument(help="RouterDC folder, or a long table (.csv/.parquet/.jsonl).")],
        store: StoreOpt,
        fmt: Annotated[Literal["routerdc", "long"], typer.Option(
            "--format", help="routerdc: a folder of RouterDC tables; long: a table with query, expert, score[, "
            "query_id, tags|task, split].")] = "long",
        name: Annotated[str, typer.Option("--name", help="Name of the import (the train config's `source`).")]
        = "imported",
        shard_size: Annotated[int, typer.Option("--shard-size", min=1, max=1_000_000, help="Queries per shard.")]
        = 1000,
        json_out: JsonOpt = False) -> Result:
    """Import per-(query, expert) scores as queries + score cells, ready for `zooter train`."""
    from schemas.store import Store
    from tasks.import_scores import check_import_name, import_scores, read_scores

    check_import_name(name)  # every argument before the first read or write
    target = Store(store)
    target.check_writable()
    rec = import_scores(target, read_scores(fmt, source), name, shard_size)
    return Result(rec.to_json(), lambda c: c.print(
        f"imported {rec.rows} scores: {rec.queries} queries x {len(rec.experts)} experts into {len(rec.shards)} "
        f"shards of {store} (source {rec.name!r}, fingerprint {rec.rm_fingerprint})"))


@command()
def evaluate(store: StoreOpt, json_out: JsonOpt = False) -> Result:
    """Show the champion router's evaluation report (written by the flows' evaluate step: JSON, Markdown, PNG)."""
    from schemas.artifacts import CHAMPION_PATH, report_path
    from schemas.errors import ArtifactError
    from schemas.evaluation import read_champion, read_report
    from schemas.store import Store

    s = Store(store)
    champ = read_champion(s)
    if champ is None:
        raise ArtifactError(f"{s.uri(CHAMPION_PATH)}: no champion router; run `zooter run` or `zooter train` first")
    report = read_report(s, champ.evaluation)

    def show(c: Console) -> None:
        _show_report(c, report)
        c.print(f"report: {s.uri(report_path(report.evaluation, 'md'))}\n"
                f"chart:  {s.uri(report_path(report.evaluation, 'png'))}", soft_wrap=True)
    return Result(report, show)


@command()
def route(input_path: Annotated[Path, typer.Option("--input", help="Queries: .jsonl, .parquet or .csv.")],
          output: Annotated[Path, typer.Option("--output", help="Output: .jsonl, .parquet or .csv.")],
          store: Annotated[str, typer.Option("--store", help="Store whose champion router routes.")],
          text_field: Annotated[str, typer.Option("--text-field", help="Field holding the query text.")] = "text",
          batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Queries per router call.")] = 256,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace `expert`/`probs` fields the input "
                                                  "already has (default: an error).")] = False,
          lam: Annotated[float | None, typer.Option(
              "--lambda", min=0, show_default=False, help="Cost-aware routing: argmax of p - lambda * cost / max "
              "cost (default: the config's `routing.lambda`, as the champion's evaluation recorded it).")] = None,
          fallback_below: Annotated[float | None, typer.Option(
              "--fallback-below", min=0, max=1, show_default=False, help="Queries whose top router probability is "
              "below this go to the best single expert (default: the config's `routing.fallback_below`, as the "
              "champion's evaluation recorded it; 0 = off).")] = None,
          json_out: JsonOpt = False) -> Result:
    """Route every query to an expert with the champion router; adds `expert` and `probs` to each record, keeps
    every field of every record as written."""
    from schemas.store import Store
    from tasks.route import RoutingPolicy, route_file

    policy = RoutingPolicy.load(Store(store), lam, fallback_below)  # champion.json read once
    # the champion's router (torch, transformers) loads only once the files have passed their checks
    n = route_file(policy, input_path, text_field, output, batch_size, overwrite=overwrite)
    return Result({"routed": n, "input": str(input_path), "output": str(output)},
                  lambda c: c.print(f"routed {n} queries -> {output}"))


@command()
def calibrate(store: StoreOpt,
              max_share: Annotated[list[str] | None, typer.Option(
                  "--max-share", show_default=False, help="EXPERT=FRACTION: the largest share of queries that "
                  "expert may get (repeatable).")] = None,
              budget: Annotated[float | None, typer.Option("--budget", min=0, show_default=False,
                                                           help="The largest mean cost per query.")] = None,
              fallback_share: Annotated[float | None, typer.Option(
                  "--fallback-share", min=0, max=1, show_default=False, help="Instead: the `routing.fallback_below` "
                  "at which this share of the validation queries would go to the best single expert.")] = None,
              json_out: JsonOpt = False) -> Result:
    """Find the routing lambda (bisection) that meets --max-share and/or --budget on the champion's validation
    queries; prints lambda and the shares, mean cost and reward it gives. Use it as `routing.lambda`, `zooter
    route --lambda` or the gateway's `zooter:lambda=<x>`."""
    from schemas.store import Store
    from tasks.calibrate import run_calibrate, run_fallback_threshold
    from tasks.route import RoutingPolicy

    if fallback_share is not None and (max_share or budget is not None):
        raise ConfigError("calibrate: --fallback-share is a separate question; give it without --max-share and "
                          "--budget")
    policy = RoutingPolicy.load(Store(store))
    if fallback_share is not None:
        below = run_fallback_threshold(policy, fallback_share)
        return Result({"fallback_below": below, "share": fallback_share},
                      lambda c: c.print(f"routing.fallback_below = {below:.6g} ({fallback_share:.0%} of the "
                                        "champion's validation queries fall back to the best single expert)"))
    cal = run_calibrate(policy, max_share or [], budget)

    def show(c: Console) -> None:
        c.print(f"lambda = {cal.lam:.6g} (router {cal.router}, {cal.queries} validation queries)")
        t = Table("lambda", "mean cost", "reward", *cal.point.share, title="Routing on the validation queries")
        for p in (cal.baseline, cal.point):
            t.add_row(f"{p.lam:.6g}", f"{p.cost:.4g}", f"{p.reward:.4f}", *[f"{s:.0%}" for s in p.share.values()])
        show_table(c, t)
    return Result(cal, show)


@command()
def export(store: StoreOpt,
           output: Annotated[Path, typer.Option("--output", help="A .parquet or .jsonl file, or a folder (hf: the "
                                                "dataset folder; parquet/jsonl: gets `labels-<fp>.<format>`).")],
           fmt: Annotated[Literal["parquet", "jsonl", "hf"] | None, typer.Option(
               "--format", show_default=False, help="parquet, jsonl or hf (a Hugging Face dataset folder: one "
               "Parquet file per split and a README.md card). Default: the output's suffix, else parquet.")] = None,
           labels: Annotated[str | None, typer.Option("--labels", help="Labels fingerprint (default: the latest "
                                                      "completed run's labels, else the champion's).")] = None,
           overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file (or an "
                                                   "earlier hf export in the folder).")] = False,
           json_out: JsonOpt = False) -> Result:
    """Write the labeled data as one tidy table: `query_id`, `text`, `tags`, `split`, then per expert (router
    output order) `response:<expert>`, `score:<rm>:<expert>`, `soft:<expert>`, `target:<expert>`,
    `reward:<expert>`."""
    from schemas.store import Store
    from tasks.export import export as export_labels

    out = export_labels(Store(store), output, fmt, labels, overwrite=overwrite)
    return Result(out, lambda c: c.print(f"exported {out.rows} queries x {len(out.experts)} experts (labels "
                                         f"{out.labels}, run {out.run_id}) -> {out.path}"))


@command()
def models(json_out: JsonOpt = False) -> Result:
    """List the models that ship inside installed packages (usable as `packaged:<name>`)."""
    from cluster.packaged import PACKAGED

    rows = [{"name": f"packaged:{p.name}", "licence": p.licence, "provenance": p.provenance}
            for p in PACKAGED.values()]

    def show(c: Console) -> None:
        for r in rows:
            c.print(f"[bold]{r['name']}[/bold]  ({r['licence']})\n    {r['provenance']}", soft_wrap=True)
    return Result(rows, show)


@command()
def serve(config: ConfigArg,
          cron: Annotated[str, typer.Option("--cron", help="Relabel schedule: a cron expression in UTC.")]
          = "0 3 * * *",
          limit: Annotated[int | None, typer.Option("--limit", help="At most this many concurrent flow runs.")]
          = None) -> None:
    """Serve the label and relabel deployments from this process (no work pool needed). The relabel one runs
    on the cron schedule (UTC) and on every zooter.experts.changed event for this config's store."""
    cfg, _ = _preflight(config)
    from flows.deploy import serve_deployments

    messages.print(f"serving zooter-label/label and zooter-relabel/relabel for {config} (store {cfg.store.url})")
    serve_deployments(str(config.resolve()), cron, limit)


@command()
def gateway(store: Annotated[str, typer.Option("--store", help="Store whose champion router routes (reloaded when "
                                               "a new one is promoted).")],
            host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
            port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
            experts: Annotated[Path | None, typer.Option("--experts", show_default=False, help="YAML: expert name "
                                                         "-> {base_url, model, api_key_env?, cost?}. Default: the "
                                                         "store's published config's `backend: openai` experts.")]
            = None,
            api_key_env: Annotated[str | None, typer.Option("--api-key-env", show_default=False, help="Require "
                                                            "`Authorization: Bearer <key>`, the key read from this "
                                                            "environment variable.")] = None,
            timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds an expert may take to "
                                                   "connect or send its next bytes (then 504).")] = 300.0,
            local_experts: Annotated[bool, typer.Option("--local-experts", help="Answer experts that have no "
                                                        "endpoint in this process, from their weights (the store's "
                                                        "published config, else its latest run's).")] = False,
            max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", min=1024, help="Largest request body "
                                                        "(bytes); larger is a 413.")] = 1 << 20,
            body_timeout: Annotated[float, typer.Option("--body-timeout", min=0.1, help="Seconds a client may take "
                                                        "to send a request body (then 408).")] = 30.0,
            max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests that may wait for a "
                                                   "router; more are a 429.")] = 256,
            quantize: Annotated[Literal["int8"] | None, typer.Option(
                "--quantize", show_default=False, help="Run the routers' encoders as dynamically quantised int8 "
                "(CPU): faster decisions, a few of which differ from the trained router's (README, Serving).")]
            = None,
            runtime: Annotated[Literal["auto", "torch", "onnx"], typer.Option(
                "--runtime", help="Run the routers' encoders in PyTorch or in ONNX Runtime (CPU; exported once into "
                "the model cache; float32 gives the same decisions, faster; with --quantize int8 the fastest); "
                "auto: ONNX Runtime on CPU where its probabilities match torch's at load, else torch.")]
            = "auto",
            record: Annotated[bool, typer.Option("--record", help="Keep every routed request (query text, request "
                                                 "id, router, expert, probabilities, time; never headers or keys) "
                                                 "and its feedback (POST /v1/feedback) in the store's traffic/.")]
            = False,
            record_flush_s: Annotated[float, typer.Option("--record-flush-s", min=0.1, help="--record: write a "
                                                          "batch once its first row is this old (or it holds 256 "
                                                          "rows, or the gateway stops).")] = 10.0) -> None:
    """Serve an OpenAI-compatible gateway: each chat request goes to the expert the champion router picks
    (`model: zooter`, `zooter:<router fingerprint>`, `zooter:lambda=<x>`); `/v1/route` answers the decision only."""
    from gateway.app import serve as serve_gateway

    messages.print(f"gateway for {store} on http://{host}:{port}/v1")
    serve_gateway(store, host, port, experts, api_key_env, timeout, max_body_bytes=max_body_bytes,
                  body_timeout_s=body_timeout, max_queue=max_queue, with_local_experts=local_experts,
                  quantize=quantize, runtime=runtime, record=record, record_flush_s=record_flush_s)


# --- experts --------------------------------------------------------------------------------------------------

def _announce(config: Path, action: str, name: str) -> None:
    from tasks.experts import EVENT, emit_pool_changed

    why = emit_pool_changed(config, action, name)
    if why is None:
        messages.print(f"emitted {EVENT}")
    else:  # the config is already written; the event is a convenience for a served relabel deployment
        messages.print(f"[yellow]warning:[/yellow] {EVENT} not emitted: {why}", soft_wrap=True)


@command(name="publish-config")
def publish_config_cmd(config: ConfigArg, json_out: JsonOpt = False) -> Result:
    """Publish the config into its store (configs/<hash>.yaml, configs/current.yaml) for deployments whose
    workers read it by URL (ZOOTER_CONFIG_URL); store options (credentials) are left out of the copy."""
    from schemas.store import Store
    from tasks.experts import CURRENT, publish_config

    cfg = load_config(config)
    out = {"config_url": publish_config(cfg), "current": Store.from_config(cfg.store).uri(CURRENT)}
    return Result(out, lambda c: c.print(f"published {out['config_url']} (current: {out['current']})"))


@command(experts_app, "list")
def experts_list(config: ConfigArg, json_out: JsonOpt = False) -> Result:
    """Print the experts of a config."""
    from tasks.experts import list_experts

    experts = list_experts(config)

    def show(c: Console) -> None:
        t = Table("name", "model", "backend", "dtype", "prompt", title=f"Experts in {config}")
        for e in experts:
            t.add_row(e.name, e.model, e.backend, e.dtype, e.prompt)
        show_table(c, t)
    return Result(experts, show)


@command(experts_app, "add")
def experts_add(
    config: ConfigArg,
    name: Annotated[str, typer.Option("--name", help="Unique expert name.")],
    model: Annotated[str, typer.Option("--model", help="`packaged:<name>`, s3://bucket/prefix/, org/name, a local HF "
                                       "directory, or (backend openai) the served model id.")],
    backend: Annotated[ExpertBackend | None, typer.Option("--backend", show_default=False,
                                                          help="Model backend (default hf).")] = None,
    base_url: Annotated[str | None, typer.Option("--base-url", help="backend openai: the API root, e.g. "
                                                 "http://host:8000/v1.")] = None,
    api_key_env: Annotated[str | None, typer.Option("--api-key-env", help="backend openai: the environment "
                                                    "variable holding the API key.")] = None,
    max_in_flight: Annotated[int | None, typer.Option("--max-in-flight", help="backend openai: requests in flight "
                                                      "from the whole pool.")] = None,
    cost: Annotated[float | None, typer.Option("--cost", help="Cost of one call (cost-aware routing).")] = None,
    dtype: Annotated[Dtype | None, typer.Option("--dtype", show_default=False, help="Compute dtype (default: the "
                                                "one the config's experts share, else bfloat16).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="chat, a template in tasks/prompts/, or a file.")]
    = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Upper bound on new tokens.")]
    = None,
    num_cpus: Annotated[float | None, typer.Option("--num-cpus", help="CPUs per actor.")] = None,
    num_gpus: Annotated[float | None, typer.Option("--num-gpus", help="GPUs per actor.")] = None,
    pool_size: Annotated[int | None, typer.Option("--pool-size", help="Actors in the pool.")] = None,
) -> Result:
    """Add an expert to the config (validated; comments and formatting kept), then emit zooter.experts.changed."""
    from tasks.experts import add_expert

    spec: dict = {"name": name, "model": model}
    spec.update({k: v for k, v in (("backend", backend), ("dtype", dtype), ("prompt", prompt), ("base_url", base_url),
                                   ("api_key_env", api_key_env), ("max_in_flight", max_in_flight), ("cost", cost))
                 if v is not None})
    if max_new_tokens is not None:
        spec["sampling"] = {"max_new_tokens": max_new_tokens}
    res = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("pool_size", pool_size))
           if v is not None}
    if res:
        spec["resources"] = res
    add_expert(config, spec)
    _announce(config, "add", name)
    return Result({"added": name, "config": str(config)}, lambda c: c.print(f"added expert {name} to {config}"))


@command(experts_app, "remove")
def experts_remove(config: ConfigArg, name: Annotated[str, typer.Option("--name", help="Expert to remove.")]) -> Result:
    """Remove an expert from the config (its cells stay in the store), then emit zooter.experts.changed."""
    from tasks.experts import remove_expert

    remove_expert(config, name)
    _announce(config, "remove", name)
    return Result({"removed": name, "config": str(config)}, lambda c: c.print(f"removed expert {name} from {config}"))


if __name__ == "__main__":
    main()
