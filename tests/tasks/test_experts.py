"""experts: round-trip edits of a user's YAML keep its comments, order, formatting and permissions; the edited config is
published into its store and read back from that URL the way a remote worker reads it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from schemas.config import ConfigError, load_config
from schemas.store import Store
from tasks.experts import add_expert, list_experts, remove_expert

# The user-facing examples/quickstart.yaml changes with the demo: these tests edit a frozen copy of an earlier one.
QUICKSTART = Path(__file__).resolve().parent / "data" / "experts-config.yaml"
SPEC = {"name": "tiny", "model": "packaged:smollm2-135m-instruct", "sampling": {"max_new_tokens": 8},
        "resources": {"pool_size": 2}}


def comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if "#" in line]


@pytest.fixture
def quickstart(tmp_path) -> Path:
    path = tmp_path / "quickstart.yaml"
    shutil.copy(QUICKSTART, path)
    path.chmod(0o640)
    return path


def test_add_then_remove_gives_the_file_back_byte_for_byte(quickstart):
    before = quickstart.read_text()
    assert len(comments(before)) == 16
    add_expert(quickstart, SPEC)
    added = quickstart.read_text()
    assert comments(added) == comments(before)  # all 16 comment lines, unchanged
    assert added.startswith(before[:before.index("reward_models:") - 1])  # everything before the new entry as it was
    assert "  - name: tiny\n    model: packaged:smollm2-135m-instruct\n" in added
    # nested mappings in the flow style its siblings use, and their dtype (all float32; the schema says bfloat16)
    assert "    sampling: {max_new_tokens: 8}\n    resources: {pool_size: 2}\n    dtype: float32\n" in added
    assert [e.name for e in list_experts(quickstart)] == ["smollm2", "gemma3", "qwen-coder", "tiny"]
    assert (quickstart.stat().st_mode & 0o777) == 0o640
    remove_expert(quickstart, "tiny")
    assert quickstart.read_text() == before
    assert (quickstart.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in quickstart.parent.iterdir()) == ["quickstart.yaml"]  # no temp file left


def test_remove_keeps_the_rest(quickstart):
    before = quickstart.read_text()
    remove_expert(quickstart, "gemma3")
    after = quickstart.read_text()
    gemma = before[before.index("  - name: gemma3"):before.index("  - name: qwen-coder")]
    assert after == before.replace(gemma, "")
    remove_expert(quickstart, "qwen-coder")  # the last one: the blank line before reward_models stays
    assert "threads: 1}\n\nreward_models:" in quickstart.read_text()


def test_comments_after_a_removed_expert_stay(tmp_path):
    path = tmp_path / "c.yaml"
    text = ("store: s   # where\ndata: {path: q.jsonl}\nexperts:\n- name: a\n  model: packaged:x\n"
            "- name: b\n  model: packaged:y\n  sampling:\n    max_new_tokens: 4\n\n# about c\n"
            "- name: c\n  model: packaged:z\nreward_models:\n- {name: exact, kind: verifiable}\n")
    path.write_text(text)
    remove_expert(path, "b")
    assert path.read_text() == text.replace("- name: b\n  model: packaged:y\n  sampling:\n    max_new_tokens: 4\n",
                                            "")


def test_dtype_default_follows_the_config(tmp_path):
    cfg = {"store": "s", "data": {"path": "q.jsonl"}, "reward_models": [{"name": "exact", "kind": "verifiable"}],
           "experts": [{"name": "a", "model": "packaged:x", "dtype": "float16"},
                       {"name": "b", "model": "packaged:y", "dtype": "float16"}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    add_expert(path, {"name": "c", "model": "packaged:z"}, check=False)  # (packaged:z: no such model)
    assert yaml.safe_load(path.read_text())["experts"][2]["dtype"] == "float16"  # the one they share
    add_expert(path, {"name": "d", "model": "packaged:z", "dtype": "float32"}, check=False)  # explicit dtype wins
    add_expert(path, {"name": "e", "model": "packaged:z"}, check=False)  # they disagree now: the schema default
    experts = yaml.safe_load(path.read_text())["experts"]
    assert experts[3]["dtype"] == "float32" and "dtype" not in experts[4]
    assert [e.dtype for e in list_experts(path)] == ["float16", "float16", "float16", "float32", "bfloat16"]


@pytest.mark.parametrize("change,match", [
    (lambda p: add_expert(p, {"name": "smollm2", "model": "packaged:x"}), "exists already"),
    (lambda p: add_expert(p, {"name": "x", "model": "packaged:x", "dtype": "int3"}), r"expert dtype: Input should"),
    (lambda p: add_expert(p, {"name": "../x", "model": "packaged:x"}), r"expert name: .*must match"),
    (lambda p: remove_expert(p, "nope"), r"no expert named 'nope' \(have \['smollm2', 'gemma3', 'qwen-coder'\]\)"),
])
def test_bad_edits_leave_the_file_alone(quickstart, change, match):
    before = quickstart.read_text()
    with pytest.raises(ConfigError, match=match):
        change(quickstart)
    assert quickstart.read_text() == before


def test_the_last_expert_stays(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("store: s\ndata: {path: q.jsonl}\nexperts:\n- {name: a, model: packaged:x}\n"
                    "reward_models:\n- {name: exact, kind: verifiable}\n")
    with pytest.raises(ConfigError, match="experts: at least one expert is required"):
        remove_expert(path, "a")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("store: s\nexperts: [\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: invalid YAML"):
        list_experts(path)


def _s3_config(tmp_path, s3_server) -> dict:
    """A config on the S3 test store with every path absolute (what a published config needs)."""
    return {"name": "pub", "store": {"url": "s3://zooter/pub", "options": s3_server},
            "data": {"path": str(tmp_path / "q.jsonl")}, "reward_models": [{"name": "exact", "kind": "verifiable"}],
            "experts": [{"name": "a", "model": "packaged:x"}]}


@pytest.fixture
def worker_env(s3_server, monkeypatch):
    """A worker's standard AWS environment: endpoint and credentials, nothing in the config."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_publish_config_into_an_s3_store_and_read_it_back_from_its_url(tmp_path, s3_server, worker_env):
    from tasks.experts import CURRENT, publish_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_s3_config(tmp_path, s3_server)))
    cfg = load_config(path)
    url = publish_config(cfg)
    assert re.fullmatch(r"s3://zooter/pub/configs/[0-9a-f]{16}\.yaml", url)
    assert publish_config(cfg) == url  # content-addressed: the same config, the same object
    store = Store("s3://zooter/pub", s3_server)
    data = store.read_bytes(url.removeprefix("s3://zooter/pub/"))
    assert store.read_bytes(CURRENT) == data
    assert s3_server["secret"] not in data.decode() and s3_server["key"] not in data.decode()
    # the worker reads it with its own endpoint and credentials: the same config, less the store options
    assert load_config(url) == cfg.model_copy(update={"store": cfg.store.model_copy(update={"options": {}})})

    # a pool change publishes a new copy and moves current.yaml; the old copy stays for runs that wait for it
    add_expert(path, {"name": "b", "model": "packaged:y"}, check=False)
    url2 = publish_config(load_config(path))
    assert url2 != url and [e.name for e in load_config(url).experts] == ["a"]
    assert [e.name for e in load_config(f"s3://zooter/pub/{CURRENT}").experts] == ["a", "b"]


