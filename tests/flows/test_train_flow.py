"""Bring-your-own scores end to end through the CLI: import-scores -> train (Prefect flow, Ray Train, frozen
packaged encoder) -> evaluate report (JSON, Markdown, PNG) -> route new queries with the champion."""

import json

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from schemas.artifacts import CHAMPION_PATH
from schemas.store import Store
from tests.conftest import json_doc

pytestmark = pytest.mark.slow
THINGS = ["rain", "the sea", "a cat", "autumn", "mountains", "a city", "the moon", "bread", "a river", "snow"]


def _questions(task: str, n: int, offset: int) -> list[str]:
    if task == "arith":
        return [f"What is {i + offset} plus {2 * i + 7}?" for i in range(n)]
    return [f"Write a short poem about {THINGS[i % 10]}, in style number {i + offset}." for i in range(n)]


def _tables(root):
    """Two tasks, two experts: `calc` solves every arithmetic question, `bard` every poem."""
    root.mkdir()
    for task in ("arith", "poems"):
        for split, n, off in (("train", 40, 0), ("test", 12, 40)):
            rows = [{"question": q, "scores": {"calc": float(task == "arith"), "bard": float(task == "poems")}}
                    for q in _questions(task, n, off)]
            (root / f"{task}_{split}.json").write_text(json.dumps(rows))
    return root




@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session, prefect_harness):
    tmp = tmp_path_factory.mktemp("byo")
    store = tmp / "store"
    runner = CliRunner()
    r = runner.invoke(app, ["import-scores", str(_tables(tmp / "tables")), "--format", "routerdc", "--store",
                            str(store), "--name", "toy"])
    assert r.exit_code == 0, r.output
    cfg = {"name": "toy", "store": str(store), "source": "toy", "aggregate": {"tag_temperature": 0.1},
           "router": {"encoder": "packaged:all-minilm-l6-v2", "freeze_encoder": True, "epochs": 15, "lr": 0.01,
                      "batch_size": 16, "max_length": 64, "cpus_per_worker": 1,
                      "num_workers": 0}}  # the head fitted in this process (Ray Train's local mode)
    (tmp / "train.yaml").write_text(yaml.safe_dump(cfg))
    r = runner.invoke(app, ["train", str(tmp / "train.yaml"), "--json"])
    assert r.exit_code == 0, r.output
    return tmp, Store(str(store)), json_doc(r.output)


def test_router_learns_the_task_split_and_the_report_has_every_part(trained):
    _, store, out = trained
    report, m = out["report"], out["manifest"]
    assert m["status"] == "completed" and m["flow"] == "train" and m["queries"] == 104
    assert m["embed"]["cells_computed"] == len(m["shards"])
    assert report["test_queries"] == 24
    per = report["per_tag"]
    assert per["tags"] == ["arith", "poems"] and per["n"] == [12, 12]
    s = per["strategies"]
    assert s["router"] == {"arith": 1.0, "poems": 1.0, "tag_average": 1.0}  # = oracle
    assert s["oracle"]["tag_average"] == 1.0 and s["random"]["tag_average"] == 0.5
    assert next(v for k, v in s.items() if k.startswith("best_single"))["tag_average"] == 0.5
    assert report["router_share"] == {"bard": 0.5, "calc": 0.5}
    ev = store.read_json(CHAMPION_PATH)["evaluation"]
    assert store.fs.cat(store.path(f"{ev}/report.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| router | 1.0000 | 1.0000 | 1.0000 |" in store.fs.cat(store.path(f"{ev}/report.md")).decode()
    # only the head is stored for a frozen encoder: the router stays small
    router = store.read_json(CHAMPION_PATH)["router"]
    assert store.fs.size(store.path(f"{router}/router.safetensors")) < 100_000


def test_evaluate_command_shows_the_champion_report(trained):
    tmp, store, out = trained
    r = CliRunner().invoke(app, ["evaluate", "--store", str(tmp / "store"), "--json"])
    assert r.exit_code == 0, r.output
    assert json_doc(r.output)["evaluation"] == out["manifest"]["evaluation"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_route_adds_expert_and_probs_to_every_record(trained, suffix):
    tmp, _, _ = trained
    rows = [{"id": i, "question": q} for i, q in enumerate(["What is 3 plus 4?", "Write a short poem about fog."])]
    src = tmp / f"new{suffix}"
    df = pl.DataFrame(rows)
    {".jsonl": df.write_ndjson, ".parquet": df.write_parquet, ".csv": df.write_csv}[suffix](src)
    dst = tmp / f"routed{suffix}"
    r = CliRunner().invoke(app, ["route", "--store", str(tmp / "store"), "--input", str(src), "--text-field",
                                 "question", "--output", str(dst), "--batch-size", "1"])
    assert r.exit_code == 0, r.output
    out = {".jsonl": pl.read_ndjson, ".parquet": pl.read_parquet, ".csv": pl.read_csv}[suffix](dst)
    assert out["id"].to_list() == [0, 1] and out["expert"].to_list() == ["calc", "bard"]
    probs = out["probs"].to_list()
    probs = [json.loads(p) for p in probs] if suffix == ".csv" else probs
    assert all(set(p) == {"calc", "bard"} and abs(sum(p.values()) - 1) < 1e-5 for p in probs)
    assert not [p for p in tmp.iterdir() if p.name.startswith(".routed")]  # no temp file left behind


def test_route_names_the_bad_line(trained):
    tmp, _, _ = trained
    src = tmp / "bad.jsonl"
    src.write_text('{"question": "What is 1 plus 1?"}\n{"text": "no question field"}\n')
    r = CliRunner().invoke(app, ["route", "--store", str(tmp / "store"), "--input", str(src), "--text-field",
                                 "question", "--output", str(tmp / "bad-out.jsonl")])
    assert r.exit_code == 2 and "bad.jsonl:2: field 'question'" in r.output
    assert not (tmp / "bad-out.jsonl").exists()


def test_labels_follow_the_scores_and_the_baselines_find_the_split(trained):
    """End to end, from imported scores: each query's soft label and target put the most weight on the expert that
    scored it 1 (calc on arithmetic, bard on poems); the lookup baselines find the task split too."""
    from schemas.artifacts import LABELS, labels_path

    _, store, out = trained
    fp = out["manifest"]["labels"]
    labels = pl.from_arrow(store.read_table(labels_path(fp), LABELS))
    experts = store.read_meta(labels_path(fp))["experts"]
    assert labels.height == 104
    for text, soft, target in zip(labels["text"], labels["soft"], labels["target"], strict=True):
        want = "calc" if text.startswith("What is") else "bard"
        assert experts[max(range(2), key=soft.__getitem__)] == want, (text, soft)
        assert experts[max(range(2), key=target.__getitem__)] == want, (text, target)
    rewards = {r["strategy"]: r["reward"] for r in out["report"]["rows"]}
    assert rewards["tag-lookup"] == 1.0  # the task is each query's tag
    assert rewards["knn"] == 1.0 and rewards["cluster-lookup"] >= 0.9  # encoder features alone separate the tasks
