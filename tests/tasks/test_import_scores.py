"""import-scores: RouterDC tables and long tables become queries + score cells the pipeline reads unchanged."""

import json

import polars as pl
import pytest

from schemas.artifacts import QUERIES, SCORES, import_path, queries_path, score_path
from schemas.errors import ArtifactError, InputError
from schemas.store import Store
from tasks.import_scores import ROUTERDC_BINARY, import_scores, read_import, read_long, read_routerdc

EXPERTS = ["org/model-a", "org/model-b"]


def routerdc_dir(tmp_path, n=6):
    d = tmp_path / "routerdc"
    d.mkdir()
    for task, sep in (("mmlu", "_"), ("gsm8k", "-")):
        for split in ("train", "test"):
            rows = [{"question": f"{task} {split} question {i}?",
                     "scores": {"org/model-a": 0.4 * (i % 2), "org/model-b": 0.25}} for i in range(n)]
            (d / f"{task}{sep}{split}.json").write_text(json.dumps(rows))
    return d


def test_routerdc_tables_become_credits_with_task_tags_and_splits(tmp_path):
    long = read_routerdc(routerdc_dir(tmp_path))
    assert long.height == 2 * 2 * 6 * 2
    assert set(long["split"]) == {"train", "test"} and set(long["expert"]) == set(EXPERTS)
    mmlu = long.filter(pl.col("tags").list.first() == "mmlu")
    assert "mmlu" in ROUTERDC_BINARY
    assert set(mmlu["score"]) == {0.0, 1.0}  # binary metric: any positive score is a correct answer
    gsm = long.filter(pl.col("tags").list.first() == "gsm8k")
    assert set(gsm["score"]) == {0.0, 0.4, 0.25}  # fraction-correct tasks keep the score
    assert long.filter(pl.col("query_id") == "mmlu/test/00003")["text"].to_list() == ["mmlu test question 3?"] * 2


def test_import_writes_queries_and_one_cell_per_expert_and_shard_once(tmp_path):
    store = Store(str(tmp_path / "store"))
    long = read_routerdc(routerdc_dir(tmp_path))
    rec = import_scores(store, long, "rdc", shard_size=10)
    assert rec.queries == 24 and rec.shards == [0, 1, 2] and [e for e, _ in rec.experts] == EXPERTS
    q = pl.concat([pl.from_arrow(store.read_table(queries_path(s), QUERIES)) for s in rec.shards])
    assert q.height == 24 and q["split"].null_count() == 0 and q["input_tags"].list.len().min() == 1
    cells = 0
    for s in rec.shards:
        for e, efp in rec.experts:
            t = store.read_table(score_path("rdc", rec.rm_fingerprint, e, efp, s), SCORES)
            assert t.num_rows == store.read_table(queries_path(s), QUERIES).num_rows
            cells += 1
    assert cells == 6
    mtime = (tmp_path / "store" / score_path("rdc", rec.rm_fingerprint, *rec.experts[0], 0)).stat().st_mtime_ns
    again = import_scores(store, long, "rdc", shard_size=10)  # same table: nothing new is written
    assert again.rm_fingerprint == rec.rm_fingerprint and again.shards == rec.shards
    assert (tmp_path / "store" / score_path("rdc", rec.rm_fingerprint, *rec.experts[0], 0)).stat().st_mtime_ns \
        == mtime
    assert read_import(store, "rdc") == again


def test_long_csv_with_tasks_and_splits(tmp_path):
    p = tmp_path / "scores.csv"
    p.write_text("query,expert,score,task,split\nWhat is 1+1?,a,1,math,train\nWhat is 1+1?,b,0,math,train\n"
                 "Say hi,a,0.2,chat,test\nSay hi,b,0.9,chat,test\n")
    long = read_long(p)
    assert long.height == 4 and long["tags"].to_list()[0] == ["math"] and long["split"].to_list()[2] == "test"
    assert long["query_id"].n_unique() == 2  # ids from the text


@pytest.mark.parametrize("body, message", [
    ("query,expert\nq,a\n", "missing column(s) ['score']"),
    ("query,expert,score,split\nq,a,1,dev\n", "scores.csv:2: split must be 'train' or 'test'"),
    ("query,expert,score\nq,a,1\nq,a,2\n", "has 2 scores for expert 'a'"),
    ("query,expert,score\nq,a,high\n", "column 'score' must be numeric"),
    ("query,expert,score\n,a,1\n", "scores.csv:2: empty query or expert"),
    ("query,expert,score\n", "scores.csv: no rows, nothing to import"),
])
def test_bad_long_tables_name_the_problem(tmp_path, body, message):
    p = tmp_path / "scores.csv"
    p.write_text(body)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        read_long(p)


def test_csv_ids_stay_as_written_and_float_ids_are_refused(tmp_path):
    p = tmp_path / "scores.csv"
    p.write_text("query_id,query,expert,score\n007,q,a,1\n007,q,b,0.5\n")
    assert read_long(p)["query_id"].to_list() == ["007", "007"]
    p = tmp_path / "scores.jsonl"
    p.write_text('{"query_id": 1.0, "query": "q", "expert": "a", "score": 1}\n')
    with pytest.raises(InputError, match="scores.jsonl: column 'query_id' is Float64; ids must be strings or int"):
        read_long(p)


def test_bad_routerdc_folder_and_import_name(tmp_path):
    with pytest.raises(InputError, match="no RouterDC tables"):
        read_routerdc(tmp_path)
    (tmp_path / "mmlu_train.json").write_text("[]")
    with pytest.raises(InputError, match="the RouterDC tables hold no scores"):
        read_routerdc(tmp_path)
    with pytest.raises(InputError, match="--name"):
        import_scores(Store(str(tmp_path / "s")), read_routerdc(routerdc_dir(tmp_path)), "../escape")


def test_import_record_lives_at_its_path_and_a_missing_or_corrupted_one_says_so(tmp_path):
    store = Store(str(tmp_path / "s"))
    with pytest.raises(InputError, match=r"imports/rdc.json: no import named 'rdc'"):
        read_import(store, "rdc")
    rec = import_scores(store, read_routerdc(routerdc_dir(tmp_path)), "rdc")
    assert store.read_json(import_path("rdc")) == rec.to_json() and import_path("rdc") == "imports/rdc.json"
    store.write_bytes(import_path("rdc"), b'{"name": "rdc"}')
    with pytest.raises(ArtifactError, match=r"imports/rdc.json: corrupted import record \(rm_fingerprint: Field "):
        read_import(store, "rdc")
