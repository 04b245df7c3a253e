"""`zooter gateway`: an OpenAI-compatible front door that routes each chat request to one expert's endpoint.

- `POST /v1/chat/completions`: `model` is `zooter` (the store's champion router) or `zooter:<router fingerprint>`
  (that router), either optionally ending in `:lambda=<x>` (cost-aware: argmax_i p_i - x * cost_i / max cost, when
  every expert of the router has a cost). Costs and the default lambda are the ones the champion's evaluation
  recorded from its config (as `zooter route` uses them); a `cost` in the experts file overrides an expert's. The
  router reads the conversation's last user message; the request body goes to the chosen expert's
  `<base_url>/chat/completions` unchanged except `model`, which becomes the expert's served model id. A JSON answer
  comes back with `model` = `zooter/<expert>`; a stream (`stream: true`) comes back byte for byte as the expert sent
  it (its chunks name the served model). Both carry `x-zooter-expert` and `x-zooter-router` headers.
- `POST /v1/route`: the same body (only `model` and `messages` are read); answers `{expert, probs, router, lambda}`.
- `GET /v1/models`, `GET /health` (never behind the key), `GET /metrics` (Prometheus text).

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 malformed body (`param` names the
field), 401 missing or wrong bearer key, 404 unknown model or router, 502 expert unreachable or failing (names it),
504 expert timed out. An expert's own 4xx answer is passed through as it came.

The champion is re-read from the store's `champion.json` every `reload_s` seconds in the background; a promotion
swaps the router (and its recorded costs and lambda) in once it has loaded, with no restart. Routers are called in
a thread pool, one call at a time per router (a fast tokenizer must not be shared by threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import yaml
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from schemas.artifacts import CHAMPION_PATH, ROUTER_JSON, router_file
from schemas.config import ConfigError, ExpertSpec, load_config
from schemas.errors import ArtifactError, StoreUnavailable, ZooterError
from schemas.evaluation import read_champion, read_report
from schemas.store import Store
from tasks.experts import CURRENT
from tasks.generate import Generator, answer, plan_expert
from tasks.inspect import runs
from tasks.plan import run_config
from tasks.records import visible
from tasks.route import Fallback, Routes, choose

if TYPE_CHECKING:
    from cluster.backends import Generation

log = logging.getLogger("zooter.gateway")
MODEL = "zooter"  # the model name clients send
FINGERPRINT = re.compile(r"[0-9a-f]{6,64}")


class GatewayError(ZooterError):
    """An answer in OpenAI's error shape: `status`, and `code`/`param` naming what to fix."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# --- experts' endpoints -----------------------------------------------------------------------------------------

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
        headers = {}
        if ep.api_key_env:
            key = os.environ.get(ep.api_key_env)
            if not key:
                raise ConfigError(f"expert {name}: api_key_env {ep.api_key_env} is not set in the environment")
            headers["Authorization"] = f"Bearer {key}"
        return cls(f"{ep.base_url}/chat/completions", ep.model, headers)


# --- routers ----------------------------------------------------------------------------------------------------

class Loaded:
    """A router, called by one thread at a time (a fast tokenizer is not thread-safe). Requests that arrive while
    it is busy are batched: the next thread to get the router answers every request queued meanwhile with one
    `probs` call, so under load the router runs one batch per wait instead of one request per wait."""

    def __init__(self, fp: str, router: Routes):
        self.fp, self.router = fp, router
        self.experts: list[str] = list(router.experts)
        self._lock = threading.Lock()  # held while the router runs
        self._queued: list[tuple[str, Future]] = []
        self._queue_lock = threading.Lock()

    def probs(self, text: str) -> np.ndarray:
        mine: Future = Future()
        with self._queue_lock:
            self._queued.append((text, mine))
        with self._lock:
            if not mine.done():  # nobody took it along: run everything queued so far, this request included
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                try:
                    out = np.asarray(self.router.probs([t for t, _ in batch]))
                except BaseException as e:  # every request of the batch gets the error
                    for _, f in batch:
                        f.set_exception(e)
                else:
                    for (_, f), p in zip(batch, out, strict=True):
                        f.set_result(p)
        return mine.result()


