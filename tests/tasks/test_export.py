"""export: a store written by hand (real Parquet cells, no models) -> one tidy table, loaded back in each format."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from flows.cli import app
from schemas.artifacts import (
    GENERATIONS,
    LABELS,
    SCORES,
    generation_path,
    labels_path,
    run_manifest_path,
    score_path,
)
from schemas.errors import ArtifactError, InputError
from schemas.manifest import RunManifest, StageRecord
from schemas.store import Store
from tasks.export import export, labeled_table, source_run

EXPERTS = [("b", "bbbbbbbbbbbb"), ("a", "aaaaaaaaaaaa")]  # router output order: b first, not alphabetical
RMS = [("judge", "111111111111", 1.0), ("exact", "222222222222", 0.5)]
SHARDS = {0: ["q0", "q1"], 1: ["q2"]}
QUERIES = {"q0": ("What is 2 + 3?", "train", ["math"]), "q1": ("Name a planet.", "test", ["trivia"]),
           "q2": ("Sort 3 1 2.", "train", ["coding", "math"])}
LABELS_FP = "abcdef012345"


def score(rm: str, expert: str, q: str) -> float:
    return {"judge": -1.0, "exact": 1.0}[rm] * (1 + int(q[1:])) + (0.5 if expert == "a" else 0.0)


def build_store(root: Path, generated: bool = True, run_id: str = "20260101T000000Z-aaaaaa",
                labels_fp: str = LABELS_FP, status: str = "completed") -> Store:
    """Queries' labels, generation and score cells and a run manifest, as the label flow would write them."""
    store = Store(str(root))
    for shard, qids in SHARDS.items():
        for e, efp in EXPERTS:
            if generated:
                store.write_table(generation_path(e, efp, shard), pa.table({
                    "query_id": qids, "response": [f"{e} answers {q}" for q in qids],
                    "prompt_tokens": pa.array([3] * len(qids), pa.int32()),
                    "new_tokens": pa.array([2] * len(qids), pa.int32()), "finish_reason": ["stop"] * len(qids)}),
                    GENERATIONS, {"fingerprint": efp})
            for rm, rfp, _ in RMS:
                store.write_table(score_path(rm, rfp, e, efp, shard), pa.table({
                    "query_id": qids, "score": [score(rm, e, q) for q in qids],
                    "flag": pa.nulls(len(qids), pa.string())}), SCORES, {"fingerprint": rfp})
    ids = sorted(QUERIES)
    rewards = [[0.1 * i, 0.2 * i] for i in range(len(ids))]  # per expert, in EXPERTS order
    store.write_table(labels_path(labels_fp), pa.table({
        "query_id": ids, "text": [QUERIES[q][0] for q in ids], "split": [QUERIES[q][1] for q in ids],
        "tags": [QUERIES[q][2] for q in ids], "rewards": rewards, "soft": [[0.4, 0.6]] * 3,
        "target": [[0.3, 0.7]] * 3}), LABELS,
        {"fingerprint": labels_fp, "experts": [e for e, _ in EXPERTS], "expert_fingerprints": dict(EXPERTS),
         "scores": [{"rm": rm, "rm_fp": fp, "weight": w} for rm, fp, w in RMS]})
    m = RunManifest(run_id=run_id, flow="label" if generated else "train", status=status,
                    started=run_id, shards=list(SHARDS), labels=labels_fp,
                    generate=[StageRecord(name=e, fingerprint=fp) for e, fp in EXPERTS] if generated else [])
    store.write_json(run_manifest_path(run_id), m.model_dump(mode="json"))
    return store


COLUMNS = ["query_id", "text", "tags", "split",
           "response:b", "score:judge:b", "score:exact:b", "soft:b", "target:b", "reward:b",
           "response:a", "score:judge:a", "score:exact:a", "soft:a", "target:a", "reward:a"]


def check(df: pl.DataFrame, responses: bool = True) -> None:
    """The tidy table of build_store's data, whatever format it came back from."""
    assert df.columns == (COLUMNS if responses else [c for c in COLUMNS if not c.startswith("response:")])
    rows = {r["query_id"]: r for r in df.to_dicts()}
    assert sorted(rows) == ["q0", "q1", "q2"]
    q2 = rows["q2"]
    assert (q2["text"], q2["split"], list(q2["tags"])) == ("Sort 3 1 2.", "train", ["coding", "math"])
    assert q2["score:judge:a"] == score("judge", "a", "q2") and q2["score:exact:b"] == score("exact", "b", "q2")
    assert (q2["soft:b"], q2["soft:a"], q2["target:b"], q2["target:a"]) == (0.4, 0.6, 0.3, 0.7)
    assert q2["reward:b"] == pytest.approx(0.2) and q2["reward:a"] == pytest.approx(0.4)
    if responses:
        assert q2["response:a"] == "a answers q2" and rows["q0"]["response:b"] == "b answers q0"


