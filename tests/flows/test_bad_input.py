"""Bad input (issues #7 and #15), through the real CLI: `zooter run CONFIG` exits 2 with exactly one `error:` line
that names the file:line or the config key, before Ray starts or any model loads, and the store is left as it was."""

from __future__ import annotations

import hashlib
import json
import os
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


def _text(fn: Callable[[str], str]) -> Callable[[Path, dict], None]:
    """A case that edits the config's YAML text (what `_edit` cannot write: duplicate keys, bytes)."""
    return lambda path, _models: path.write_text(fn(path.read_text()))


def _config_bytes(path: Path, _models: dict) -> None:
    path.write_bytes(path.read_bytes() + b"# caf\xe9 (Latin-1)\n")


def _queries(n: int) -> Callable[[Path, dict], None]:
    """A case whose query file holds only the first n tiny queries."""
    def setup(path: Path, _models: dict) -> None:
        data = path.parent / "queries.jsonl"
        data.write_text("".join(data.read_text().splitlines(keepends=True)[:n]))
    return setup


def _csv_data(path: Path, _models: dict) -> None:
    (path.parent / "queries.csv").write_text("id,text,tags\nq0,What is 2 + 3?,math\n")
    _edit(path, lambda c: c["data"].update(path=str(path.parent / "queries.csv"), reference_field="answer"))


def _parquet_data(path: Path, _models: dict) -> None:
    pl.DataFrame({"id": ["q0"], "text": ["What is 2 + 3?"]}).write_parquet(path.parent / "queries.parquet")
    _edit(path, lambda c: c["data"].update(path=str(path.parent / "queries.parquet")))


def _store_file(path: Path, _models: dict) -> None:
    (path.parent / "store").write_text("not a folder\n")


def _store_under_file(path: Path, _models: dict) -> None:
    (path.parent / "store").write_text("not a folder\n")
    _edit(path, lambda c: c.update(store=str(path.parent / "store" / "sub")))


def _champion(raw: bytes) -> Callable[[Path, dict], None]:
    """A case with a store whose champion.json holds `raw`."""
    def setup(path: Path, _models: dict) -> None:
        (path.parent / "store").mkdir()
        (path.parent / "store" / "champion.json").write_bytes(raw)
    return setup


def _expert(**update) -> Callable[[Path, dict], None]:
    return _config(lambda c: c["experts"][0].update(**update))


def _config_path_is(kind: str) -> Callable[[Path, dict], None]:
    """A case where the config path is a directory or a FIFO instead of a file."""
    def setup(path: Path, _models: dict) -> None:
        path.unlink()
        path.mkdir() if kind == "dir" else os.mkfifo(path)
    return setup


def _yaml_value(key: str, text: str) -> Callable[[Path, dict], None]:
    """A case that writes `key: text` as YAML text (what yaml.safe_dump would quote: `1e9` is text to YAML 1.1)."""
    def setup(path: Path, _models: dict) -> None:
        lines = path.read_text().splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
        indent = lines[at][:len(lines[at]) - len(lines[at].lstrip())]
        lines[at] = f"{indent}{key}: {text}\n"
        path.write_text("".join(lines))
    return setup


def _openai(**update) -> Callable[[Path, dict], None]:
    return _expert(backend="openai", model="served-x", **update)


