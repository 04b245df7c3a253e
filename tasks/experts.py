"""experts: edit a config's expert pool (add / remove / list) and announce the change as a Prefect event.

Edits are round trips through ruamel.yaml: comments, key order, quoting and the file's indentation survive, and
only the `experts:` list changes (adding then removing an expert gives the file back byte for byte). The edited
config is validated as a whole before it replaces the file, atomically (a temp file with the file's permissions,
renamed over it), so a bad `add` leaves the config as it was. A new expert's model is checked as `zooter validate`
checks it (its source exists, its prompt template has {query}; an endpoint's is not contacted: it may not be up
yet) before anything is written. A config that is a symlink is edited at its target (the link stays a link); one
that is not UTF-8, a directory or a FIFO is one line saying so, as `load_config` says it.

After an edit, `emit_pool_changed` publishes the config into its store (`publish_config`) and emits
`zooter.experts.changed`, what the relabel deployment's trigger listens for (prefect.yaml, `zooter serve`). A
remote worker cannot read the editing machine's file, so the event names the published copy: its resource is the
store (`zooter.store.<url>`), a related resource is the config copy, and the payload carries `store` and
`config_url`, which the trigger passes to the relabel flow.

Published configs live under the store's `configs/`: `<sha256 of the bytes, 16 hex>.yaml` never changes (an
event names it, so a run that waits for the relabel concurrency slot still gets the pool the event announced) and
`current.yaml` is the latest one (what a scheduled deployment reads: prefect.yaml's ZOOTER_CONFIG_URL).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.tokens import CommentToken

from schemas.config import (
    ConfigError,
    ExpertSpec,
    FlowConfig,
    decode_config,
    load_config,
    read_local_config,
    resolve_paths,
)
from schemas.errors import ZooterError
from schemas.store import Store

EVENT = "zooter.experts.changed"
CONFIGS = "configs"  # where published configs live in the store
CURRENT = f"{CONFIGS}/current.yaml"
DEFAULT_DTYPE = ExpertSpec.model_fields["dtype"].default


def _indents(text: str) -> dict[str, int]:
    """The block indentation a file uses, in ruamel.yaml's terms: `mapping` (a key below its parent key),
    `sequence` (an item's content below its parent key) and `offset` (the dash below its parent key)."""
    found: dict[str, int] = {}
    parent: int | None = None  # indent of the previous line when it opened a block (`key:` and nothing else)
    for line in text.splitlines():
        body = re.sub(r"\s+#.*$", "", line.strip())
        if not body or body.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if parent is not None and indent > parent:
            if body.startswith("- "):
                found.setdefault("offset", indent - parent)
                found.setdefault("sequence", indent + 2 + len(body[2:]) - len(body[2:].lstrip(" ")) - parent)
            else:
                found.setdefault("mapping", indent - parent)
        parent = indent if body.endswith(":") and not body.startswith("- ") else None
    return {"mapping": 2, "sequence": 2, "offset": 0} | found  # defaults: what yaml.safe_dump writes


def _yaml(text: str) -> YAML:
    y = YAML()  # round-trip mode
    y.preserve_quotes = True
    y.width = 1 << 16  # never re-wrap a long line
    y.indent(**_indents(text))
    # ruamel writes None as an empty value; `null` is what the examples (and yaml.safe_dump) write
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _read(path: Path) -> tuple[YAML, CommentedMap]:
    text = decode_config(read_local_config(path), path)
    y = _yaml(text)
    try:
        raw = y.load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML "
                          f"({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        raw = CommentedMap()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return y, raw


def _write(path: Path, y: YAML, raw: CommentedMap) -> None:
    try:
        FlowConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    buf = io.StringIO()
    y.dump(raw, buf)
    path = Path(os.path.realpath(path))  # a symlinked config is edited where it lives; the link stays a link
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, path.stat().st_mode & 0o7777)  # mkstemp makes 0600: keep the config's own permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _experts(path: Path, raw: CommentedMap) -> CommentedSeq:
    experts = raw.get("experts")
    if experts is None:
        experts = raw["experts"] = CommentedSeq()
    if not isinstance(experts, list):
        raise ConfigError(f"{path}: experts: must be a list")
    for i, e in enumerate(experts):
        if not isinstance(e, dict):
            raise ConfigError(f"{path}: experts.{i}: must be a mapping")
    return experts


def list_experts(path: Path) -> list[ExpertSpec]:
    """The config's experts, validated one by one (defaults filled in)."""
    _, raw = _read(path)
    out = []
    for i, e in enumerate(_experts(path, raw)):
        try:
            out.append(ExpertSpec.model_validate(e))
        except ValidationError as err:
            first = err.errors()[0]
            raise ConfigError(f"{path}: experts.{i}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return out


def _styled_like(spec: dict[str, Any], sibling: Any) -> CommentedMap:
    """The new expert as a mapping whose nested mappings (sampling, resources) use the flow or block style its
    sibling's do, so that it looks like the entries around it."""
    out = CommentedMap()
    for k, v in spec.items():
        if isinstance(v, dict):
            v = CommentedMap(v)
            theirs = sibling.get(k) if isinstance(sibling, CommentedMap) else None
            if isinstance(theirs, CommentedMap) and theirs.fa.flow_style():
                v.fa.set_flow_style()
        out[k] = v
    return out


def add_expert(path: Path, spec: dict[str, Any], check: bool = True) -> dict:
    """Append an expert (validated as an ExpertSpec, its model as `validate` checks it unless not `check`, then the
    whole config); returns what was written.

    Without a `dtype`, the new expert gets the one the config's experts share (when they all use the same one;
    else the schema default)."""
    y, raw = _read(path)
    experts = _experts(path, raw)
    if any(e.get("name") == spec.get("name") for e in experts):
        raise ConfigError(f"{path}: experts: an expert named {spec.get('name')!r} exists already")
    spec = dict(spec)
    dtypes = {e.get("dtype", DEFAULT_DTYPE) for e in experts}
    if "dtype" not in spec and len(dtypes) == 1 and dtypes != {DEFAULT_DTYPE}:
        spec["dtype"] = dtypes.pop()
    try:
        ExpertSpec.model_validate(spec)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"expert {'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}") \
            from None
    experts.append(_styled_like(spec, experts[-1] if experts else None))
    if check:
        _check_new(path, raw, len(experts) - 1)
    _write(path, y, raw)
    return spec


