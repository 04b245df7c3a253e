"""Where the gateway's experts answer: endpoints (an experts file, or the published config's `backend: openai`
experts) and local experts answered in the gateway's own process (`--local-experts`)."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.openai_backend import api_key
from gateway.errors import GatewayError
from schemas.config import ConfigError, ExpertSpec, load_config
from schemas.store import Store
from tasks.experts import CURRENT
from tasks.generate import Generator, answer, plan_expert
from tasks.inspect import runs
from tasks.plan import run_config

if TYPE_CHECKING:
    from cluster.batches import Generation

log = logging.getLogger("zooter.gateway")


class Endpoint(BaseModel):
    """Where an expert answers: an OpenAI-compatible API (vLLM's `vllm serve`, a hosted API, another gateway)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="API root that `/chat/completions` is appended to, e.g. "
                          "http://127.0.0.1:8001/v1.")
    model: str = Field(description="The model id the endpoint serves (sent upstream as `model`).")
    api_key_env: str | None = Field(None, description="Environment variable holding the endpoint's bearer key "
                                    "(read at start, never written anywhere).")
    cost: float | None = Field(None, ge=0, allow_inf_nan=False, description="Cost of one call, in the unit the "
                               "champion's evaluation recorded costs in (overrides that cost); used by `lambda`.")

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"https?://[^/]", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")


def load_endpoints(store: Store, experts_file: Path | None = None) -> dict[str, Endpoint]:
    """Expert name -> endpoint: from `experts_file` (YAML: name -> Endpoint fields), or else the `backend: openai`
    experts of the store's published config (`zooter publish-config`)."""
    if experts_file is None:
        cfg = load_config(store.uri(CURRENT)) if store.exists(CURRENT) else None
        found = {e.name: Endpoint(base_url=e.base_url, model=e.model, api_key_env=e.api_key_env)
                 for e in (cfg.experts if cfg else []) if e.backend == "openai" and e.base_url}
        if not found:
            log.warning("%s: no expert endpoints (no published config with `backend: openai` experts); pass "
                        "--experts FILE to forward chat requests (/v1/route works without)", store.uri(CURRENT))
        return found
    try:
        raw = yaml.safe_load(experts_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{experts_file}: cannot read the experts file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{experts_file}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{experts_file}: must map expert names to {{base_url, model, api_key_env?, cost?}}")
    found = {}
    for name, fields in raw.items():
        try:
            ep = Endpoint.model_validate(fields)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(map(str, (name, *err["loc"])))
            raise ConfigError(f"{experts_file}: {where}: {err['msg'].removeprefix('Value error, ')}") from None
        found[str(name)] = ep
    return found


class LocalExpert:
    """An expert with no endpoint, answered in the gateway's own process (`--local-experts`): its model loads on
    the first request routed to it and answers one request at a time, rendered and sampled exactly as the generate
    step does (so a greedy answer equals the expert's cell for the same query)."""

    def __init__(self, spec: ExpertSpec):
        self.spec = spec
        self._model: Generator | None = None
        self._lock = threading.Lock()

    def answer(self, query: str, max_tokens: int | None = None) -> Generation:
        from cluster.backends import generator_builder  # torch + transformers: only when a local expert answers

        with self._lock:
            if self._model is None:
                self._model = generator_builder(plan_expert(self.spec))()
            return answer(self._model, self.spec, [query], self.spec.sampling.seed, 1, max_tokens)[0]


def local_experts(store: Store) -> dict[str, LocalExpert]:
    """The experts the gateway can run itself: every expert but `backend: openai` of the store's published config,
    or else of its latest completed run's config (the run manifest records it)."""
    if store.exists(CURRENT):
        specs = load_config(store.uri(CURRENT)).experts
    else:
        done = [r["run_id"] for r in runs(store) if r["status"] == "completed"]
        if not done:
            return {}
        specs = [ExpertSpec.model_validate(e) for e in run_config(store, done[-1])["experts"]]
    return {e.name: LocalExpert(e) for e in specs if e.backend != "openai"}


@dataclass(frozen=True)
class Upstream:
    """An endpoint ready to call: its chat URL and headers (the key read from its environment variable)."""

    url: str
    model: str
    headers: dict[str, str]

    @classmethod
    def of(cls, name: str, ep: Endpoint) -> Upstream:
        headers = {"Authorization": f"Bearer {api_key(ep.api_key_env, name)}"} if ep.api_key_env else {}
        return cls(f"{ep.base_url}/chat/completions", ep.model, headers)


def upstream_error(expert: str, e: httpx.HTTPError) -> GatewayError:
    """Unreachable (refused, DNS, connect timeout) or broken: 502; no answer in time: 504."""
    if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
        return GatewayError(504, f"expert {expert} did not answer in time ({type(e).__name__})", "expert_timeout",
                            kind="server_error")
    return GatewayError(502, f"expert {expert} is unreachable ({type(e).__name__}: {e})", "expert_unavailable",
                        kind="server_error")