INF, NAN = float("inf"), float("nan")
KEY = "sk-zooter-planted-0123456789"  # a key pasted into a URL: the error must not repeat it


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
    "parquet without text column": (_parquet_without_text, r"queries\.parquet: data\.text_field 'text' is not a "
                                    r"column of the file \(columns found: id, question\)"),
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
    # issue 15, configs: no float is NaN/inf; no key twice; no empty path, URL, model or column; UTF-8 only
    "aggregate temperature .inf": (_config(lambda c: c.update(aggregate={"temperature": INF})),
                                   r"config\.yaml: aggregate\.temperature: Input should be a finite number"),
    "reward weight .nan": (_config(lambda c: c["reward_models"][1].update(weight=NAN)),
                           r"config\.yaml: reward_models\.1\.weight: Input should be a finite number"),
    "aggregate beta .nan": (_config(lambda c: c.update(aggregate={"beta": NAN})),
                            r"aggregate\.beta: Input should be a finite number"),
    "tag temperature .inf": (_config(lambda c: c.update(aggregate={"tag_temperature": INF})),
                             r"aggregate\.tag_temperature: Input should be a finite number"),
    "sampling temperature .inf": (_expert(sampling={"temperature": INF}),
                                  r"experts\.0\.sampling\.temperature: Input should be a finite number"),
    "router lr .nan": (_config(lambda c: c["router"].update(lr=NAN)),
                       r"router\.lr: Input should be a finite number"),
    "test fraction .nan": (_config(lambda c: c["data"].update(test_fraction=NAN)),
                           r"data\.test_fraction: Input should be a finite number"),
    "actor CPUs .inf": (_expert(resources={"num_cpus": INF}),
                        r"experts\.0\.resources\.num_cpus: Input should be a finite number"),
    "store backoff .inf": (_config(lambda c: c.update(store={"url": c["store"], "backoff_s": INF})),
                           r"store\.backoff_s: Input should be a finite number"),
    "store given twice": (_text(lambda t: t + f"store: {t.split('store: ')[1].splitlines()[0]}-2\n"),
                          r"config\.yaml:\d+: invalid YAML \(duplicate key 'store', first at line \d+\)"),
    "data key given twice": (_text(lambda t: t.replace("data:\n", "data:\n  shard_size: 2\n")),
                             r"config\.yaml:\d+: invalid YAML \(duplicate key 'shard_size', first at line \d+\)"),
    "config not UTF-8": (_config_bytes, r"config\.yaml: not UTF-8 \(byte \d+, line \d+: .*\); save it as UTF-8"),
    "empty store": (_config(lambda c: c.update(store="")), r"config\.yaml: store\.url: must not be empty$"),
    "blank store": (_config(lambda c: c.update(store="  ")), r"config\.yaml: store\.url: must not be empty$"),
    "s3 store without a bucket": (_config(lambda c: c.update(store="s3://")),
                                  r"store\.url: 's3://' names no bucket \(use s3://bucket/prefix\)"),
    "s3 store with an empty bucket": (_config(lambda c: c.update(store="s3:///zooter")),
                                      r"store\.url: 's3:///zooter' names no bucket"),
    "empty data path": (_config(lambda c: c["data"].update(path="")), r"data\.path: must not be empty$"),
    "empty expert model": (_expert(model=""), r"experts\.0\.model: must not be empty$"),
    "empty reward model": (_config(lambda c: c["reward_models"][1].update(model="")),
                           r"reward_models\.1\.model: must not be empty$"),
    "empty encoder": (_config(lambda c: c["router"].update(encoder="")), r"router\.encoder: must not be empty$"),
    "empty revision": (_expert(revision=""), r"experts\.0\.revision: must not be empty$"),
    "empty prompt": (_expert(prompt=""), r"experts\.0\.prompt: must not be empty$"),
    "empty stop string": (_expert(sampling={"stop": [""]}),
                          r"experts\.0\.sampling\.stop\.0: String should have at least 1 character"),
    "empty ray address": (_config(lambda c: c.update(ray={"address": ""})), r"ray\.address: must not be empty$"),
    "empty text field": (_config(lambda c: c["data"].update(text_field="")), r"data\.text_field: must not be empty"),
    # issue 15, configs: every column the config names is a column of the data file
    "tags field not a column": (
        _config(lambda c: c["data"].update(tags_field="tag")),
        r"queries\.jsonl: data\.tags_field 'tag' is not a column of the file \(columns found: id, text, tags, "
        r"reference\)$"),
    "reference field not a column": (_config(lambda c: c["data"].update(reference_field="answer")),
                                     r"queries\.jsonl: data\.reference_field 'answer' is not a column of the file"),
    "id field not a column": (_config(lambda c: c["data"].update(id_field="qid")),
                              r"queries\.jsonl: data\.id_field 'qid' is not a column of the file"),
    "text field not a column": (_config(lambda c: c["data"].update(text_field="question")),
                                r"queries\.jsonl: data\.text_field 'question' is not a column of the file"),
    "CSV without the reference column": (
        _csv_data, r"queries\.csv: data\.reference_field 'answer' is not a column of the file \(columns found: id, "
        r"text, tags\)"),
    "Parquet without the tags column": (
        _parquet_data, r"queries\.parquet: data\.tags_field 'tags' is not a column of the file \(columns found: "
        r"id, text\)"),
    # issue 15, small data: enough training queries for the router's validation slice, before any model loads
    "three queries": (_queries(3), r"queries\.jsonl: too few queries to train the router: data\.test_fraction 0\.25 "
                                   r"leaves \d of 3 for training, .*add queries or lower data\.test_fraction"),
    "test fraction leaves too few": (_config(lambda c: c["data"].update(test_fraction=0.9)),
                                     r"too few queries to train the router: data\.test_fraction 0\.9 leaves \d+ "
                                     r"of 12"),
    "limit leaves too few": (_config(lambda c: c["data"].update(limit=5)),
                             r"too few queries to train the router: .* of 5 for training"),
    # issue 15, store problems: one line naming the store or the object, and how to repair it
    "store is a plain file": (_store_file, r"store .*/store: a file, not a directory; give a directory"),
    "store under a plain file": (_store_under_file,
                                 r"store .*/store/sub: a file, not a directory \(.*/store is in the way\)"),
    "champion.json not JSON": (_champion(b"{not json"),
                               r"store/champion\.json: corrupted champion record \(Invalid JSON: .*\); delete it"),
    "champion.json of another shape": (_champion(json.dumps({"router": "routers/x"}).encode()),
                                       r"store/champion\.json: corrupted champion record \(evaluation: Field "
                                       r"required\); delete it and rerun"),
    "champion.json not UTF-8": (_champion(b'{"router": "caf\xe9"}'), r"store/champion\.json: corrupted champion"),
    # issue 37, numbers: every one has a finite range and a strict type (no bool or string for a number)
    "reward weight 1e308": (_config(lambda c: c["reward_models"][1].update(weight=1e308)),
                            r"reward_models\.1\.weight: Input should be less than or equal to 1000$"),
    "reward weight -1e308": (_config(lambda c: c["reward_models"][0].update(weight=-1e308)),
                             r"reward_models\.0\.weight: Input should be greater than or equal to -1000$"),
    "router seed 10**30": (_config(lambda c: c["router"].update(seed=10**30)),
                           r"router\.seed: Input should be less than or equal to 2147483647$"),
    "negative sampling seed": (_expert(sampling={"seed": -1}),
                               r"experts\.0\.sampling\.seed: Input should be greater than or equal to 0$"),
    "tagger seed 2**63": (_config(lambda c: c.update(tagger={"kind": "column", "seed": 2**63})),
                          r"tagger\.seed: Input should be less than or equal to 2147483647$"),
    "beta true": (_config(lambda c: c.update(aggregate={"beta": True})),
                  r"aggregate\.beta: Input should be a valid number, got true \(a boolean\)$"),
    "beta as a string": (_config(lambda c: c.update(aggregate={"beta": "0.3"})),
                         r"aggregate\.beta: Input should be a valid number, got the string '0\.3' \(a quoted "
                         r"number: write it without quotes\)$"),
    "shard_size 1e9": (_yaml_value("shard_size", "1e9"),
                       r"data\.shard_size: Input should be a valid integer, got 1000000000\.0 \(a float\)$"),
    "shard_size quoted": (_yaml_value("shard_size", "'16'"), r"data\.shard_size: Input should be a valid integer, "
                                                             r"got the string '16' \(a quoted number: write it "
                                                             r"without quotes\)$"),
    "shard_size above the limit": (_config(lambda c: c["data"].update(shard_size=10**9)),
                                   r"data\.shard_size: Input should be less than or equal to 1000000$"),
    "epochs true": (_config(lambda c: c["router"].update(epochs=True)),
                    r"router\.epochs: Input should be a valid integer, got true \(a boolean\)$"),
    "pool size as a string": (_expert(resources={"pool_size": "2"}),
                              r"experts\.0\.resources\.pool_size: Input should be a valid integer, got the string"),
    "router lr 1e308": (_config(lambda c: c["router"].update(lr=1e308)),
                        r"router\.lr: Input should be less than or equal to 10$"),
    "aggregate temperature 1e6": (_config(lambda c: c.update(aggregate={"temperature": 1e6})),
                                  r"aggregate\.temperature: Input should be less than or equal to 1000$"),
    "expert cost 1e308": (_expert(cost=1e308), r"experts\.0\.cost: Input should be less than or equal to 1000000000$"),
    "routing lambda 1e9": (_config(lambda c: c.update(routing={"lambda": 1e9})),
                           r"routing\.lambda: Input should be less than or equal to 1000000$"),
    "actor pool 10**6": (_expert(resources={"pool_size": 10**6}),
                         r"experts\.0\.resources\.pool_size: Input should be less than or equal to 1024$"),
    "store retries 10**6": (_config(lambda c: c.update(store={"url": c["store"], "retries": 10**6})),
                            r"store\.retries: Input should be less than or equal to 100$"),
    "lease ttl 1e308": (_config(lambda c: c.update(store={"url": c["store"], "lease_ttl_s": 1e308})),
                        r"store\.lease_ttl_s: Input should be less than or equal to 604800$"),
    "ray CPUs 10**9": (_config(lambda c: c.update(ray={"num_cpus": 10**9})),
                       r"ray\.num_cpus: Input should be less than or equal to 4096$"),
    "no held-out queries": (_config(lambda c: c["data"].update(test_fraction=0)),
                            r"queries\.jsonl: no held-out queries: data\.test_fraction 0(\.0)? leaves all 12 for "
                            r"training"),
    # issue 37, names: matched in full (a trailing newline would become a store folder's name)
    "expert name with a trailing newline": (_expert(name="a\n"), r"experts\.0\.name: name 'a\\n' must match"),
    "reward model name with a trailing newline": (_config(lambda c: c["reward_models"][0].update(name="judge\n")),
                                                  r"reward_models\.0\.name: name 'judge\\n' must match"),
    "hub id with a trailing newline": (_expert(model="hf://org/name\n"),
                                       r"experts\.0\.model: 'hf://org/name\\n' is not a Hugging Face repo id"),
    "api_key_env with a trailing newline": (_openai(base_url="http://127.0.0.1:9/v1", api_key_env="KEY\n"),
                                            r"experts\.0\.api_key_env: .*must name an environment variable"),
    # issue 37, security: a key in an endpoint's query string is refused (and not echoed)
    "endpoint key in the query string": (
        _openai(base_url=f"http://127.0.0.1:9/v1?api_key={KEY}"),
        r"experts\.0: .*base_url must not carry a query string or parameters"),
    "endpoint key in a URL fragment": (_openai(base_url=f"http://127.0.0.1:9/v1#{KEY}"),
                                       r"base_url must not carry a query string"),
    # issue 37, config paths: `~` expanded or refused, the config a regular file
    "store under an unknown user's ~": (_config(lambda c: c.update(store="~zooter-no-such-user/store")),
                                        r"config\.yaml: store\.url: '~zooter-no-such-user/store': cannot expand '~'"),
    "config is a directory": (_config_path_is("dir"), r"config\.yaml: is a directory, not a config file$|"
                                                      r"config\.yaml: is a directory, not a config file \("),
    "config is a FIFO": (_config_path_is("fifo"), r"config\.yaml: is a FIFO, not a config file"),
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
    assert "\x1b" not in errors[0] and KEY not in res.output  # plain text; a pasted key is not echoed
    assert snapshot(store) == before  # for most cases: no store before, none after