def _load_router(store: Store, fp: str, quantize: str | None = None, runtime: str = "torch") -> Routes:
    from cluster.router import Router  # torch + transformers: only when a router loads

    return Router.from_store(store, fp, quantize, runtime)


@dataclass(frozen=True)
class Routing:
    """Cost-aware routing as the champion's evaluation recorded it from its config."""

    costs: dict[str, float]
    lam: float
    fallback: Fallback | None = None  # routing.fallback_below: unsure queries go to the best single expert


class Routers:
    """The champion (with its Routing) and recently asked-for routers, loaded once each (thread-safe; blocking:
    call in a thread)."""

    def __init__(self, store: Store, load: Callable[[Store, str], Routes] = _load_router, keep: int = 4):
        self.store, self._load, self._keep = store, load, keep
        self._cache: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._pinned: str | None = None  # the champion's fingerprint: never evicted
        self.champion: Loaded
        self.routing: Routing
        self.refresh()

    def refresh(self) -> bool:
        """Load the store's champion and its Routing when they changed; True when they did."""
        champ = read_champion(self.store)
        if champ is None:
            raise ArtifactError(f"{self.store.uri(CHAMPION_PATH)}: the store has no champion router; train one first")
        if self._pinned == champ.router_fp:
            return False
        report = read_report(self.store, champ.evaluation)
        loaded = self.get(champ.router_fp)
        self._pinned, self.champion = champ.router_fp, loaded
        fallback = (Fallback(report.fallback_below, report.experts.index(report.best_single))
                    if report.fallback_below > 0 else None)
        self.routing = Routing(report.costs or {}, report.lam, fallback)
        return True

    def get(self, fp: str) -> Loaded:
        """The router `fp`; an ArtifactError when the store has none. Loads hold the lock: they are rare."""
        with self._lock:
            if fp in self._cache:
                self._cache.move_to_end(fp)
                return self._cache[fp]
            if not self.store.exists(router_file(fp, ROUTER_JSON)):
                raise ArtifactError(f"no router {fp} in {self.store.url}")
            loaded = self._cache[fp] = Loaded(fp, self._load(self.store, fp))
            for old in [k for k in self._cache if k != self._pinned][:-self._keep]:
                del self._cache[old]  # least recently used first
            return loaded


def parse_model(name: str) -> tuple[str | None, float | None]:
    """`zooter[:<fingerprint>][:lambda=<x>]` -> (fingerprint or None for the champion, lambda or None)."""
    head, *opts = name.split(":")
    if head != MODEL:
        raise GatewayError(404, f"model {name!r} does not exist; use {MODEL!r} (the champion), "
                           f"'{MODEL}:<router fingerprint>' or '{MODEL}:lambda=<x>'", "model_not_found", "model")
    fp = lam = None
    for opt in opts:
        if opt.startswith("lambda="):
            try:
                lam = float(opt.removeprefix("lambda="))
            except ValueError:
                lam = -1.0
            if not (math.isfinite(lam) and lam >= 0):
                raise GatewayError(400, f"model {name!r}: lambda must be a number >= 0", "invalid_value", "model")
        elif fp is None and FINGERPRINT.fullmatch(opt):
            fp = opt
        else:
            raise GatewayError(404, f"model {name!r} does not exist: {opt!r} is not a router fingerprint "
                               "(lowercase hex) or lambda=<x>", "model_not_found", "model")
    return fp, lam


# --- requests ---------------------------------------------------------------------------------------------------

