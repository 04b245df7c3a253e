"""preflight on fake model directories (a config.json only: preflight never reads weights) and hand-made stores:
sources, the data columns the config names, enough training queries, the store; and `preflight_train`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.config import ConfigError, FlowConfig, TrainConfig
from schemas.errors import ArtifactError
from schemas.store import Store
from tasks.preflight import preflight, preflight_cluster, preflight_train

# 12 queries: with ids q0..q11 or hashes of the texts, data.test_fraction 0.25 leaves 8 or 9 for training, and the
# router's validation slice gets 1 or 2 of those
TEXTS = [f"What is {i} + {i}?" for i in range(12)]


def model_dir(root: Path, name: str, arch: str | None, labels: int | None = None) -> str:
    d = root / name
    d.mkdir(exist_ok=True)
    cfg: dict = {"architectures": [arch]} if arch else {}
    if labels is not None:
        cfg["id2label"] = {str(i): f"L{i}" for i in range(labels)}
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def config(tmp_path: Path, edit: Callable[[dict, Path], object] | None = None) -> FlowConfig:
    """A valid config on fake model directories; `edit(raw, tmp_path)` changes it first."""
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    lm = model_dir(tmp_path, "lm", "LlamaForCausalLM")
    raw = {"store": str(tmp_path / "store"), "data": {"path": str(data)},
           "experts": [{"name": "a", "model": lm}],
           "reward_models": [{"name": "rm", "kind": "classifier",
                              "model": model_dir(tmp_path, "rm", "BertForSequenceClassification", 1)},
                             {"name": "judge", "kind": "loglik", "model": lm}],
           "router": {"encoder": model_dir(tmp_path, "enc", "BertModel")}}
    if edit is not None:
        edit(raw, tmp_path)
    return FlowConfig.model_validate(raw)


def test_ok_reads_every_query_and_writes_nothing(tmp_path):
    assert preflight(config(tmp_path)).height == 12
    assert not (tmp_path / "store").exists()


def test_config_json_without_architectures_is_left_to_the_load(tmp_path):
    def unknown(raw, root):
        raw["reward_models"][0]["model"] = model_dir(root, "x", None)
    assert preflight(config(tmp_path, unknown)).height == 12


@pytest.mark.parametrize("change,match", [
    (lambda raw, root: raw["reward_models"][0].update(model=model_dir(root, "two", "BertForSequenceClassification",
                                                                     2)),
     r"reward_models\.0\.model: .*two: not a reward model \(architectures \[BertForSequenceClassification\], "
     r"num_labels 2; kind classifier needs"),
    (lambda raw, root: raw["reward_models"][1].update(model=raw["reward_models"][0]["model"]),
     r"reward_models\.1\.model: .*rm: not a judge LM .*kind loglik needs a causal LM"),
    (lambda raw, root: raw["experts"][0].update(model=str(root / "nowhere")),
     r"experts\.0\.model: .*nowhere: model directory not found"),
    (lambda raw, root: raw["router"].update(encoder="packaged:gpt-9"),
     r"router\.encoder: packaged:gpt-9: unknown packaged model"),
    (lambda raw, root: raw["router"].update(encoder=str(root / "gone")),
     r"router\.encoder: .*gone: model directory not found$"),
    (lambda raw, root: raw["experts"][0].update(model="org/absent"),
     r"experts\.0\.model: org/absent: not a local directory; as a Hugging Face repo id it needs a pinned `revision`"),
    (lambda raw, root: raw["experts"][0].update(model="org/absent", revision="main"),
     r"experts\.0\.model: org/absent@main: not in the local Hugging Face cache"),
    (lambda raw, root: (root / "p.txt").write_text("no placeholder") and raw["experts"][0].update(
        prompt=str(root / "p.txt")), r"experts\.0\.prompt: .*has no \{query\}"),
])
def test_bad_sources_name_the_key(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        preflight(config(tmp_path, change))


def test_a_store_that_is_not_a_zooter_store(tmp_path):
    cfg = config(tmp_path)
    stray = tmp_path / "store" / "queries" / "shard-final.parquet"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"store: .*/store/queries: not a zooter store"):
        preflight(cfg)


def _data(tmp_path: Path, name: str, rows: list[dict]) -> Callable[[dict, Path], object]:
    """An edit that points data.path at a new file of `rows` (JSONL, CSV or Parquet by the name's suffix)."""
    import polars as pl

    path = tmp_path / name
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pl.DataFrame(rows).write_csv(path)
    else:
        pl.DataFrame(rows).write_parquet(path)
    return lambda raw, _root: raw["data"].update(path=str(path))


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.parquet"])
def test_every_named_column_is_a_column_of_the_file(tmp_path, name):
    rows = [{"id": f"q{i}", "text": t, "tag": "math"} for i, t in enumerate(TEXTS)]
    use = _data(tmp_path, name, rows)

    def edit(**data):
        return lambda raw, root: (use(raw, root), raw["data"].update(**data))
    assert preflight(config(tmp_path, edit(id_field="id", tags_field="tag"))).height == 12
    for key, name_ in (("tags_field", "tags"), ("reference_field", "answer"), ("id_field", "qid"),
                       ("text_field", "question")):
        with pytest.raises(ConfigError, match=rf"{name}: data\.{key} '{name_}' is not a column of the file "
                                              r"\(columns found: id, text, tag\)$"):
            preflight(config(tmp_path, edit(**{key: name_})))


def test_a_jsonl_column_may_first_appear_late_but_within_the_limit(tmp_path):
    rows = [{"text": t} for t in TEXTS] + [{"text": "Name a planet.", "ref": "Mars"}]
    use = _data(tmp_path, "d.jsonl", rows)
    assert preflight(config(tmp_path, lambda raw, root: (use(raw, root), raw["data"].update(
        reference_field="ref")))).height == 13
    with pytest.raises(ConfigError, match=r"data\.reference_field 'ref' is not a column of the file \(columns found: "
                                          r"text\)"):
        preflight(config(tmp_path, lambda raw, root: (use(raw, root), raw["data"].update(reference_field="ref",
                                                                                          limit=12))))


@pytest.mark.parametrize("edit,match", [
    (lambda raw, root: raw["data"].update(limit=3), r"data\.test_fraction 0\.25 leaves 2 of 3 for training"),
    (lambda raw, root: raw["data"].update(test_fraction=0.95), r"data\.test_fraction 0\.95 leaves 2 of 12 for "
                                                               r"training"),
])
def test_too_few_training_queries_for_the_validation_slice(tmp_path, edit, match):
    with pytest.raises(ConfigError, match=rf"q\.jsonl: too few queries to train the router: {match}, and none of "
                                          r"them falls into the router's validation slice \(about 15% of them, by a "
                                          r"hash of the id; none below 8\); add queries or lower data\.test_fraction"):
        preflight(config(tmp_path, edit))


def test_queries_already_in_the_store_count_with_their_split(tmp_path):
    """The flow trains on every shard of the store: stored queries count, with the split they were stored with."""
    import polars as pl

    from schemas.config import DataConfig
    from tasks.ingest import read_queries, write_shards

    cfg = config(tmp_path, lambda raw, root: raw["data"].update(limit=3))
    stored = read_queries(DataConfig(path=str(tmp_path / "q.jsonl")))
    one_test = pl.when(pl.col("query_id") == stored["query_id"][0]).then(pl.lit("test")).otherwise(pl.lit("train"))
    write_shards(Store(cfg.store.url), stored.with_columns(one_test.alias("split")), 16)
    assert preflight(cfg).height == 3  # 3 new queries, 11 stored ones for training, one held out
    alltrain = tmp_path / "alltrain"
    write_shards(Store(str(alltrain)), stored.with_columns(pl.lit("train").alias("split")), 16)
    with pytest.raises(ConfigError, match=r"no held-out queries: data\.test_fraction 0\.25 leaves all 12 for "
                                          r"training"):
        preflight(config(tmp_path, lambda raw, root: raw.update(store=str(alltrain))))
    other = tmp_path / "other"
    write_shards(Store(str(other)), stored.with_columns(pl.lit("test").alias("split")), 16)
    with pytest.raises(ConfigError, match=r"too few queries to train the router: data\.test_fraction 0\.25 leaves 0 "
                                          r"of 12"):
        preflight(config(tmp_path, lambda raw, root: raw.update(store=str(other))))


def test_a_corrupted_champion_record_fails_before_any_model(tmp_path):
    cfg = config(tmp_path)
    Store(cfg.store.url).write_bytes("champion.json", b"{")
    with pytest.raises(ArtifactError, match=r"champion\.json: corrupted champion record \(Invalid JSON"):
        preflight(cfg)


def test_a_store_that_is_a_file(tmp_path):
    (tmp_path / "store").write_text("x")
    with pytest.raises(ConfigError, match=r"store .*/store: a file, not a directory"):
        preflight(config(tmp_path))


# --- `zooter train` over imported scores ------------------------------------------------------------------------

def _train_config(tmp_path: Path, rows: list[dict], **changes) -> TrainConfig:
    import polars as pl

    from tasks.import_scores import import_scores

    store = Store(str(tmp_path / "store"))
    import_scores(store, pl.DataFrame(rows, schema={"query_id": pl.String, "text": pl.String, "expert": pl.String,
                                                    "score": pl.Float64, "split": pl.String,
                                                    "tags": pl.List(pl.String)}))
    return TrainConfig.model_validate({"store": store.url, "router": {"encoder": model_dir(tmp_path, "enc",
                                                                                            "BertModel")},
                                       **changes})


def _scores(n: int, score=lambda i, e: 1.0) -> list[dict]:
    return [{"query_id": f"q{i}", "text": t, "expert": e, "score": score(i, e), "split": None, "tags": []}
            for i, t in enumerate(TEXTS[:n]) for e in ("a", "b")]


def test_train_preflight_counts_missing_and_nonfinite_scores(tmp_path):
    rows = [r for r in _scores(12, lambda i, e: float("nan") if (i, e) == (1, "b") else 1.0)
            if (r["query_id"], r["expert"]) != ("q2", "a")]  # a missing (query, expert) pair
    with pytest.warns(UserWarning, match=r"imports/imported\.json: of 24 \(query, expert\) pairs, 1 have no score "
                                         r"and 1 had a NaN/inf score"):
        rec = preflight_train(_train_config(tmp_path, rows))
    assert rec.queries == 12 and rec.experts[0][0] == "a"


def test_train_preflight_refuses_too_few_scored_queries(tmp_path):
    with pytest.raises(ConfigError, match=r"imports/imported\.json: too few queries to train the router: "
                                          r"test_fraction 0\.25 leaves \d of 3 for training.*lower test_fraction$"):
        preflight_train(_train_config(tmp_path, _scores(3)))


def test_train_preflight_refuses_an_import_without_a_usable_score(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(ArtifactError, match=r"imports/imported\.json: no query has a "
                                                                     r"usable score \(0 missing, 24 NaN/inf of 24\)"):
        preflight_train(_train_config(tmp_path, _scores(12, lambda i, e: float("inf"))))


def test_train_preflight_names_a_missing_import(tmp_path):
    cfg = _train_config(tmp_path, _scores(12), source="other")
    with pytest.raises(ConfigError, match=r"no import named 'other'"):
        preflight_train(cfg)


def test_train_preflight_names_a_missing_score_cell(tmp_path):
    cfg = _train_config(tmp_path, _scores(12))
    cell = next((tmp_path / "store" / "scores").rglob("shard-00000.parquet"))
    cell.unlink()
    with pytest.raises(ArtifactError, match=rf"{cell}: missing; run `zooter import-scores` again"):
        preflight_train(cfg)


def test_an_s3_model_prefix_without_objects_names_the_key(tmp_path, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])

    def s3_rm(raw, root):
        raw["reward_models"][0]["model"] = "s3://zooter/no-such-model/"
    with pytest.raises(ConfigError, match=r"^reward_models\.0\.model: s3://zooter/no-such-model/: no objects under "
                       r"this prefix$"):
        preflight(config(tmp_path, s3_rm))


@pytest.mark.parametrize("store,nodes,refused", [
    ("local", 2, True), ("file", 3, True), ("local", 1, False), ("s3://bkt/zooter", 2, False),
])
def test_a_local_store_on_a_multi_node_cluster_is_refused(tmp_path, store, nodes, refused):
    url = {"local": str(tmp_path / "store"), "file": f"file://{tmp_path}/store"}.get(store, store)
    cfg = config(tmp_path, lambda raw, root: raw.update(store=url))
    if not refused:
        preflight_cluster(cfg, nodes)
        return
    with pytest.raises(ConfigError, match=rf"^store\.url: {url} is a local path, but the Ray cluster has {nodes} "
                       r"alive nodes: each node would write its cells to its own disk; use an s3:// store$"):
        preflight_cluster(cfg, nodes)
