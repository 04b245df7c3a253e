"""Config validation: one-line errors that name the file and the key; every schema field is documented."""

import importlib
import inspect
import pkgutil

import pytest
import yaml
from pydantic import BaseModel

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