def test_the_unedited_config_passes(tiny_config, no_models, no_aws_credentials):
    """The control of the table: the tiny config every case starts from validates (exit 0), so each case fails
    because of its own edit; a check that refused valid input (a bound too tight, a strict type too strict)
    fails here."""
    path = tiny_config()
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and "ok: 2 experts, 3 reward models, 12 queries" in res.output, res.output
    # the keys the strict-type cases break, given right (an int where a float goes, `1e-5`) pass
    good = tiny_config(aggregate={"beta": 0, "temperature": 2}, router={"epochs": 2, "seed": 0, "lr": 1})
    _yaml_value("shard_size", "1000")(good, {})
    _yaml_value("lr", "1e-5")(good, {})
    res = runner.invoke(app, ["validate", str(good)])
    assert res.exit_code == 0, res.output


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


# --- issue 37: every command that writes checks all its arguments first ---------------------------------------
# case -> (setup(tmp) -> argv, regex of the one `error:` line). Afterwards every file under tmp is byte-identical
# (store, outputs, configs) and nothing was added.

def _labeled_store(tmp: Path) -> str:
    from tests.tasks.test_export import build_store

    build_store(tmp / "store")
    return str(tmp / "store")


def _export(output: Callable[[Path], str], *extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["export", "--store", _labeled_store(tmp), "--output", output(tmp), *extra]


def _plot(output: Callable[[Path], str]) -> Callable[[Path], list[str]]:
    return lambda tmp: ["inspect", "--store", _labeled_store(tmp), "--plot", output(tmp)]


def _file(name: str, data: bytes = b"mine\n") -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
        return str(tmp / name)
    return make


def _import(rows: list[dict] | None = None, *extra: str, routerdc: dict | None = None) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        if routerdc is not None:
            (tmp / "rdc").mkdir()
            for name, items in routerdc.items():
                (tmp / "rdc" / name).write_text(json.dumps(items))
            return ["import-scores", str(tmp / "rdc"), "--format", "routerdc", "--store", str(tmp / "store"), *extra]
        table = tmp / "scores.jsonl"
        table.write_text("".join(json.dumps(r) + "\n" for r in rows or [{"query": "q", "expert": "a", "score": 1}]))
        return ["import-scores", str(table), "--store", str(tmp / "store"), *extra]
    return setup


def _experts_add(config: Callable[[Path], Path], *extra: str, model: str = "packaged:smollm2-135m-instruct"):
    def setup(tmp: Path) -> list[str]:
        return ["experts", "add", str(config(tmp)), "--name", "c", "--model", model, *extra]
    return setup


def _a_config(tmp: Path) -> Path:
    from tests.conftest import QUERIES, write_jsonl

    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump({"store": str(tmp / "store"), "data": {"path": str(write_jsonl(
        tmp / "q.jsonl", QUERIES))}, "experts": [{"name": "a", "model": "packaged:smollm2-135m-instruct"}],
        "reward_models": [{"name": "exact", "kind": "verifiable"}]}))
    return path