class Message(BaseModel):
    """A chat message; fields other than these are forwarded untouched."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(description="system, user, assistant, tool, ...")
    content: str | list[dict[str, Any]] | None = Field(None, description="Text, or content parts ({type: text, "
                                                       "text} parts are what the router reads).")


class ChatRequest(BaseModel):
    """What the gateway reads of a chat request; every other field is forwarded untouched."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="zooter, zooter:<router fingerprint>, optionally :lambda=<x>.")
    messages: list[Message] = Field(min_length=1, description="The conversation; its last user message routes.")
    stream: bool = Field(False, description="Stream the expert's answer as server-sent events.")

    def query(self) -> str:
        """The text of the last user message (text parts joined by newlines)."""
        for i in range(len(self.messages) - 1, -1, -1):
            m = self.messages[i]
            if m.role != "user":
                continue
            parts = [m.content] if isinstance(m.content, str) else [
                p.get("text") for p in m.content or [] if p.get("type") == "text" and isinstance(p.get("text"), str)]
            text = "\n".join(parts)
            if not visible(text):
                raise GatewayError(400, f"messages.{i}.content: the last user message has no text to route on",
                                   "invalid_value", f"messages.{i}.content")
            return text
        raise GatewayError(400, "messages: no user message to route on", "invalid_value", "messages")


async def _parse(request: Request) -> tuple[dict, ChatRequest]:
    """The body as sent (a JSON object) and as read; a GatewayError 400 naming the field otherwise."""
    try:
        raw = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GatewayError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(raw, dict):
        raise GatewayError(400, "the request body must be a JSON object", "invalid_json")
    try:
        return raw, ChatRequest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise GatewayError(400, f"{where}: {err['msg']}", "invalid_value", where) from None


@dataclass(frozen=True)
class Decision:
    """One routing decision (what /v1/route answers)."""

    expert: str
    probs: dict[str, float]
    router: str
    lam: float

    def as_json(self) -> dict:
        return {"expert": self.expert, "probs": self.probs, "router": self.router, "lambda": self.lam}