def test_a_config_read_from_a_url_refuses_relative_paths_naming_the_key(tmp_path, s3_server, worker_env):
    store = Store("s3://zooter/pub", s3_server)
    cfg = _s3_config(tmp_path, s3_server) | {"data": {"path": "q.jsonl"}}
    store.write_bytes("configs/relative.yaml", yaml.safe_dump(cfg).encode())
    with pytest.raises(ConfigError, match=r"^s3://zooter/pub/configs/relative\.yaml: data\.path: relative path "
                                          r"'q\.jsonl' in a config read from a URL"):
        load_config("s3://zooter/pub/configs/relative.yaml")
    with pytest.raises(ConfigError, match=r"^s3://zooter/pub/configs/none\.yaml: config file not found$"):
        load_config("s3://zooter/pub/configs/none.yaml")
    with pytest.raises(ConfigError, match=r"names no config file"):
        load_config("s3://zooter")
    # a file:// URL is a local file: its relative paths resolve beside it
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(cfg))
    assert load_config((tmp_path / "local.yaml").as_uri()).data.path == str((tmp_path / "q.jsonl").resolve())


def test_a_symlinked_config_is_edited_at_its_target(quickstart, tmp_path):
    link = tmp_path / "link.yaml"
    link.symlink_to(quickstart)
    add_expert(link, SPEC)
    assert link.is_symlink() and link.resolve() == quickstart.resolve()  # still a link, to the same file
    assert "name: tiny" in quickstart.read_text() and quickstart.stat().st_mode & 0o777 == 0o640


def test_add_checks_the_model_as_validate_does_before_writing(quickstart):
    before = quickstart.read_text()
    for model, match in (("/nonexistent/model", r"experts\.3\.model: /nonexistent/model: model directory not found"),
                         ("packaged:gpt-9", r"experts\.3\.model: packaged:gpt-9: unknown packaged model")):
        with pytest.raises(ConfigError, match=match + r".*; nothing was written$"):
            add_expert(quickstart, {"name": "new", "model": model})
    assert quickstart.read_text() == before
    # an endpoint is not contacted (it may not be up yet): only its shape is checked
    add_expert(quickstart, {"name": "remote", "model": "served", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"})
