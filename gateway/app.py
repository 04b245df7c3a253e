"""The gateway's app: `create_app` (FastAPI) and `serve` (uvicorn). See the package docstring for the API."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from gateway.errors import GatewayError, upstream_head, upstream_status
from gateway.experts import Endpoint, LocalExpert, Upstream, load_endpoints, local_experts, upstream_error
from gateway.routers import MAX_QUEUE, MODEL, Decision, Routers, load_router, parse_model
from gateway.traffic import Traffic, feedback_router
from schemas.config import ConfigError
from schemas.errors import ArtifactError, StoreUnavailable
from schemas.store import Store
from tasks.records import visible
from tasks.route import choose

if TYPE_CHECKING:
    from cluster.batches import Generation

log = logging.getLogger("zooter.gateway")

# The gateway's limits (docs/failures.md lists them with these defaults; `zooter gateway` options change the first
# two and the router queue's, gateway.routers.MAX_QUEUE).
MAX_BODY_BYTES = 1 << 20  # a request body (--max-body-bytes): larger is a 413 before it is read
BODY_TIMEOUT_S = 30.0  # to receive a whole request body (--body-timeout): slower is a 408 and the connection closes
MAX_JSON_DEPTH = 64  # nesting of a request body's arrays and objects: deeper is a 400
MAX_MODEL_CHARS = 256  # of `model`


class BodyLimits:
    """ASGI middleware: every request body (any endpoint) is at most `max_bytes`, by its Content-Length and by
    what arrives, and arrives within `timeout_s` of the request's start. Past either, the app's next read of the
    body raises a GatewayError (413, 408) that closes the connection (a half-sent body keeps nothing open)."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.timeout_s
        size, done = 0, False
        close = {"connection": "close"}

        def too_large(n: str) -> GatewayError:
            return GatewayError(413, f"the request body is {n} bytes; the limit is {self.max_bytes} "
                                "(--max-body-bytes)", "request_too_large", headers=close)

        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            async def refuse() -> dict:
                raise too_large(declared.decode())
            return await self.app(scope, refuse, send)

        async def limited() -> dict:
            nonlocal size, done
            if done:  # the body is in: what comes now is a disconnect, waited for as long as it takes
                return await receive()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise GatewayError(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                   "(--body-timeout)", "request_timeout", headers=close) from None
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_bytes:
                    raise too_large(f"more than {self.max_bytes}")
                done = not message.get("more_body", False)
            return message

        return await self.app(scope, limited, send)


def _too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects nest deeper than `limit` levels (iteratively: no recursion to run out of)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > limit:
                return True
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