# --- the app ----------------------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics on a registry of the app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("zooter_gateway_requests", "Routed requests by endpoint (chat, route) and expert.",
                                ["endpoint", "expert"], registry=self.registry)
        self.latency = Histogram("zooter_gateway_request_seconds", "Chat request latency by expert, routing and "
                                 "the whole upstream answer (stream included).", ["expert"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.decision = Histogram("zooter_gateway_route_seconds", "Router decision latency.", registry=self.registry,
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.errors = Counter("zooter_gateway_errors", "Errors by kind (the error code answered).", ["kind"],
                              registry=self.registry)


def create_app(routers: Routers, endpoints: dict[str, Endpoint], api_key: str | None = None,
               timeout_s: float = 300.0, reload_s: float = 5.0,
               local: dict[str, LocalExpert] | None = None) -> FastAPI:
    """The gateway app. `api_key`: the bearer key every route but /health requires (None: open). `timeout_s`:
    the longest wait for an expert's next bytes; `reload_s`: how often champion.json is checked. `local`: experts
    with no endpoint that this process answers itself (an endpoint wins where both exist)."""
    local = {k: v for k, v in (local or {}).items() if k not in endpoints}
    upstreams = {name: Upstream.of(name, ep) for name, ep in endpoints.items()}
    file_costs = {name: ep.cost for name, ep in endpoints.items() if ep.cost is not None}
    metrics = Metrics()
    state: dict[str, Any] = {}

    def check_endpoints() -> None:
        if missing := [e for e in routers.champion.experts if e not in upstreams and e not in local]:
            log.warning("router %s: experts without an endpoint (chat requests routed to them answer 502): %s",
                        routers.champion.fp, ", ".join(missing))

    async def watch() -> None:
        while True:
            await asyncio.sleep(reload_s)
            try:
                if await run_in_threadpool(routers.refresh):
                    log.info("champion is now router %s", routers.champion.fp)
                    check_endpoints()
            except Exception as e:  # noqa: BLE001 - whatever broke, keep serving the router that works
                metrics.errors.labels("reload_failed").inc()
                log.warning("champion reload failed, still serving %s: %s", routers.champion.fp, e)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as client:
            state["client"] = client
            task = asyncio.create_task(watch())
            try:
                yield
            finally:
                task.cancel()

    check_endpoints()
    app = FastAPI(title="zooter gateway", lifespan=lifespan)

    def fail(e: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(e.code).inc()
        return JSONResponse(e.body(), e.status, headers=headers)

    @app.exception_handler(GatewayError)
    async def _gateway_error(_request: Request, e: GatewayError) -> JSONResponse:
        return fail(e)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, e: HTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else "invalid_request"
        return fail(GatewayError(e.status_code, str(e.detail), code))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise GatewayError(401, "missing or wrong bearer key (Authorization: Bearer <key>)", "invalid_api_key")

    async def decide(body: ChatRequest) -> Decision:
        fp, lam = parse_model(body.model)
        text = body.query()
        try:
            loaded = routers.champion if fp is None else await run_in_threadpool(routers.get, fp)
        except ArtifactError:  # the message holds the store's URL: not for clients
            raise GatewayError(404, f"model {body.model!r} does not exist (no router {fp} in the store)",
                               "model_not_found", "model") from None
        except StoreUnavailable as e:
            raise GatewayError(503, str(e), "store_unavailable", kind="server_error") from None
        t0 = time.perf_counter()
        p = await run_in_threadpool(loaded.probs, text)
        metrics.decision.observe(time.perf_counter() - t0)
        routing = routers.routing
        lam = routing.lam if lam is None else lam
        costs = [(routing.costs | file_costs).get(e) for e in loaded.experts]
        if lam and None in costs:  # cost-aware routing needs every expert's cost
            lam = 0.0
        # the fallback (an expert index of the champion's experts) applies to the champion only
        fallback = routing.fallback if fp is None else None
        i = int(choose(p[None], np.array(costs, dtype=float) if lam else None, lam, fallback)[0])
        return Decision(loaded.experts[i], dict(zip(loaded.experts, map(float, p), strict=True)), loaded.fp, lam)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "router": routers.champion.fp, "experts": routers.champion.experts,
                "endpoints": sorted(upstreams)}

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        ids = [MODEL, f"{MODEL}:{routers.champion.fp}"]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "zooter"}
                                           for i in ids]}

    @app.post("/v1/route", dependencies=[Depends(authorize)])
    async def route(request: Request) -> dict:
        _, body = await _parse(request)
        d = await decide(body)
        metrics.requests.labels("route", d.expert).inc()
        return d.as_json()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request) -> Response:
        t0 = time.perf_counter()
        raw, body = await _parse(request)
        d = await decide(body)
        metrics.requests.labels("chat", d.expert).inc()
        headers = {"x-zooter-expert": d.expert, "x-zooter-router": d.router}
        up = upstreams.get(d.expert)
        if up is None and d.expert in local:
            max_tokens = raw.get("max_completion_tokens") or raw.get("max_tokens")
            g = await run_in_threadpool(local[d.expert].answer, body.query(),
                                        max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None)
            metrics.latency.labels(d.expert).observe(time.perf_counter() - t0)
            return _local_answer(d.expert, g, body.stream, headers)
        if up is None:
            return fail(GatewayError(502, f"expert {d.expert} has no endpoint (add it to --experts, publish a "
                                     "config where it is `backend: openai`, or serve it with --local-experts)",
                                     "expert_unavailable", kind="server_error"), headers)
        client: httpx.AsyncClient = state["client"]
        req = client.build_request("POST", up.url, json=raw | {"model": up.model}, headers=up.headers)
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            return fail(_upstream_error(d.expert, e), headers)
        if resp.status_code >= 400:
            await resp.aread()
            await resp.aclose()
            if resp.status_code >= 500:
                return fail(GatewayError(502, f"expert {d.expert} answered {resp.status_code}: "
                                         f"{resp.text[:500]}", "expert_error", kind="server_error"), headers)
            metrics.errors.labels(f"expert_{resp.status_code}").inc()
            return Response(resp.content, resp.status_code, headers=headers,
                            media_type=resp.headers.get("content-type"))
        if body.stream:
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.aiter_bytes():
                        yield chunk
                except httpx.HTTPError as e:  # the status is sent: tell the client in the stream
                    yield b"data: " + bytes(fail(_upstream_error(d.expert, e)).body) + b"\n\n"
                finally:
                    await resp.aclose()
                    metrics.latency.labels(d.expert).observe(time.perf_counter() - t0)
            return StreamingResponse(relay(), resp.status_code, headers=headers,
                                     media_type=resp.headers.get("content-type", "text/event-stream"))
        try:
            await resp.aread()
            answer = resp.json()
        except httpx.HTTPError as e:
            return fail(_upstream_error(d.expert, e), headers)
        except json.JSONDecodeError:
            return fail(GatewayError(502, f"expert {d.expert} answered with no JSON", "expert_error",
                                     kind="server_error"), headers)
        finally:
            await resp.aclose()
        if isinstance(answer, dict):
            answer["model"] = f"{MODEL}/{d.expert}"
        metrics.latency.labels(d.expert).observe(time.perf_counter() - t0)
        return JSONResponse(answer, resp.status_code, headers=headers)

    return app


