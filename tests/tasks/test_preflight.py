"""preflight on fake model directories (a config.json only: preflight never reads weights) and hand-made stores."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.config import ConfigError, FlowConfig
from tasks.preflight import preflight


def model_dir(root: Path, name: str, arch: str | None, labels: int | None = None) -> str:
    d = root / name
    d.mkdir()
    cfg: dict = {"architectures": [arch]} if arch else {}
    if labels is not None:
        cfg["id2label"] = {str(i): f"L{i}" for i in range(labels)}
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def config(tmp_path: Path, edit: Callable[[dict, Path], object] | None = None) -> FlowConfig:
    """A valid config on fake model directories; `edit(raw, tmp_path)` changes it first."""
    data = tmp_path / "q.jsonl"
    data.write_text('{"text": "What is 2 + 3?"}\n{"text": "Name a planet."}\n')
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
    assert preflight(config(tmp_path)).height == 2
    assert not (tmp_path / "store").exists()


def test_config_json_without_architectures_is_left_to_the_load(tmp_path):
    def unknown(raw, root):
        raw["reward_models"][0]["model"] = model_dir(root, "x", None)
    assert preflight(config(tmp_path, unknown)).height == 2


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
