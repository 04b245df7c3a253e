"""Bad input (issue #7), through the real CLI: `zooter run CONFIG` exits 2 with exactly one `error:` line that
names the file:line or the config key, before Ray starts or any model loads, and the store is left as it was."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _edit(path: Path, fn: Callable[[dict], object]) -> None:
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg))


def _config(fn: Callable[[dict], object]) -> Callable[[Path, dict], None]:
    """A case that edits the config (loaded as YAML, written back)."""
    return lambda path, _models: _edit(path, fn)


def _line(raw: bytes) -> Callable[[Path, dict], None]:
    """A case that appends one raw line (line 13: the tiny query file has 12) to the query file."""
    def setup(path: Path, _models: dict) -> None:
        with open(path.parent / "queries.jsonl", "ab") as f:
            f.write(raw + b"\n")
    return setup


def _parquet_without_text(path: Path, _models: dict) -> None:
    pl.DataFrame({"id": ["q0"], "question": ["What is 2 + 3?"]}).write_parquet(path.parent / "queries.parquet")
    _edit(path, lambda c: c["data"].update(path=str(path.parent / "queries.parquet")))


def _foreign_store_cell(path: Path, _models: dict) -> None:
    cell = path.parent / "store" / "queries" / "shard-00000.parquet"
    cell.parent.mkdir(parents=True)
    pl.DataFrame({"query_id": ["q0"], "question": ["What is 2 + 3?"]}).write_parquet(cell)


def _broken_store_cell(path: Path, _models: dict) -> None:
    cell = path.parent / "store" / "queries" / "shard-00000.parquet"
    cell.parent.mkdir(parents=True)
    cell.write_bytes(b"PAR1 this is not a parquet file")


def _id_in_store_with_other_text(path: Path, _models: dict) -> None:
    from schemas.artifacts import QUERIES, queries_path
    from schemas.store import Store

    table = pa.table({"query_id": ["q0"], "text": ["What is 7 + 7?"], "input_tags": [["math"]], "reference": ["14"],
                      "split": [None], "source_line": [1]})
    Store(str(path.parent / "store")).write_table(queries_path(0), table, QUERIES)


def _prompt_without_query(path: Path, _models: dict) -> None:
    (path.parent / "bad_prompt.txt").write_text("Answer briefly.\n")
    _edit(path, lambda c: c["experts"][0].update(prompt=str(path.parent / "bad_prompt.txt")))


def _unsupported_data_type(path: Path, _models: dict) -> None:
    (path.parent / "queries.txt").write_text("What is 2 + 3?\n")
    _edit(path, lambda c: c["data"].update(path=str(path.parent / "queries.txt")))


def _invalid_yaml(path: Path, _models: dict) -> None:
    path.write_text(path.read_text() + "aggregate: {beta: [0.3\n")


def _s3_without_credentials(path: Path, _models: dict) -> None:
    _edit(path, lambda c: c.update(store="s3://zooter/bad-input"))


def _rm(index: int, model: str) -> Callable[[Path, dict], None]:
    return lambda path, models: _edit(path, lambda c: c["reward_models"][index].update(model=str(models[model])))


# case -> (setup(config path, tiny models), regex the single `error:` line must match)
CASES: dict[str, tuple[Callable[[Path, dict], None], str]] = {
    # the query file: file:line
    "malformed JSONL line": (_line(b'{"id": "bad", "text": '), r"queries\.jsonl:13: malformed JSON"),
    "missing text field": (_line(b'{"id": "q99"}'), r"queries\.jsonl:13: missing field 'text' \(data\.text_field\)"),
    "empty query": (_line(b'{"id": "q99", "text": "   "}'),
                    r"queries\.jsonl:13: field 'text' must be a non-empty string"),
    "non-UTF-8 bytes": (_line(b'{"id": "q99", "text": "caf\xe9"}'), r"queries\.jsonl:13: not valid UTF-8"),
    "duplicate id, different text": (_line(b'{"id": "q0", "text": "What is 4 + 4?"}'),
                                     r"queries\.jsonl:13: id 'q0' was used at line 1 with a different text"),
    "tags of wrong type": (_line(b'{"id": "q99", "text": "Hi", "tags": 3}'),
                           r"queries\.jsonl:13: tags must be a string or a list of strings, got int"),
    "parquet without text column": (_parquet_without_text, r"queries\.parquet:1: missing field 'text'"),
    "unsupported data file type": (_unsupported_data_type, r"queries\.txt: unsupported data file type '\.txt'"),
    "missing data file": (_config(lambda c: c["data"].update(path="/nonexistent.jsonl")),
                          r"/nonexistent\.jsonl: data file not found \(data\.path\)"),
    # the store: cell URI + columns, or file:line of the clashing query
    "store cell with a foreign schema": (
        _foreign_store_cell, r"store: .*/store/queries/shard-00000\.parquet: not a queries cell "
        r"\(columns query_id: \w+, question: \w+; expected query_id: string, text: string, .*\)$"),
    "store cell with a broken footer": (_broken_store_cell,
                                        r"store: .*/store/queries/shard-00000\.parquet: unreadable Parquet"),
    "id in the store with another text": (
        _id_in_store_with_other_text, r"queries\.jsonl:1: id 'q0' is already in the store .*store with a different"),
    "s3 store without credentials": (_s3_without_credentials,
                                     r"store\.options: s3://zooter/bad-input: no S3 credentials"),
    # the config: file and key
    "invalid YAML": (_invalid_yaml, r"config\.yaml:\d+: invalid YAML"),
    "unknown config key": (_config(lambda c: c.update(colour="blue")),
                           r"config\.yaml: colour: Extra inputs are not permitted"),
    "beta above 1": (_config(lambda c: c.update(aggregate={"beta": 1.5})),
                     r"aggregate\.beta: Input should be less than or equal to 1"),
    "beta below 0": (_config(lambda c: c.update(aggregate={"beta": -0.1})),
                     r"aggregate\.beta: Input should be greater than or equal to 0"),
    "temperature 0": (_config(lambda c: c.update(aggregate={"temperature": 0})),
                      r"aggregate\.temperature: Input should be greater than 0"),
    "negative temperature": (_config(lambda c: c.update(aggregate={"temperature": -1.0})),
                             r"aggregate\.temperature: Input should be greater than 0"),
    "zero experts": (_config(lambda c: c.update(experts=[])), r"experts: at least one expert is required"),
    "two experts with the same name": (_config(lambda c: c["experts"][1].update(name="a")),
                                       r"experts: duplicate name\(s\) \['a'\]"),
    "expert name with ../": (_config(lambda c: c["experts"][0].update(name="../a")), r"experts\.0\.name: .*'\.\./a'"),
    "missing model path": (_config(lambda c: c["experts"][0].update(model="/nonexistent/model")),
                           r"experts\.0\.model: /nonexistent/model: model directory not found"),
    "unknown packaged model": (_config(lambda c: c["experts"][0].update(model="packaged:gpt-9")),
                               r"experts\.0\.model: packaged:gpt-9: unknown packaged model"),
    "prompt template without {query}": (_prompt_without_query,
                                        r"experts\.0\.prompt: prompt template .*bad_prompt\.txt: has no \{query\}"),
    "reward model that is not a scorer": (
        _rm(1, "lm_a"), r"reward_models\.1\.model: .*lm_a: not a reward model \(architectures \[LlamaForCausalLM\], "
        r"num_labels 2; kind classifier needs a \*ForSequenceClassification with num_labels 1\)"),
    "loglik judge that is not a causal LM": (
        _rm(0, "rm"), r"reward_models\.0\.model: .*rm: not a judge LM \(architectures "
        r"\[BertForSequenceClassification\], num_labels 1; kind loglik needs a causal LM"),
}


def snapshot(root: Path) -> dict[str, str] | None:
    """relative path -> sha256 of every file under root; None when root does not exist."""
    if not root.exists():
        return None
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if Ray is joined or a model is built or resolved."""
    import cluster.backends
    import cluster.models
    import flows.label
    import tasks.generate
    import tasks.score

    def boom(*_a, **_k):
        raise AssertionError("Ray or a model was touched before the input error")

    monkeypatch.setattr(flows.label, "connect", boom)
    monkeypatch.setattr(cluster.models, "resolve", boom)
    for mod in (cluster.backends, tasks.generate):
        monkeypatch.setattr(mod, "generator_builder", boom)
    for mod in (cluster.backends, tasks.score):
        monkeypatch.setattr(mod, "scorer_builder", boom)


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """No AWS credentials anywhere botocore looks (instance metadata is off: tests/conftest.py)."""
    import os

    for k in list(os.environ):
        if k.startswith("AWS_") and k not in ("AWS_EC2_METADATA_DISABLED", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_fast(tiny_config, tiny_models, no_models, no_aws_credentials, case):
    setup, match = CASES[case]
    path = tiny_config()
    setup(path, tiny_models)
    store = path.parent / "store"
    before = snapshot(store)
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 2, res.output
    # exactly one line starting with "error:" (a shared Ray session may print actor logs around it)
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert re.search(match, errors[0]), errors[0]
    assert snapshot(store) == before  # for most cases: no store before, none after


def test_cases_cover_issue_7():
    assert len(CASES) >= 15


def test_s3_credentials_from_options_or_environment(monkeypatch, no_aws_credentials):
    from schemas.config import ConfigError, StoreConfig
    from tasks.preflight import _s3_credentials

    url = "s3://zooter/x"
    _s3_credentials(StoreConfig(url=url, options={"key": "k", "secret": "s"}))
    _s3_credentials(StoreConfig(url=url, options={"anon": "true"}))
    _s3_credentials(StoreConfig(url="/local/dir"))
    with pytest.raises(ConfigError, match="store.options"):
        _s3_credentials(StoreConfig(url=url, options={"key": "k"}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    _s3_credentials(StoreConfig(url=url))


def test_existing_store_passes_preflight(tiny_config):
    """A store written by ingest is not mistaken for a foreign one, and preflight writes nothing."""
    from schemas.config import load_config
    from schemas.store import Store
    from tasks.ingest import read_queries, write_shards
    from tasks.preflight import preflight

    cfg = load_config(tiny_config())
    write_shards(Store(cfg.store.url), read_queries(cfg.data), cfg.data.shard_size)
    before = snapshot(Path(cfg.store.url))
    assert preflight(cfg).height == 12
    assert snapshot(Path(cfg.store.url)) == before


def test_long_query_is_left_truncated_not_a_crash(tiny_models):
    """A prompt longer than the model's context keeps its end and still gets an answer."""
    from cluster.hf import HFGenerator

    g = HFGenerator(str(tiny_models["lm_a"]), dtype="float32")
    assert g.max_context == 512
    long = " ".join(["filler"] * 3000) + " What is 2 + 3?"
    assert len(g.tok(long, add_special_tokens=False)["input_ids"]) > g.max_context
    out = g.generate([long, "short"], max_new_tokens=4, batch_size=2)
    assert len(out) == 2 and all(isinstance(o.response, str) for o in out)
    assert out[0].prompt_tokens == g.max_context - 4  # cut to fit prompt + answer in the context
    assert out[0].prompt_tokens + out[0].new_tokens <= g.max_context
    assert 0 < out[0].new_tokens <= 4
    full = g.tok(long, add_special_tokens=False)["input_ids"]
    assert g.tok(long, add_special_tokens=False, truncation=True, max_length=16)["input_ids"] == full[-16:]