class Message(BaseModel):
    """A chat message; fields other than these are forwarded untouched. Strict: no coercion between types."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: str = Field(max_length=64, description="system, user, assistant, tool, ...")
    content: str | list[dict[str, Any]] | None = Field(None, description="Text, or content parts ({type: text, "
                                                       "text} parts are what the router reads).")


class ChatRequest(BaseModel):
    """What the gateway reads of a chat request; every other field is forwarded untouched."""

    model_config = ConfigDict(extra="allow", strict=True)  # `"stream": "yes"` is a 400, not true

    model: str = Field(max_length=MAX_MODEL_CHARS, description="zooter, zooter:<router fingerprint>, optionally "
                       ":lambda=<x>.")
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
    too_deep = GatewayError(400, f"the request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels",
                            "invalid_json")
    try:
        raw = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GatewayError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    except RecursionError:
        raise too_deep from None
    if _too_deep(raw):
        raise too_deep
    if not isinstance(raw, dict):
        raise GatewayError(400, "the request body must be a JSON object", "invalid_json")
    try:
        return raw, ChatRequest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise GatewayError(400, f"{where}: {err['msg']}", "invalid_value", where) from None


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
               local: dict[str, LocalExpert] | None = None, traffic: Traffic | None = None,
               *, max_body_bytes: int = MAX_BODY_BYTES, body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The gateway app. `max_body_bytes`, `body_timeout_s`: every request body's limits (BodyLimits); with a key,
    /openapi.json needs it too and the browsable /docs and /redoc are off (a browser would not send the key).
    `api_key`: the bearer key every route but /health requires (None: open). `timeout_s`:
    the longest wait for an expert's next bytes; `reload_s`: how often champion.json is checked. `local`: experts
    with no endpoint that this process answers itself (an endpoint wins where both exist). `traffic`: record
    every routed request and take feedback (gateway/traffic.py); None: nothing about requests is written."""
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
            if traffic is not None:
                traffic.start()
            try:
                yield
            finally:
                task.cancel()
                if traffic is not None:  # shutdown (SIGTERM too): the pending batches are written
                    await run_in_threadpool(traffic.close)

    check_endpoints()
    closed = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key is not None else {}
    app = FastAPI(title="zooter gateway", lifespan=lifespan, **closed)
    app.add_middleware(BodyLimits, max_bytes=max_body_bytes, timeout_s=body_timeout_s)

    def fail(e: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(e.code).inc()
        return JSONResponse(e.body(), e.status, headers=(e.headers or {}) | (headers or {}))

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

    if api_key is not None:
        @app.get("/openapi.json", dependencies=[Depends(authorize)], include_in_schema=False)
        async def openapi() -> dict:
            return app.openapi()

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
        p = await asyncio.wrap_future(loaded.submit(text))  # its worker batches; a full queue is a 429 here
        metrics.decision.observe(time.perf_counter() - t0)
        policy = routers.policy
        lam = policy.lam if lam is None else lam
        costs = [((policy.report.costs or {}) | file_costs).get(e) for e in loaded.experts]
        if lam and None in costs:  # cost-aware routing needs every expert's cost
            lam = 0.0
        # the fallback (an expert index of the champion's experts) applies to the champion only
        fallback = policy.fallback if fp is None else None
        i = int(choose(p[None], np.array(costs, dtype=float) if lam else None, lam, fallback)[0])
        return Decision(loaded.experts[i], dict(zip(loaded.experts, map(float, p), strict=True)), loaded.fp, lam)

    def record(d: Decision, body: ChatRequest, endpoint: str) -> dict[str, str]:
        return {} if traffic is None else {"x-zooter-request-id": traffic.record(d, body.query(), endpoint)}

    app.include_router(feedback_router(traffic), dependencies=[Depends(authorize)])

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
        rid = record(d, body, "route")
        return d.as_json() | ({"request_id": rid["x-zooter-request-id"]} if rid else {})

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request) -> Response:
        t0 = time.perf_counter()
        raw, body = await _parse(request)
        d = await decide(body)
        metrics.requests.labels("chat", d.expert).inc()
        headers = {"x-zooter-expert": d.expert, "x-zooter-router": d.router} | record(d, body, "chat")
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
            return fail(upstream_error(d.expert, e), headers)
        if resp.status_code >= 400:  # summarised (errors.upstream_status), never relayed
            try:
                got = await upstream_head(resp)
            except httpx.HTTPError:
                got = b""
            finally:
                await resp.aclose()
            if resp.status_code >= 500:  # for the operator, not the client
                log.warning("expert %s answered %s: %r", d.expert, resp.status_code, got[:300])
            return fail(upstream_status(d.expert, resp.status_code, got), headers)
        if body.stream:
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.aiter_bytes():
                        yield chunk
                except httpx.HTTPError as e:  # the status is sent: tell the client in the stream
                    yield b"data: " + bytes(fail(upstream_error(d.expert, e)).body) + b"\n\n"
                finally:
                    await resp.aclose()
                    metrics.latency.labels(d.expert).observe(time.perf_counter() - t0)
            return StreamingResponse(relay(), resp.status_code, headers=headers,
                                     media_type=resp.headers.get("content-type", "text/event-stream"))
        try:
            await resp.aread()
            answer = resp.json()
        except httpx.HTTPError as e:
            return fail(upstream_error(d.expert, e), headers)
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


def serve(store_url: str, host: str = "127.0.0.1", port: int = 8000, experts_file: Path | None = None,
          api_key_env: str | None = None, timeout_s: float = 300.0, reload_s: float = 5.0,
          max_body_bytes: int = MAX_BODY_BYTES, body_timeout_s: float = BODY_TIMEOUT_S, max_queue: int = MAX_QUEUE,
          with_local_experts: bool = False, quantize: str | None = None, runtime: str = "auto",
          record: bool = False, record_batch: int = 256, record_flush_s: float = 10.0) -> None:
    """Load the champion and the endpoints (errors here are ZooterErrors, before anything listens), then serve.
    `max_body_bytes`, `body_timeout_s`: create_app's limits; `max_queue`: requests waiting per router before a 429.
    `runtime` "auto": ONNX Runtime on CPU where its probabilities match torch's at load, else torch.
    `quantize`: "int8" runs every router's encoder quantised; `runtime`: "onnx" runs it in ONNX Runtime
    (cluster.router.Router). `record`: keep every routed request and its feedback in the store's traffic/, in
    batches of `record_batch` rows or `record_flush_s` seconds (gateway/traffic.py)."""
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
    routers = Routers(store, functools.partial(load_router, quantize=quantize, runtime=runtime), max_queue=max_queue)
    with contextlib.suppress(ValueError):
        if api_key is None and not ipaddress.ip_address(host).is_loopback:
            log.warning("listening on %s with no bearer key (--api-key-env): anyone who reaches it can use it", host)
    app = create_app(routers, endpoints, api_key, timeout_s, reload_s,
                     local_experts(store) if with_local_experts else None,
                     Traffic.of(store, record_batch, record_flush_s) if record else None,
                     max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
    uvicorn.run(app, host=host, port=port, log_level="info")
