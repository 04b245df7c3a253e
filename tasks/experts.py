"""experts: edit a config's expert pool (add / remove / list) and announce the change as a Prefect event.

The edited YAML is validated as a whole config before it replaces the file (atomically: temp file + rename in
the same directory), so a bad `add` leaves the config as it was. YAML comments are not preserved.

`zooter.experts.changed` is what the relabel deployment's trigger listens for (prefect.yaml, `zooter serve`).
Its resource is the store (`zooter.store.<url>`), a related resource is the config, and the payload carries
`config_path`, which the trigger passes to the relabel flow.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.config import ConfigError, ExpertSpec, FlowConfig

EVENT = "zooter.experts.changed"


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def _write(path: Path, raw: dict) -> None:
    try:
        FlowConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(raw, f, sort_keys=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def list_experts(path: Path) -> list[dict]:
    return list(_read(path).get("experts") or [])


def add_expert(path: Path, spec: dict[str, Any]) -> dict:
    """Append an expert (validated as an ExpertSpec, then the whole config); returns what was written."""
    raw = _read(path)
    experts = list(raw.get("experts") or [])
    if any(e.get("name") == spec.get("name") for e in experts):
        raise ConfigError(f"{path}: experts: an expert named {spec.get('name')!r} exists already")
    try:
        ExpertSpec.model_validate(spec)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"expert {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    raw["experts"] = [*experts, spec]
    _write(path, raw)
    return spec


def remove_expert(path: Path, name: str) -> None:
    raw = _read(path)
    experts = list(raw.get("experts") or [])
    if not any(e.get("name") == name for e in experts):
        raise ConfigError(f"{path}: experts: no expert named {name!r} (have {[e.get('name') for e in experts]})")
    raw["experts"] = [e for e in experts if e.get("name") != name]
    _write(path, raw)  # refuses an empty pool: at least one expert is required


def emit_pool_changed(config_path: Path, action: str, expert: str) -> str | None:
    """Emit `zooter.experts.changed`; returns None when sent, else why not (the caller warns: editing the
    pool must not depend on a Prefect API being up)."""
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    from schemas.config import load_config

    cfg = load_config(config_path)
    if not PREFECT_API_URL.value():
        return "PREFECT_API_URL is not set: no Prefect API to send the event to"
    with get_client(sync_client=True) as client:
        err = client.api_healthcheck()
    if err is not None:
        return f"Prefect API {PREFECT_API_URL.value()} unreachable ({type(err).__name__}: {err})"
    path = str(config_path.resolve())
    event = emit_event(
        EVENT,
        resource={"prefect.resource.id": f"zooter.store.{cfg.store.url}", "prefect.resource.name": cfg.name},
        related=[{"prefect.resource.id": f"zooter.config.{path}", "prefect.resource.role": "config"}],
        payload={"config_path": path, "store": cfg.store.url, "action": action, "expert": expert,
                 "experts": [e.name for e in cfg.experts]})
    # The events worker sends in the background: flush it before the command exits.
    EventsWorker.drain_all(timeout=30)
    return None if event is not None else "Prefect did not accept the event (events are disabled)"