def _config_latin1(tmp: Path) -> Path:
    path = _a_config(tmp)
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")
    return path


def _config_dir(tmp: Path) -> Path:
    (tmp / "c.yaml").mkdir()
    return tmp / "c.yaml"


def _under_file(tmp: Path) -> str:
    (tmp / "plain").write_text("x")
    return str(tmp / "plain" / "out.parquet")


COMMAND_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "export over an existing file": (_export(_file("out.parquet")),
                                     r"--output .*out\.parquet: exists; pass --overwrite to replace it$"),
    "export to an unknown suffix": (_export(lambda t: str(t / "z.csv")),
                                    r"--output .*z\.csv: unsupported output file type '\.csv' \(use \.parquet, "
                                    r"\.jsonl or a folder \(no suffix\)\)$"),
    "export to /dev/null": (_export(lambda t: "/dev/null"), r"--output /dev/null/labels-\w+\.parquet: cannot write "
                                                            r"the output \(/dev/null is a device, not a folder\)$"),
    "export into the store": (_export(lambda t: str(t / "store" / "out.parquet")),
                              r"--output .*store/out\.parquet: is inside the store .*; write the output outside it"),
    "export under a file": (_export(_under_file),
                            r"--output .*plain/out\.parquet: cannot write the output \(.*plain is a file, not a "
                            r"folder\)$"),
    "export hf over a folder of something else": (
        _export(lambda t: _file("mine/notes.txt")(t).removesuffix("/notes.txt"), "--format", "hf"),
        r"--output .*mine: exists and is not an earlier hf export; choose a new folder$"),
    "inspect --plot over an existing file": (_plot(_file("p.png")), r"--plot .*p\.png: exists; pass --overwrite"),
    "inspect --plot to a folder": (_plot(lambda t: _file("plots/keep.txt")(t).removesuffix("/keep.txt")),
                                   r"--plot .*plots: unsupported plot file name without a suffix \(use \.png\)$"),
    "inspect --plot into the store": (_plot(lambda t: str(t / "store" / "p.png")),
                                      r"--plot .*store/p\.png: is inside the store"),
    "inspect --plot to /dev/null": (_plot(lambda t: "/dev/null"), r"--plot /dev/null: unsupported plot file name "
                                                                  r"without a suffix"),
    "import --name of 300 characters": (_import(None, "--name", "n" * 300),
                                        r"--name 'n{80}'\.\.\.: use letters, digits, .*at most 64 characters"),
    "import --name with a trailing newline": (_import(None, "--name", "a\n"), r"--name 'a\\n': use letters"),
    "import an expert name with a trailing newline": (
        _import([{"query": "q", "expert": "a\n", "score": 1}]), r"expert 'a\\n': each '/'-separated part must match"),
    "import a score of 1e308": (_import([{"query": "q", "expert": "a", "score": 1e308}]),
                                r"scores\.jsonl:1: score 1e\+308 of expert 'a' is outside \[-1e\+06, 1e\+06\]$"),
    "import a RouterDC credit of -5": (
        _import(routerdc={"gsm8k_train.json": [{"question": "q", "scores": {"m": -5}}]}),
        r"gsm8k_train\.json: item 0: score of 'm' is -5, outside \[0, 1\] \(a 'gsm8k' score is the credit"),
    "import --shard-size 0": (_import(None, "--shard-size", "0"), r"."),  # typer's own usage error (exit 2)
    "experts add a missing model": (_experts_add(_a_config, model="/nonexistent/model"),
                                    r"c\.yaml: experts\.1\.model: /nonexistent/model: model directory not found; "
                                    r"nothing was written$"),
    "experts add an unknown packaged model": (_experts_add(_a_config, model="packaged:gpt-9"),
                                              r"experts\.1\.model: packaged:gpt-9: unknown packaged model"),
    "experts add to a non-UTF-8 config": (_experts_add(_config_latin1),
                                          r"c\.yaml: not UTF-8 \(byte \d+, line \d+: .*\); save it as UTF-8$"),
    "experts add to a directory": (_experts_add(_config_dir), r"c\.yaml: is a directory, not a config file"),
    "experts add a name with a trailing newline": (
        lambda t: ["experts", "add", str(_a_config(t)), "--name", "c\n", "--model", "packaged:gemma3-270m"],
        r"expert name: name 'c\\n' must match"),
    "experts add a base_url with a key": (
        _experts_add(_a_config, "--backend", "openai", "--base-url", f"http://127.0.0.1:9/v1?key={KEY}"),
        r"base_url must not carry a query string"),
}


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not p.is_fifo()}


