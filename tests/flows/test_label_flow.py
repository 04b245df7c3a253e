"""The whole label flow with Prefect and Ray on tiny models: every artifact validates, rerun computes nothing, the
results are visible through Prefect's API."""

import json

import polars as pl
import pytest

from flows.label import label_flow
from schemas.artifacts import (
    CHAMPION_PATH,
    GENERATIONS,
    LABELS,
    QUERIES,
    SCORES,
    TAGS,
    generation_path,
    labels_path,
    queries_path,
    router_dir,
    score_path,
    tags_path,
)
from schemas.store import Store
from tests.conftest import copy_labeled, json_doc, tiny_flow_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, tiny_models, labeled):
    """The first run is the session's from-scratch run (`labeled`); the second reruns it on a copy of its store."""
    tmp = tmp_path_factory.mktemp("flow")
    path = copy_labeled(labeled, tmp, tiny_models)
    state = label_flow(str(path), return_state=True)
    return Store(str(tmp / "store")), labeled.outcome, state.result(), state.state_details.flow_run_id


def test_every_artifact_validates_with_expected_rows(labeled):
    store, first = Store(str(labeled.root)), labeled.outcome  # the session's run from an empty store
    m = first.manifest
    assert m.status == "completed" and m.queries == 12 and m.shards == [0, 1, 2]
    for s in m.shards:
        assert store.read_table(queries_path(s), QUERIES).num_rows == 4
        assert store.read_table(tags_path(m.tagger, s), TAGS).num_rows == 4
    gen_fps = {g.name: g.fingerprint for g in m.generate}
    for g in m.generate:
        assert (g.cells_computed, g.rows) == (3, 12)
        assert len(g.nodes) == 1  # the embedded Ray's one node
        for s in m.shards:
            t = store.read_table(generation_path(g.name, g.fingerprint, s), GENERATIONS)
            assert t.num_rows == 4 and len(t["query_id"].unique()) == 4
    for r in m.score:
        assert (r.cells_computed, r.rows) == (6, 24)
        assert len(r.nodes) == (0 if r.name == "exact" else 1)  # the verifiable reward runs in-process
        for e, efp in gen_fps.items():
            for s in m.shards:
                assert store.read_table(score_path(r.name, r.fingerprint, e, efp, s), SCORES).num_rows == 4
    labels = pl.from_arrow(store.read_table(labels_path(m.labels), LABELS))
    assert labels.height == 12 == m.label_rows
    assert set(labels["split"]) == {"train", "test"}
    for col in ("rewards", "soft", "target"):
        assert labels[col].list.len().to_list() == [2] * 12
    assert labels["target"].list.sum().to_list() == pytest.approx([1.0] * 12)
    router = store.read_json(f"{router_dir(m.router)}/router.json")
    assert router["experts"] == ["a", "b"] and router["labels_fingerprint"] == m.labels
    assert len(router["history"]) == 2
    assert store.read_json(CHAMPION_PATH)["router"] == router_dir(m.router)
    manifest = json.loads(store.fs.cat(store.path(f"runs/{m.run_id}/manifest.json")))
    assert manifest["versions"]["prefect"].startswith("3.")
    assert first.manifest_uri == store.uri(f"runs/{m.run_id}/manifest.json")


def test_report_has_every_strategy(flow_run):
    _, first, _, _ = flow_run
    strategies = [r.strategy for r in first.report.rows]
    for s in ("router", "best_single", "random", "oracle", "rm_ranking", "expert:a", "expert:b", "tag-lookup",
              "cluster-lookup", "knn"):
        assert any(x.startswith(s) for x in strategies), s
    assert set(first.report.rows[0].rm) == {"judge", "rm", "exact"}


def test_rerun_computes_no_cells_and_reuses_everything(flow_run):
    _, first, second, _ = flow_run
    m1, m2 = first.manifest, second.manifest
    assert sum(s.cells_computed for s in m2.generate + m2.score) == 0
    assert sum(s.cells_reused for s in m2.generate + m2.score) == 6 + 18
    assert all(s.nodes == [] for s in m2.generate + m2.score)  # no actor started
    assert (m2.labels, m2.router, m2.evaluation) == (m1.labels, m1.router, m1.evaluation)
    assert m2.run_id != m1.run_id


