"""How results look to a person: the evaluation report, its quality-cost table, a run's outcome and stage times,
and a store's inspection, as Rich tables for the terminal (`zooter run|relabel|train|evaluate|inspect`).

Tables keep to 100 columns: long expert names (`org/model-7b`) are abbreviated in column headers, with the full
names listed under the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from schemas.evaluation import fmt

if TYPE_CHECKING:
    from schemas.evaluation import CurvePoint, EvalReport
    from schemas.manifest import Outcome, RunManifest


WIDTH = 100  # what every table keeps to (a terminal narrower than that wraps the name column only)
NAME = 14  # the widest expert name a column header or a strategy name shows; longer ones are abbreviated
HEADERS = {"expert_calls": "gen/q", "rm_calls": "RM/q"}  # generations and RM scorings per query


def short_names(names: list[str], width: int = NAME) -> dict[str, str]:
    """name -> a label of at most `width` characters: the part after the last `/`, cut with an ellipsis when
    longer; labels that would clash get the expert's position instead of their last characters."""
    out = {n: (s if len(s := n.rsplit("/", 1)[-1]) <= width else s[:width - 1] + "…") for n in names}
    clash = {v for v in out.values() if list(out.values()).count(v) > 1}
    return {n: (f"{v[:width - 3]}~{i + 1}" if v in clash else v) for i, (n, v) in enumerate(out.items())}


def legend(labels: dict[str, str]) -> str | None:
    """The abbreviated names in full, for the line under a table (None: no name was abbreviated)."""
    pairs = [f"{v} = {n}" for n, v in labels.items() if v != n]
    return "experts: " + ", ".join(pairs) if pairs else None


def _named(text: str, labels: dict[str, str]) -> str:
    """A strategy name (`expert:<name>`, `best_single (<name>)`, `always <name>`) with the expert's short label."""
    for n in sorted(labels, key=len, reverse=True):
        if n in text:
            return text.replace(n, labels[n])
    return text


def show_table(c: Console, t: Table) -> None:
    """Print a table within WIDTH columns (or the terminal's, when narrower)."""
    c.print(t, width=min(WIDTH, c.width))


def _table(*columns: str, title: str, name_width: int = 20) -> Table:
    """A table whose first (name) column wraps (at `name_width` at least) and whose number columns never do."""
    t = Table(*columns, title=title)
    t.columns[0].overflow, t.columns[0].min_width = "fold", name_width
    for col in t.columns[1:]:
        col.justify, col.no_wrap = "right", True
    return t


def report_table(report: EvalReport) -> Table:
    """The evaluation table of a schemas.evaluation.EvalReport: one row per strategy."""
    rows = report.table()
    labels = short_names(report.experts)
    header = [HEADERS.get(k, k) for k in (rows[0] if rows else ["strategy"])]
    left = f" ({report.left_out} queries left out: a row failed alone)" if report.left_out else ""
    t = _table(*header, title=f"Evaluation on {report.test_queries} held-out queries{left}")
    for r in rows:
        name, *rest = map(fmt, r.values())
        t.add_row(_named(name, labels), *rest)
    return t


def _show_report(c: Console, report: EvalReport) -> None:
    labels = short_names(report.experts)
    show_table(c, report_table(report))
    pt = report.per_tag
    if pt.tags:
        cols = [*pt.tags, "tag_average"]
        t = _table("strategy", *cols, title="Mean reward per tag (test)")
        for k, v in pt.strategies.items():
            t.add_row(_named(k, labels), *[fmt(v.get(col)) for col in cols])
        show_table(c, t)
    c.print("router sends: " + ", ".join(f"{labels[e]} {p:.0%}" for e, p in report.router_share.items()))
    if note := legend(labels):
        c.print(note)