def test_parquet_round_trip(tmp_path):
    store = build_store(tmp_path / "store")
    out = export(store, tmp_path / "out" / "labels.parquet")
    assert (out.format, out.path, out.rows, out.labels) == ("parquet", str(tmp_path / "out" / "labels.parquet"), 3,
                                                            LABELS_FP)
    assert out.experts == ["b", "a"] and out.columns == COLUMNS
    check(pl.read_parquet(out.path))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "labels.parquet"]  # no temp file left


def test_jsonl_into_a_directory(tmp_path):
    store = build_store(tmp_path / "store")
    out = export(store, tmp_path / "out", fmt="jsonl")
    assert out.path == str(tmp_path / "out" / f"labels-{LABELS_FP}.jsonl")
    lines = Path(out.path).read_text().splitlines()
    assert len(lines) == 3 and list(json.loads(lines[0])) == COLUMNS  # key order = column order
    check(pl.read_ndjson(out.path))


def test_hf_folder_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    store = build_store(tmp_path / "store")
    folder = tmp_path / "hf"
    export(store, folder, fmt="hf")
    dd = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert sorted(dd) == ["test", "train"] and (dd["train"].num_rows, dd["test"].num_rows) == (2, 1)
    assert dd["train"].column_names == COLUMNS
    check(pl.concat([pl.from_arrow(dd[s].data.table) for s in ("train", "test")]))
    files = sorted(str(p) for p in (folder / "data").glob("*.parquet"))
    flat = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))["train"]
    assert flat.num_rows == 3
    # exporting again replaces the earlier export only with overwrite; a folder of something else never
    with pytest.raises(InputError, match=r"hf: holds an earlier hf export; pass --overwrite to replace it"):
        export(store, folder, fmt="hf")
    export(store, folder, fmt="hf", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "data"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an earlier hf export"):
        export(store, tmp_path / "mine", fmt="hf")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_imported_scores_have_no_response_columns(tmp_path):
    store = build_store(tmp_path / "store", generated=False)
    check(labeled_table(store, source_run(store)), responses=False)


def test_which_labels(tmp_path):
    store = build_store(tmp_path / "store")
    build_store(tmp_path / "store", run_id="20260102T000000Z-bbbbbb", labels_fp="fedcba543210")
    build_store(tmp_path / "store", run_id="20260103T000000Z-cccccc", labels_fp="999999999999", status="failed")
    assert source_run(store).labels == "fedcba543210"  # the latest completed run's
    assert source_run(store, LABELS_FP).run_id == "20260101T000000Z-aaaaaa"
    assert source_run(store, "999999999999").run_id == "20260103T000000Z-cccccc"  # made only by a failed run
    with pytest.raises(InputError, match="not a labels fingerprint"):
        source_run(store, "../../etc")
    with pytest.raises(ArtifactError, match="no run in .* made them"):
        source_run(store, "000000000000")
    with pytest.raises(ArtifactError, match="no labels to export"):
        source_run(Store(str(tmp_path / "empty")))


def test_missing_cell_is_an_artifact_error(tmp_path):
    store = build_store(tmp_path / "store")
    (tmp_path / "store" / generation_path("a", "aaaaaaaaaaaa", 1)).unlink()
    with pytest.raises(ArtifactError, match=r"generations/a-aaaaaaaaaaaa/shard-00001\.parquet: missing"):
        export(store, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_format_and_suffix_must_agree(tmp_path):
    store = build_store(tmp_path / "store")
    with pytest.raises(InputError, match=r"a \.parquet file, but --format jsonl"):
        export(store, tmp_path / "x.parquet", fmt="jsonl")


def test_cli_export(tmp_path):
    build_store(tmp_path / "store")
    res = CliRunner().invoke(app, ["export", "--store", str(tmp_path / "store"), "--output",
                                   str(tmp_path / "out.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["rows"] == 3 and doc["format"] == "jsonl" and doc["columns"] == COLUMNS
    bad = CliRunner().invoke(app, ["export", "--store", str(tmp_path / "store"), "--output", str(tmp_path / "o"),
                                   "--format", "csv"])
    assert bad.exit_code == 2 and "csv" in bad.output