def test_the_run_publishes_its_results_as_prefect_artifacts(flow_run):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.tail import EVALUATION_KEY, MANIFEST_KEY, REPORT_KEY

    _, _, second, flow_run_id = flow_run
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    got = {a.key: a for a in found}
    assert set(got) == {EVALUATION_KEY, REPORT_KEY, MANIFEST_KEY}
    table = got[EVALUATION_KEY].data
    table = json.loads(table) if isinstance(table, str) else table
    router = next(r for r in table if r["strategy"] == "router")
    assert router["reward"] == pytest.approx(second.report.router_reward)
    assert {"rm:judge", "rm:rm", "rm:exact", "expert_calls", "mtr"} <= set(router)
    assert len(table) == len(second.report.rows)
    assert got[REPORT_KEY].type == "markdown" and "| router |" in got[REPORT_KEY].data
    assert got[REPORT_KEY].data.rstrip().endswith("report.png")
    assert f"({second.manifest_uri})" in got[MANIFEST_KEY].data


def test_inspect_reads_runs_cells_labels_and_champion(flow_run):
    from typer.testing import CliRunner

    from flows.cli import app

    store, first, second, _ = flow_run
    res = CliRunner().invoke(app, ["inspect", store.url, "--json"])
    assert res.exit_code == 0, res.output
    # the JSON document is one line; a shared Ray session may print actor logs around it
    info = json_doc(res.output)
    assert [r["run_id"] for r in info["runs"]] == [first.manifest.run_id, second.manifest.run_id]
    assert info["cells"]["generations"] == {"a": [True] * 3, "b": [True] * 3}
    assert all(all(v) for per in info["cells"]["scores"].values() for v in per.values())
    assert {r["expert"] for r in info["labels"]["experts"]} == {"a", "b"}
    assert sum(r["win_rate"] for r in info["labels"]["experts"]) == pytest.approx(1.0)
    assert {r["tag"] for r in info["labels"]["tag_target"]} == {"math", "writing", "trivia", "coding"}
    assert info["champion"]["router"] == f"routers/{first.manifest.router}"
    text = CliRunner().invoke(app, ["inspect", store.url])
    assert text.exit_code == 0 and "done" in text.output and "champion" in text.output
    bad = CliRunner().invoke(app, ["inspect", store.url, "--run", "nope"])
    assert bad.exit_code == 2 and "not in" in bad.output


def test_frozen_encoder_router_reuses_every_cell_and_trains_on_embeddings(flow_run, tiny_models):
    from pathlib import Path

    store, first, _, _ = flow_run
    path = tiny_flow_config(Path(store.url).parent, tiny_models, aggregate={"tag_temperature": 0.5},
                            router={"freeze_encoder": True, "head_hidden": 8, "epochs": 3, "max_length": 32,
                                    "num_workers": 0})  # the head fitted in this process (Ray Train's local mode)
    out = label_flow(str(path))
    m = out.manifest
    assert sum(s.cells_computed for s in m.generate + m.score) == 0
    assert (m.embed.cells_computed, m.embed.cells_reused, m.embed.rows) == (3, 0, 12)
    assert len(m.embed.nodes) == 1  # the encoder ran in an actor
    assert m.labels != first.manifest.labels and m.router != first.manifest.router
    router = store.read_json(f"{router_dir(m.router)}/router.json")
    assert router["embeddings"] == m.embed.fingerprint and len(router["history"]) == 3
    tags = out.report.per_tag.tags  # the tags of the test split's queries
    assert tags and set(tags) <= {"math", "writing", "trivia", "coding"}


def test_a_run_resolves_each_model_source_once_and_writes_its_plan(labeled, tiny_models, tmp_path, monkeypatch):
    """The plan resolves every expert's, reward model's and the encoder's identity once in the driver (the judge
    shares expert a's weights: one look for both); no step fingerprints a spec again. The run writes plan.json."""
    from collections import Counter

    import cluster.models

    calls: Counter = Counter()
    real = cluster.models.identity

    def counted(ref, revision=None):
        calls[(ref, revision)] += 1
        return real(ref, revision)

    monkeypatch.setattr(cluster.models, "identity", counted)
    path = copy_labeled(labeled, tmp_path, tiny_models)
    out = label_flow(str(path))
    want = {(str(tiny_models[k]), None) for k in ("lm_a", "lm_b", "rm")} | {("packaged:all-minilm-l6-v2", None)}
    assert set(calls) == want and set(calls.values()) == {1}, calls
    store = Store(str(tmp_path / "store"))
    plan = store.read_json(f"runs/{out.manifest.run_id}/plan.json")
    assert [(e["spec"]["name"], e["fingerprint"]) for e in plan["experts"]] == [
        (g.name, g.fingerprint) for g in out.manifest.generate]
    assert [(r["spec"]["name"], r["fingerprint"]) for r in plan["reward_models"]] == [
        (s.name, s.fingerprint) for s in out.manifest.score]
    assert plan["expert_refs"] == [[e["spec"]["name"], e["fingerprint"]] for e in plan["experts"]]
    assert plan["config"]["store"]["url"] == str(tmp_path / "store") and "config" not in store.read_json(
        f"runs/{out.manifest.run_id}/manifest.json")