def cost_table(report: EvalReport) -> Table | None:
    """The quality-cost table of a report with a curve (None without one): the router at the config's lambda and
    at each corner of its quality-cost hull (the operating points worth choosing; the area under them is its AIQ),
    then each expert alone, most expensive first, with the biggest and the best single expert marked."""
    curve = report.curve
    if curve is None:
        return None
    from tasks.evaluate import hull  # loaded already when a flow has just evaluated

    labels = short_names(report.experts)
    t = _table("strategy", "lambda", "mean cost", "reward", *labels.values(), name_width=12,
               title=f"Quality and cost on {report.test_queries} held-out queries")

    def add(name: str, lam: str, p: CurvePoint, share: list[float]) -> None:
        t.add_row(name, lam, f"{p.cost:.4g}", f"{p.reward:.4f}", *[f"{s:.0%}" for s in share])

    add("router (config)", f"{report.lam:g}", curve.operating, list(curve.operating.share.values()))
    for corner in reversed(hull([(p.cost, p.reward) for p in curve.router])):  # lambda ascending
        # the first grid point at that corner: the smallest lambda that reaches it
        p = next(q for q in curve.router if (q.cost, q.reward) == corner)
        add("router", f"{p.lam:.4g}", p, list(p.share.values()))
    biggest = max(curve.costs, key=curve.costs.__getitem__)
    for e, p in sorted(curve.experts.items(), key=lambda kv: -kv[1].cost):
        marks = [m for m, on in (("biggest", e == biggest), ("best single", e == report.best_single)) if on]
        add(f"always {labels[e]}" + (f" ({', '.join(marks)})" if marks else ""), "-", p,
            [float(x == e) for x in report.experts])
    return t


def _show_cost(c: Console, report: EvalReport) -> None:
    """The quality-cost table and its summary (AIQ, cost to reach 95 % of the best single expert), or why there is
    none."""
    table = cost_table(report)
    if table is None:
        if report.curve_note:
            c.print(f"quality and cost: {report.curve_note}")
        return
    curve = report.curve
    show_table(c, table)
    c.print("expert columns: share of the queries sent to each; cost of one call: "
            + ", ".join(f"{e} {v:g}" for e, v in curve.costs.items()))
    lo, hi = min(curve.costs.values()), max(curve.costs.values())
    c.print(f"AIQ (mean reward over the cost range {lo:g}-{hi:g}): "
            + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in curve.aiq.items()))
    c.print(f"mean cost to reach 95 % of the best single expert's reward ({curve.target:.4f}): "
            + ", ".join(f"{k.replace('_', ' ')} {'never' if v is None else f'{v:.4g}'}"
                        for k, v in curve.cost_to_target.items()))


def _show_outcome(c: Console, out: Outcome) -> None:
    """What `run`, `relabel` and `train` show: the report and its quality-cost table, cells, timing, champion
    decision and paths."""
    m = out.manifest
    _show_report(c, out.report)
    _show_cost(c, out.report)
    reused = sum(s.cells_reused for s in m.generate + m.score)
    c.print(f"generation + scoring cells: {m.cells_computed} computed, {reused} reused")
    c.print(f"run {m.run_id} took {m.timings.get('total_s', 0):.0f}s")
    if m.champion:
        d = m.champion
        test = (f"; the challenger on test {fmt(d.challenger_test_reward)}"
                if d.split != "test" and d.challenger_test_reward is not None else "")
        c.print(f"champion/challenger on {d.split}: {d.decision} ({d.reason}; challenger "
                f"{fmt(d.challenger_reward)}, champion {fmt(d.champion_reward)}{test})")
    c.print(f"manifest: {out.manifest_uri}\nreport:   {out.report_uri}", soft_wrap=True)


def stage_times(m: RunManifest, wall_s: float | None = None) -> list[tuple[str, float]]:
    """(stage, seconds) of a run from its manifest: startup (the command's wall time outside the flow's own
    timer: imports, preflight, Prefect's server, Ray), every expert's generation, every reward model's scoring,
    embedding, the manifest's other step timings, and the run's total. Stages may overlap (experts generate
    concurrently), so the rows need not add up to the total."""
    total = m.timings.get("total_s", 0.0)
    rows = [] if wall_s is None else [("startup (preflight, Prefect, Ray)", max(wall_s - total, 0.0))]
    rows += [(f"generate {s.name}", s.seconds) for s in m.generate]
    rows += [(f"score {s.name}", s.seconds) for s in m.score]
    rows += [("embed", m.embed.seconds)] if m.embed else []
    rows += [(k.removesuffix("_s"), v) for k, v in m.timings.items() if k != "total_s"]
    return rows + [("flow total", total)] + ([] if wall_s is None else [("command total", wall_s)])