def _check_new(path: Path, raw: CommentedMap, i: int) -> None:
    """The added expert as `zooter validate` checks it, its paths resolved against the config's folder as
    `load_config` resolves them; the endpoint of an `openai` expert is not contacted (it may not be up yet)."""
    from tasks.preflight import check_expert  # loads cluster.models: only when a model is checked

    try:
        cfg = resolve_paths(FlowConfig.model_validate(raw), path.resolve().parent, str(path))
    except ValidationError:  # the whole config: _write reports it
        return
    try:
        check_expert(f"experts.{i}", cfg.experts[i], endpoint=False)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}; nothing was written") from None


def _tail(node: CommentedMap | CommentedSeq) -> tuple[CommentedMap | CommentedSeq, Any, int]:
    """Where ruamel.yaml keeps the lines that follow a block collection's last line (blank lines, and comments
    about what comes next): the comment slot of its deepest last key (slot 2 of a mapping key, 0 of an item)."""
    key = next(reversed(node)) if isinstance(node, CommentedMap) else len(node) - 1
    child = node[key]
    if isinstance(child, CommentedMap | CommentedSeq) and child and not child.fa.flow_style():
        return _tail(child)
    return node, key, 2 if isinstance(node, CommentedMap) else 0


def _move_tail(src: CommentedMap, dst: CommentedMap) -> None:
    """Move the lines after src's last line (not that line's own comment) to after dst's last line."""
    node, key, slot = _tail(src)
    token = (node.ca.items.get(key) or [None] * 4)[slot]
    after = token.value.partition("\n")[2] if token is not None else ""
    if not after:
        return
    node, key, slot = _tail(dst)
    entry = node.ca.items.setdefault(key, [None] * 4)
    entry[slot] = CommentToken((entry[slot].value if entry[slot] else "\n") + after, CommentMark(0), None)


def remove_expert(path: Path, name: str) -> None:
    """Remove an expert; its own comments go with it, the blank lines and comments after it stay where they are."""
    y, raw = _read(path)
    experts = _experts(path, raw)
    at = [i for i, e in enumerate(experts) if e.get("name") == name]
    if not at:
        raise ConfigError(f"{path}: experts: no expert named {name!r} (have {[e.get('name') for e in experts]})")
    if at[0] > 0:
        _move_tail(experts[at[0]], experts[at[0] - 1])
    del experts[at[0]]
    _write(path, y, raw)  # refuses an empty pool: at least one expert is required


def published(cfg: FlowConfig) -> bytes:
    """The config as a worker reads it from the store: every path already resolved (absolute or a URL, which
    load_config requires of a config read from a URL) and no store options (they may hold credentials, which never
    go into artifacts; a worker takes endpoint and credentials from its own AWS environment)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"store": {"options"}}), sort_keys=False).encode()


def publish_config(cfg: FlowConfig) -> str:
    """Write the config into its store, atomically, as `configs/<hash>.yaml` and `configs/current.yaml`; returns
    the URL of the content-addressed copy."""
    data = published(cfg)
    store = Store.from_config(cfg.store)
    rel = f"{CONFIGS}/{hashlib.sha256(data).hexdigest()[:16]}.yaml"
    with contextlib.suppress(FileExistsError):  # the same bytes are there already
        store.create(rel, data)
    store.write_bytes(CURRENT, data)
    return store.uri(rel)


def emit_pool_changed(config_path: Path, action: str, expert: str) -> str | None:
    """Publish the edited config into its store, then emit `zooter.experts.changed` naming the store and the
    published copy's URL. Returns None when both happened, else why not (the caller warns: editing the pool must
    depend neither on a Prefect API being up nor on a remote store answering)."""
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    cfg = load_config(config_path)
    try:
        config_url = publish_config(cfg)
    except ZooterError as e:
        return f"the config could not be published into its store ({e})"
    if not PREFECT_API_URL.value():
        return "PREFECT_API_URL is not set: no Prefect API to send the event to"
    with get_client(sync_client=True) as client:
        err = client.api_healthcheck()
    if err is not None:
        return f"Prefect API {PREFECT_API_URL.value()} unreachable ({type(err).__name__}: {err})"
    event = emit_event(
        EVENT,
        resource={"prefect.resource.id": f"zooter.store.{cfg.store.url}", "prefect.resource.name": cfg.name},
        related=[{"prefect.resource.id": f"zooter.config.{config_url}", "prefect.resource.role": "config"}],
        payload={"store": cfg.store.url, "config_url": config_url, "action": action, "expert": expert,
                 "experts": [e.name for e in cfg.experts]})
    # The events worker sends in the background: flush it before the command exits.
    EventsWorker.drain_all(timeout=30)
    return None if event is not None else "Prefect did not accept the event (events are disabled)"