def _local_answer(expert: str, g: Generation, stream: bool, headers: dict[str, str]) -> Response:
    """A local expert's answer as an OpenAI chat completion, or as its server-sent events (one content chunk)."""
    base = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": f"{MODEL}/{expert}"}
    if not stream:
        return JSONResponse(base | {"object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": g.response}, "finish_reason": g.finish_reason}],
            "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.new_tokens,
                      "total_tokens": g.prompt_tokens + g.new_tokens}}, headers=headers)
    chunk = base | {"object": "chat.completion.chunk"}
    deltas = [({"role": "assistant", "content": g.response}, None), ({}, g.finish_reason)]
    events = [json.dumps(chunk | {"choices": [{"index": 0, "delta": d, "finish_reason": f}]}) for d, f in deltas]
    body = "".join(f"data: {e}\n\n" for e in [*events, "[DONE]"])
    return Response(body, headers=headers, media_type="text/event-stream")


def _upstream_error(expert: str, e: httpx.HTTPError) -> GatewayError:
    """Unreachable (refused, DNS, connect timeout) or broken: 502; no answer in time: 504."""
    if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
        return GatewayError(504, f"expert {expert} did not answer in time ({type(e).__name__})", "expert_timeout",
                            kind="server_error")
    return GatewayError(502, f"expert {expert} is unreachable ({type(e).__name__}: {e})", "expert_unavailable",
                        kind="server_error")


def serve(store_url: str, host: str = "127.0.0.1", port: int = 8000, experts_file: Path | None = None,
          api_key_env: str | None = None, timeout_s: float = 300.0, reload_s: float = 5.0,
          with_local_experts: bool = False, quantize: str | None = None, runtime: str = "torch") -> None:
    """Load the champion and the endpoints (errors here are ZooterErrors, before anything listens), then serve.
    `quantize`: "int8" runs every router's encoder quantised; `runtime`: "onnx" runs it in ONNX Runtime
    (cluster.router.Router)."""
    import uvicorn

    if not log.handlers:  # our lines beside uvicorn's, on stderr; not the root logger (httpx logs every request)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:  %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {api_key_env}: the environment variable is not set")
    store = Store(store_url)
    endpoints = load_endpoints(store, experts_file)
    routers = Routers(store, functools.partial(_load_router, quantize=quantize, runtime=runtime))
    with contextlib.suppress(ValueError):
        if api_key is None and not ipaddress.ip_address(host).is_loopback:
            log.warning("listening on %s with no bearer key (--api-key-env): anyone who reaches it can use it", host)
    app = create_app(routers, endpoints, api_key, timeout_s, reload_s,
                     local_experts(store) if with_local_experts else None)
    uvicorn.run(app, host=host, port=port, log_level="info")
