"""The CLI's happy paths; bad input is in test_bad_input.py."""

import re

import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _edit(path, fn):
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_validate_ok(tiny_config):
    res = runner.invoke(app, ["validate", str(tiny_config())])
    assert res.exit_code == 0 and "12 queries" in res.output


def test_models_lists_packaged():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "packaged:qwen2.5-coder-0.5b-instruct" in res.output


def test_trust_remote_code_warns(tiny_config):
    import warnings

    from schemas.config import load_config
    from tasks.preflight import preflight

    path = _edit(tiny_config(), lambda c: c["experts"][0].update(trust_remote_code=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preflight(load_config(path))
    assert any("trust_remote_code" in str(w.message) for w in caught)


def test_version():
    from importlib.metadata import version

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout == f"zooter-flow {version('zooter-flow')}\n"


def test_reading_commands_speak_json(tiny_config):
    import json

    path = tiny_config()
    listed = json.loads(runner.invoke(app, ["experts", "list", str(path), "--json"]).stdout)
    assert [(e["name"], e["dtype"], e["backend"]) for e in listed] == [("a", "float32", "hf"), ("b", "float32", "hf")]
    models = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert "packaged:all-minilm-l6-v2" in [m["name"] for m in models] and all(m["licence"] for m in models)


def test_enum_options_are_choices(tiny_config):
    path = tiny_config()
    before = path.read_text()
    for opt, bad in (("--backend", "tgi"), ("--dtype", "int3")):
        res = runner.invoke(app, ["experts", "add", str(path), "--name", "c", "--model", "x", opt, bad])
        assert res.exit_code == 2 and "Invalid value" in res.output and bad in res.output
    assert path.read_text() == before
    res = runner.invoke(app, ["import-scores", str(path), "--store", "s", "--format", "csv"])
    assert res.exit_code == 2 and "Invalid value for '--format'" in res.output and "csv" in res.output
    for cmd in (["experts", "add", "--help"], ["import-scores", "--help"], ["export", "--help"]):
        assert runner.invoke(app, cmd, terminal_width=200).exit_code == 0


def test_inspect_store_as_option_or_argument(tmp_path):
    from schemas.artifacts import run_manifest_path
    from schemas.manifest import RunManifest
    from schemas.store import Store

    store = tmp_path / "store"
    m = RunManifest(run_id="20260101T000000Z-000000", flow="label", status="completed")
    Store(str(store)).write_json(run_manifest_path(m.run_id), m.model_dump(mode="json"))
    for args in (["inspect", "--store", str(store), "--json"], ["inspect", str(store), "--json"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert [r["run_id"] for r in yaml.safe_load(res.stdout)["runs"]] == [m.run_id]
    res = runner.invoke(app, ["inspect"])
    assert res.exit_code == 2 and res.output.startswith("error: no store given")
    res = runner.invoke(app, ["inspect", str(store), "--store", str(tmp_path / "other")])
    assert res.exit_code == 2 and "two stores given" in res.output


def test_serve_schedule_is_utc(tiny_config):
    from flows.deploy import deployments

    _, relabel = deployments(str(tiny_config()))
    assert [(s.schedule.cron, s.schedule.timezone) for s in relabel.schedules] == [("0 3 * * *", "UTC")]
    assert "in UTC" in runner.invoke(app, ["serve", "--help"], terminal_width=200).output


def test_evaluate_shows_the_champions_report(tmp_path):
    import json

    from schemas.artifacts import CHAMPION_PATH, evaluation_dir, report_path
    from schemas.evaluation import Champion, EvalReport, PerTag, StrategyRow
    from schemas.store import Store

    store = Store(str(tmp_path / "store"))
    res = runner.invoke(app, ["evaluate", "--store", store.url, "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["error"]["type"] == "ArtifactError"
    rows = [StrategyRow(strategy="router", reward=0.5, rm={"judge": 0.5, "exact": None}, expert_calls=1, rm_calls=0,
                        mtr=1.0, first=1.0),
            StrategyRow(strategy="rm_ranking", reward=0.25, rm={"judge": 0.25, "exact": None}, expert_calls=2,
                        rm_calls=2)]
    report = EvalReport(evaluation="e1", labels="l1", router="r1", experts=["a", "b"], test_queries=3,
                        best_single="a", rows=rows, router_share={"a": 2 / 3, "b": 1 / 3},
                        per_tag=PerTag(tags=["math"], n=[3], strategies={"router": {"math": 0.5, "tag_average": 0.5}}))
    store.write_json(report_path("e1"), report.model_dump(mode="json"))
    store.write_json(CHAMPION_PATH, Champion(router="routers/r1", evaluation=evaluation_dir("e1"), labels="l1",
                                             experts=["a", "b"], reward=0.5, run_id="run1",
                                             published="2026-01-01T00:00:00+00:00").model_dump(mode="json"))
    res = runner.invoke(app, ["evaluate", "--store", store.url])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "Evaluation on 3 held-out queries" in out and "rm:judge" in out and "rm:exact" in out
    assert re.search(r"│ router +│ 0\.5000 │   0\.5000 │        - │", out), out
    assert "Mean reward per tag" in out and "router sends: a 67%, b 33%" in out
    assert f"report: {store.url}/evaluations/e1/report.md" in out
    assert EvalReport.model_validate(json.loads(runner.invoke(app, ["evaluate", "--store", store.url,
                                                                    "--json"]).stdout)) == report


def test_run_summary_for_a_person():
    import io

    from rich.console import Console

    from flows.report import _show_outcome
    from schemas.evaluation import EvalReport, StrategyRow
    from schemas.manifest import ChampionDecision, Outcome, RunManifest, StageRecord

    m = RunManifest(run_id="r1", flow="label", timings={"total_s": 41.6},
                    generate=[StageRecord(name="a", fingerprint="f", cells_computed=2, cells_reused=1)],
                    score=[StageRecord(name="rm", fingerprint="g", cells_reused=3)],
                    champion=ChampionDecision(decision="promoted", reason="no champion yet", challenger="r",
                                              challenger_reward=0.5))
    report = EvalReport(evaluation="e", labels="l", router="r", experts=["a"], test_queries=1, best_single="a",
                        rows=[StrategyRow(strategy="router", reward=0.5, expert_calls=1, rm_calls=0)],
                        router_share={"a": 1.0})
    buf = io.StringIO()
    _show_outcome(Console(file=buf, width=150), Outcome(manifest=m, report=report, manifest_uri="s/runs/r1/m.json",
                                                        report_uri="s/evaluations/e/report.md"))
    out = buf.getvalue()
    assert "generation + scoring cells: 2 computed, 4 reused" in out and "run r1 took 42s" in out
    assert "champion/challenger on test: promoted (no champion yet; challenger 0.5000, champion -)" in out
    assert "manifest: s/runs/r1/m.json\nreport:   s/evaluations/e/report.md" in out
    # a decision on the validation slice names it, and shows the challenger's test reward beside it
    m.champion = ChampionDecision(decision="kept", reason="the challenger is worse than the champion", challenger="r",
                                  challenger_reward=0.25, champion="c", champion_reward=0.5, split="validation",
                                  challenger_test_reward=0.75)
    buf = io.StringIO()
    _show_outcome(Console(file=buf, width=200), Outcome(manifest=m, report=report, manifest_uri="m", report_uri="r"))
    assert ("champion/challenger on validation: kept (the challenger is worse than the champion; challenger 0.2500, "
            "champion 0.5000; the challenger on test 0.7500)") in buf.getvalue()


def test_publish_config_for_remote_workers(tiny_config):
    """`zooter publish-config` puts the config into its store; the published copy loads back by URL (file://
    here, s3:// in tests/tasks/test_experts.py) and equals the config."""
    import json

    from schemas.config import load_config

    path = tiny_config()
    res = runner.invoke(app, ["publish-config", str(path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["config_url"] != out["current"] and out["current"].endswith("configs/current.yaml")
    back = load_config(out["config_url"])
    assert back.model_dump() == load_config(path).model_dump()
    assert load_config(out["current"]).model_dump() == back.model_dump()


def test_experts_add_an_endpoint(tiny_config):
    """An expert behind an OpenAI-compatible endpoint: its served model id stays as written (not a path)."""
    from schemas.config import load_config

    path = tiny_config()
    res = runner.invoke(app, ["experts", "add", str(path), "--name", "remote", "--backend", "openai", "--model",
                              "served-x", "--base-url", "http://127.0.0.1:9/v1", "--api-key-env", "REMOTE_KEY",
                              "--max-in-flight", "4", "--cost", "2.5"])
    assert res.exit_code == 0, res.output
    e = load_config(path).experts[-1]
    assert (e.name, e.backend, e.model, e.base_url, e.api_key_env, e.max_in_flight, e.cost) == (
        "remote", "openai", "served-x", "http://127.0.0.1:9/v1", "REMOTE_KEY", 4, 2.5)


def test_run_summary_shows_the_quality_cost_table():
    import io

    import numpy as np
    from rich.console import Console

    from flows.report import _show_outcome
    from schemas.evaluation import EvalReport, StrategyRow
    from schemas.manifest import Outcome, RunManifest
    from tasks.evaluate import cost_curve

    # b costs 4x a; the router prefers b by margins 0.1, 0.8, 0.2, 0.6: lambda moves queries 0, 2, 3, 1 to a
    probs = np.array([[0.45, 0.55], [0.1, 0.9], [0.4, 0.6], [0.2, 0.8]])
    rewards = np.array([[0.9, 1.0], [0.2, 1.0], [0.5, 0.6], [0.1, 0.9]])
    curve = cost_curve(probs, rewards, np.array([1.0, 4.0]), ["a", "b"], best=1, lam=0.5)
    report = EvalReport(evaluation="e", labels="l", router="r", experts=["a", "b"], test_queries=4, best_single="b",
                        rows=[StrategyRow(strategy="router", reward=0.875, expert_calls=1, rm_calls=0)],
                        router_share={"a": 0.0, "b": 1.0}, costs={"a": 1.0, "b": 4.0}, lam=0.5, curve=curve)
    buf = io.StringIO()
    _show_outcome(Console(file=buf, width=200), Outcome(manifest=RunManifest(run_id="r1", flow="label"),
                                                        report=report, manifest_uri="m", report_uri="r"))
    out = buf.getvalue()
    rows = [[c.strip() for c in line.strip().strip("│").split("│")] for line in out.splitlines() if "│" in line]
    cost_rows = [r[:1] + r[2:] for r in rows if r[0].startswith(("router (config)", "always")) or len(r) == 6]
    # config lambda 0.5 moves queries 0 and 2 (margins below 3/4 * 0.5); the hull's corners: all b, then queries 0
    # and 2 on a (collinear points dropped), then all a; each expert alone, the biggest (and best) first
    assert ["router (config)", "2.5", "0.8250", "50%", "50%"] in cost_rows
    assert [r for r in cost_rows if r[0] == "router"] == [["router", "4", "0.8750", "0%", "100%"],
                                                          ["router", "2.5", "0.8250", "50%", "50%"],
                                                          ["router", "1", "0.4250", "100%", "0%"]]
    assert [r for r in cost_rows if r[0].startswith("always")] == [
        ["always b (biggest, best single)", "4", "0.8750", "0%", "100%"], ["always a", "1", "0.4250", "100%", "0%"]]
    assert "expert columns: share of the queries sent to each; cost of one call: a 1, b 4" in out
    assert "AIQ (mean reward over the cost range 1-4): router 0.7375, random mix 0.6500" in out
    assert "reward (0.8313): router 2.688, random mix 3.708, best single 4" in out