@pytest.mark.parametrize("case", list(COMMAND_CASES))
def test_commands_check_their_arguments_before_writing(tmp_path, case):
    setup, match = COMMAND_CASES[case]
    argv = setup(tmp_path)
    before = _tree(tmp_path)
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, res.output
    if case == "import --shard-size 0":  # the parser's: typer's usage box, no `error:` line
        assert "Invalid value for '--shard-size'" in res.output
    else:
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, res.output
        assert re.search(match, errors[0]), errors[0]
        assert "\x1b" not in errors[0] and KEY not in res.output
    assert _tree(tmp_path) == before  # nothing written, nothing replaced


def test_the_commands_work_once_the_argument_is_right(tmp_path):
    """The command table's control: the same commands with a good argument succeed (the checks refuse only what
    they should), and an existing output is replaced with --overwrite keeping its mode."""
    store = _labeled_store(tmp_path)
    out = _file("out.parquet")(tmp_path)
    os.chmod(out, 0o640)
    assert runner.invoke(app, ["export", "--store", store, "--output", out, "--overwrite"]).exit_code == 0
    assert pl.read_parquet(out).height == 3 and os.stat(out).st_mode & 0o777 == 0o640
    res = runner.invoke(app, ["inspect", "--store", store, "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG", res.output
    (tmp_path / "add").mkdir()
    res = runner.invoke(app, _experts_add(_a_config)(tmp_path / "add"))
    assert res.exit_code == 0 and "added expert c" in res.output, res.output
