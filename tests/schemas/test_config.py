"""Config validation: one-line errors that name the file and the key; every schema field is documented."""

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import schemas
from schemas.config import ConfigError, load_config


def _cfg(tmp_path, **changes):
    base = {"store": str(tmp_path / "s"), "data": {"path": "q.jsonl"},
            "experts": [{"name": "a", "model": "packaged:smollm2-135m-instruct"}],
            "reward_models": [{"name": "exact", "kind": "verifiable"}]}
    base.update(changes)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


def test_valid_config_resolves_relative_paths(tmp_path):
    cfg = load_config(_cfg(tmp_path))
    assert cfg.data.path == str(tmp_path / "q.jsonl")
    assert cfg.aggregate.beta == 0.3 and cfg.aggregate.temperature == 1.0


@pytest.mark.parametrize("changes,match", [
    ({"experts": []}, r"experts: at least one expert"),
    ({"aggregate": {"beta": 1.5}}, r"aggregate.beta: Input should be less than or equal to 1"),
    ({"aggregate": {"temperature": 0}}, r"aggregate.temperature: Input should be greater than 0"),
    ({"colour": "blue"}, r"colour: Extra inputs are not permitted"),
    ({"experts": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]}, r"duplicate name\(s\) \['a'\]"),
    ({"experts": [{"name": "../etc", "model": "x"}]}, r"experts.0.name"),
    ({"reward_models": [{"name": "j", "kind": "loglik"}]}, r"needs `model`"),
])
def test_bad_config_names_key(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(_cfg(tmp_path, **changes))
    assert "c.yaml" in str(e.value) and "\n" not in str(e.value)


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("store: x\ndata: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(p)


def _models() -> list[type]:
    """Every pydantic model defined in a module of schemas/."""
    out = []
    for info in pkgutil.iter_modules(schemas.__path__):
        mod = importlib.import_module(f"schemas.{info.name}")
        out += [c for _, c in inspect.getmembers(mod, inspect.isclass)
                if issubclass(c, BaseModel) and c.__module__ == mod.__name__]
    return out


def test_models_found():
    names = {m.__name__ for m in _models()}
    assert {"FlowConfig", "ExpertSpec", "RunManifest", "EvalReport", "Champion"} <= names


@pytest.mark.parametrize("module", ["config", "manifest", "evaluation"])
def test_every_field_has_a_description(module):
    """What `zooter` users read about a key comes from here: a field without a description is undocumented."""
    missing = [f"{m.__name__}.{name}" for m in _models() if m.__module__ == f"schemas.{module}"
               for name, field in m.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"fields without a description: {missing}"


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("changes,key", [
    ({"aggregate": {"temperature": INF}}, "aggregate.temperature"),
    ({"aggregate": {"beta": NAN}}, "aggregate.beta"),
    ({"reward_models": [{"name": "exact", "kind": "verifiable", "weight": NAN}]}, "reward_models.0.weight"),
    ({"reward_models": [{"name": "exact", "kind": "verifiable", "weight": -INF}]}, "reward_models.0.weight"),
    ({"experts": [{"name": "a", "model": "x", "sampling": {"top_p": NAN}}]}, "experts.0.sampling.top_p"),
    ({"router": {"weight_decay": INF}}, "router.weight_decay"),
    ({"store": {"url": "s", "lease_ttl_s": INF}}, "store.lease_ttl_s"),
    ({"ray": {"num_cpus": INF}}, "ray.num_cpus"),
])
def test_no_float_is_nan_or_infinite(tmp_path, changes, key):
    with pytest.raises(ConfigError, match=rf"c.yaml: {key}: Input should be a finite number"):
        load_config(_cfg(tmp_path, **changes))


@pytest.mark.parametrize("changes,key", [
    ({"store": ""}, "store.url"), ({"store": {"url": " "}}, "store.url"), ({"data": {"path": ""}}, "data.path"),
    ({"data": {"path": "q.jsonl", "tags_field": ""}}, "data.tags_field"),
    ({"experts": [{"name": "a", "model": ""}]}, "experts.0.model"),
    ({"reward_models": [{"name": "j", "kind": "loglik", "model": ""}]}, "reward_models.0.model"),
    ({"router": {"encoder": ""}}, "router.encoder"), ({"ray": {"address": ""}}, "ray.address"),
])
def test_empty_paths_urls_and_columns_are_errors(tmp_path, changes, key):
    with pytest.raises(ConfigError, match=rf"c.yaml: {key}: must not be empty$"):
        load_config(_cfg(tmp_path, **changes))


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix"])
def test_s3_url_needs_a_bucket(tmp_path, url):
    with pytest.raises(ConfigError, match=rf"store.url: '{url}' names no bucket \(use s3://bucket/prefix\)"):
        load_config(_cfg(tmp_path, store=url))


def test_duplicate_keys_name_both_lines(tmp_path):
    p = _cfg(tmp_path)
    text = p.read_text()
    p.write_text(text + "store: elsewhere\n")
    first = text.splitlines().index(f"store: {tmp_path / 's'}") + 1
    with pytest.raises(ConfigError, match=rf"c.yaml:{len(text.splitlines()) + 1}: invalid YAML \(duplicate key "
                                          rf"'store', first at line {first}\)$"):
        load_config(p)
    p.write_text(text.replace("data:\n", "data:\n  path: other.jsonl\n"))
    with pytest.raises(ConfigError, match=r"duplicate key 'path', first at line \d+"):
        load_config(p)
    p.write_text(text + "aggregate: {beta: 0.1, beta: 0.2}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'beta'"):
        load_config(p)


def test_merge_keys_may_override(tmp_path):
    """`<<` merges are not duplicates: overriding a merged key is what they are for."""
    p = _cfg(tmp_path)
    p.write_text(p.read_text() + "aggregate: &agg {beta: 0.5}\nrouter: {<<: {epochs: 2}, epochs: 3}\n")
    cfg = load_config(p)
    assert cfg.router.epochs == 3 and cfg.aggregate.beta == 0.5


def test_config_that_is_not_utf8(tmp_path):
    p = _cfg(tmp_path)
    p.write_bytes(p.read_bytes() + "name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 \(byte \d+, line \d+: invalid continuation byte\); "
                                          "save it as UTF-8"):
        load_config(p)


def _number_fields(model: type, prefix: str = "") -> list[tuple[str, object]]:
    """(key, FieldInfo) of every int/float field reachable from a config model (bool is not a number)."""
    import typing

    out = []
    for name, field in model.model_fields.items():
        key, ann = f"{prefix}{field.alias or name}", field.annotation
        args = typing.get_args(ann)
        inner = [a for a in (ann, *args, *(x for a in args for x in typing.get_args(a))) if isinstance(a, type)]
        sub = [a for a in inner if issubclass(a, BaseModel)]
        if sub:
            out += _number_fields(sub[0], key + (".*." if typing.get_origin(ann) is list else "."))
        elif typing.get_origin(ann) is dict:
            value = FieldInfo.from_annotation(args[1])
            out += [(f"{key}.*", value)] if value.annotation in (int, float) else []
        elif any(a in (int, float) for a in inner):
            out.append((key, field))
    return out


def test_every_number_has_a_finite_documented_range():
    """Issue 37: no number a config holds is unbounded (a seed of 10**30, a weight of 1e308 fail when read, not
    after the expensive stages), and docs/failures.md's limits table names every one of them."""
    import annotated_types as at

    from schemas.config import FlowConfig, TrainConfig

    docs = (Path(__file__).resolve().parents[2] / "docs" / "failures.md").read_text()
    limits = docs[docs.index("## Limits"):docs.index("## Minimum sizes")]
    unbounded, undocumented = [], []
    for key, field in _number_fields(FlowConfig) + _number_fields(TrainConfig):
        kinds = {type(m) for m in field.metadata}
        if not (kinds & {at.Ge, at.Gt} and kinds & {at.Le, at.Lt}):
            unbounded.append(key)
        if f".{key.rsplit('.', 1)[-1]}`" not in limits and f"`{key}`" not in limits:
            undocumented.append(key)
    assert not unbounded, f"number fields without a lower and an upper bound: {unbounded}"
    assert not undocumented, f"number fields missing from docs/failures.md's limits table: {undocumented}"


@pytest.mark.parametrize("changes,match", [
    ({"aggregate": {"beta": True}}, r"aggregate\.beta: Input should be a valid number, got true \(a boolean\)"),
    ({"aggregate": {"beta": "0.3"}}, r"aggregate\.beta: Input should be a valid number, got the string '0\.3'"),
    ({"router": {"seed": 10**30}}, r"router\.seed: Input should be less than or equal to 2147483647"),
    ({"reward_models": [{"name": "exact", "kind": "verifiable", "weight": 1e308}]},
     r"reward_models\.0\.weight: Input should be less than or equal to 1000"),
    ({"reward_models": [{"name": "exact\n", "kind": "verifiable"}]}, r"reward_models\.0\.name: name 'exact\\n'"),
])
def test_strict_types_and_ranges(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_cfg(tmp_path, **changes))


def test_a_valid_config_dumps_the_same_values_under_strict_types(tmp_path):
    """Strict types change what is refused, not what a valid config holds: an int where a float goes is still
    that float, so fingerprints over dumped values stay."""
    cfg = load_config(_cfg(tmp_path, aggregate={"beta": 0, "temperature": 2}))
    assert cfg.aggregate.model_dump() == {"beta": 0.0, "temperature": 2.0, "tag_temperature": None}
    assert isinstance(cfg.aggregate.beta, float) and isinstance(cfg.aggregate.temperature, float)


def test_home_is_expanded_and_config_paths_must_be_files(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(_cfg(tmp_path, store="~/zstore"))
    assert cfg.store.url == str(tmp_path / "home" / "zstore")  # not a folder named `~` beside the config
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"fifo\.yaml: is a FIFO, not a config file"):
        load_config(tmp_path / "fifo.yaml")
    with pytest.raises(ConfigError, match=r"dir\.yaml: is a directory, not a config file"):
        load_config(tmp_path / "dir.yaml")