def stage_table(m: RunManifest, wall_s: float | None = None) -> Table:
    t = Table("stage", "seconds", title=f"Time by stage, run {m.run_id} (stages may overlap)")
    t.columns[1].justify = "right"
    for name, s in stage_times(m, wall_s):
        t.add_row(name, f"{s:.1f}")
    return t


def _show_inspect(c: Console, info: dict, store: str) -> None:
    t = Table("run", "status", "queries", "computed", "reused", "repaired", "flagged", "failed", "seconds",
              title=f"Runs in {store}")
    for r in info["runs"]:
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        t.add_row(r["run_id"], status[:40], str(r["queries"]), str(r["cells_computed"]),
                  str(r["cells_reused"]), str(r["cells_repaired"]), str(r["flagged"]), str(r.get("failed", 0)),
                  "-" if r["seconds"] is None else f"{r['seconds']:.0f}")
    show_table(c, t)
    cells = info["cells"]
    t = Table("stage", "expert", *[str(s) for s in cells["shards"]], title=f"Cells of run {info['run']} (shard)")
    mark = lambda ok: "[green]done[/green]" if ok else "[red]missing[/red]"  # noqa: E731
    for e, done in cells["generations"].items():
        t.add_row("generate", e, *map(mark, done))
    for rm, per in cells["scores"].items():
        for e, done in per.items():
            t.add_row(f"score:{rm}", e, *map(mark, done))
    show_table(c, t)
    if cells["flags"]:
        t = Table("reward model", "expert", "empty_response", "nonfinite",
                  title="Flagged score rows (kept with a null score, see README)")
        for f in cells["flags"]:
            t.add_row(f["reward_model"], f["expert"], str(f.get("empty_response", 0)), str(f.get("nonfinite", 0)))
        show_table(c, t)
    if cells.get("failed"):
        t = Table("stage", "model", "expert", "failed rows", "first error",
                  title="Rows that failed alone (left out of the labels; the next run retries them)")
        for f in cells["failed"]:
            t.add_row(f["stage"], f["name"], f.get("expert", f["name"]), str(f["rows"]), f["first_error"][:120])
        show_table(c, t)
    tags = info.get("tags")
    if tags and tags.get("cells"):
        fails = f", {tags['parse_failures']} parse failures" if "parse_failures" in tags else ""
        by = f" by {tags['expert']}" if "expert" in tags else ""
        c.print(f"tags{by}: {tags['tagged']} of {tags['queries']} queries tagged, vocabulary {tags['vocabulary']}"
                f"{fails}; top: " + ", ".join(f"{t['tag']} ({t['n']})" for t in tags["top"][:10]), soft_wrap=True)
    if "labels" in info:
        lab = info["labels"]
        left = f", {lab['left_out']} left out: a row failed" if lab.get("left_out") else ""
        t = Table("expert", "mean reward", "win rate", title=f"Labels ({lab['rows']} queries{left})")
        for r in lab["experts"]:
            t.add_row(r["expert"], fmt(r["mean_reward"]), fmt(r["win_rate"]))
        show_table(c, t)
        names = [r["expert"] for r in lab["experts"]]
        labels = short_names(names)
        t = _table("tag", "n", *labels.values(), title="Mean target probability by tag")
        for r in lab["tag_target"]:
            t.add_row(r["tag"], str(r["n"]), *[fmt(r[e]) for e in names])
        show_table(c, t)
        if note := legend(labels):
            c.print(note)
    if "champion" in info:
        ch = info["champion"]
        c.print(f"champion: {ch['router']} (run {ch['run_id']}, router reward {fmt(ch['reward'])}), "
                f"evaluation {ch['evaluation']}")
    if "plot" in info:
        c.print(f"plot: {info['plot']}", soft_wrap=True)
