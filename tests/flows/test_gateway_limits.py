"""The gateway's limits over real HTTP on 127.0.0.1 (issue 37): each bad request gets its status and one line in
OpenAI's error shape naming the field or the limit, and the gateway goes on serving everyone else. Routers are real
(a tiny random encoder whose head is set so the choice is known, as in test_gateway.py); experts are FastAPI apps
on loopback, some of which fail on purpose."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from typer.testing import CliRunner

from flows.cli import app as cli
from gateway.app import MAX_BODY_BYTES, MAX_JSON_DEPTH, create_app
from gateway.experts import Endpoint
from gateway.routers import Routers
from schemas.artifacts import CHAMPION_PATH, report_path
from schemas.evaluation import Champion, EvalReport
from schemas.store import Store
from tests.flows.test_gateway import fake_expert, serving, write_routers

SECRET = "internal-db-password-7f3a"  # what a failing expert's body holds; never for the client
# router fingerprint -> (experts, probabilities it gives every text)
ROUTERS = {"a1a1a1": (["alpha", "beta"], [0.6, 0.4]),
           "c5c5c5": (["crash", "alpha"], [0.9, 0.1]),
           "f6f6f6": (["picky", "alpha"], [0.9, 0.1]),
           "a7a7a7": (["html", "alpha"], [0.9, 0.1])}
MAX_LENGTH = 16  # the routers' max_length: text past 16 x 64 characters is never tokenised
ASK = {"model": "zooter", "messages": [{"role": "user", "content": "a question that routes"}]}


def failing_experts() -> dict[str, FastAPI]:
    """crash: a 500 whose body is a traceback with a secret; picky: an OpenAI-shape 400 whose message is long and
    has several lines; html: a 404 page."""
    crash, picky, html = FastAPI(), FastAPI(), FastAPI()

    @crash.post("/v1/chat/completions")
    async def _crash() -> PlainTextResponse:
        return PlainTextResponse(f"Traceback (most recent call last):\n  File \"/srv/app.py\"\nKeyError: {SECRET}",
                                 500)

    @picky.post("/v1/chat/completions")
    async def _picky() -> JSONResponse:
        message = "This model's maximum context length is 4096 tokens.\n" + f"{SECRET} " * 500
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": "messages",
                                       "code": "context_length_exceeded"}}, 400)

    @html.post("/v1/chat/completions")
    async def _html() -> PlainTextResponse:
        return PlainTextResponse(f"<html><body>{SECRET}</body></html>", 404, media_type="text/html")

    return {"crash": crash, "picky": picky, "html": html}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """A store with the ROUTERS (real router directories on a tiny random BERT) and a1a1a1 as champion."""
    root = tmp_path_factory.mktemp("limits")
    write_routers(root, ROUTERS, max_length=MAX_LENGTH)
    store = Store(str(root / "store"))
    experts = ROUTERS["a1a1a1"][0]
    report = EvalReport(evaluation="eva1", labels="l0", router="a1a1a1", experts=experts, test_queries=1,
                        best_single=experts[0], rows=[], router_share={})
    store.write_json(report_path(report.evaluation), report.model_dump(mode="json"))
    store.write_json(CHAMPION_PATH, Champion(
        router="routers/a1a1a1", evaluation="evaluations/eva1", labels="l0", experts=experts, reward=None,
        run_id="test", published=dt.datetime.now(dt.UTC).isoformat()).model_dump(mode="json"))
    return root / "store"


@pytest.fixture(scope="module")
def endpoints() -> Iterator[dict[str, Endpoint]]:
    apps = {"alpha": fake_expert("alpha"), "beta": fake_expert("beta")} | failing_experts()
    with serving(apps["alpha"]) as a, serving(apps["beta"]) as b, serving(apps["crash"]) as c, \
            serving(apps["picky"]) as p, serving(apps["html"]) as h:
        urls = {"alpha": a, "beta": b, "crash": c, "picky": p, "html": h}
        yield {name: Endpoint(base_url=f"{u}/v1", model=f"served-{name}") for name, u in urls.items()}


@pytest.fixture(scope="module")
def app_parts(store_dir, endpoints) -> Iterator[tuple[str, Routers]]:
    """The gateway with its default limits but a 1 s body timeout; (base URL, its Routers)."""
    routers = Routers(Store(str(store_dir)))
    with serving(create_app(routers, endpoints, timeout_s=5.0, body_timeout_s=1.0)) as url:
        yield url, routers


@pytest.fixture(scope="module")
def gw(app_parts) -> str:
    return app_parts[0]


def error(r: httpx.Response, status: int, code: str, param: str | None, says: str) -> dict:
    """The answer is `status` with one line in OpenAI's error shape; its fields."""
    err = r.json()["error"]
    assert r.status_code == status, r.text
    assert set(err) == {"message", "type", "param", "code"} and (err["code"], err["param"]) == (code, param), err
    assert says in err["message"] and "\n" not in err["message"], err["message"]
    return err


def serves(url: str) -> None:
    """The gateway still routes an ordinary request."""
    r = httpx.post(f"{url}/v1/route", json=ASK, timeout=30)
    assert r.status_code == 200 and r.json()["expert"] == "alpha", r.text


def post(url: str, body: bytes, path: str = "route") -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", content=body, headers={"content-type": "application/json"}, timeout=30)


# --- body size and time ---------------------------------------------------------------------------------------

def test_a_body_over_the_limit_is_a_413_by_its_length_or_by_what_arrives(gw):
    assert MAX_BODY_BYTES == 1 << 20  # the documented default
    big = json.dumps({"model": "zooter", "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}).encode()
    for path in ("route", "chat/completions"):
        err = error(post(gw, big, path), 413, "request_too_large", None, f"the limit is {MAX_BODY_BYTES}")
        assert f"{len(big)} bytes" in err["message"] and "--max-body-bytes" in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield big[:1000]
        for i in range(1000, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]
    r = httpx.post(f"{gw}/v1/route", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    error(r, 413, "request_too_large", None, f"more than {MAX_BODY_BYTES} bytes")
    serves(gw)


def test_a_long_message_under_the_limit_is_cut_before_it_is_tokenised(app_parts):
    url, routers = app_parts
    tok = routers.champion.router.tok
    seen: list[int] = []

    class Spy:  # the router's tokenizer, recording the longest text it is given
        def __call__(self, texts, *a, **kw):
            seen.append(max(map(len, [texts] if isinstance(texts, str) else texts)))
            return tok(texts, *a, **kw)

        def __getattr__(self, name):
            return getattr(tok, name)

    routers.champion.router.tok = Spy()
    try:
        body = {"model": "zooter", "messages": [{"role": "user", "content": "word " * 200_000}]}  # ~1 MB of text
        r = httpx.post(f"{url}/v1/route", json=body, timeout=60)
    finally:
        routers.champion.router.tok = tok
    assert r.status_code == 200 and r.json()["expert"] == "alpha", r.text
    assert seen and max(seen) <= MAX_LENGTH * 64  # not 1,000,000 characters
    serves(url)


def test_a_half_sent_body_is_a_408_that_closes_its_connection_while_others_are_served(gw):
    port = int(gw.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/route HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000"
                  b"\r\n\r\n{\"model\": \"zooter\"")
        serves(gw)  # while that body is pending
        got = b""
        while chunk := s.recv(65536):  # until the gateway closes the connection
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), got
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and "within 1 s (--body-timeout)" in err["message"], err
    serves(gw)


# --- body shape -----------------------------------------------------------------------------------------------

def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("body", [
    nested(100_000),  # past the JSON parser's recursion limit: was a 500 (RecursionError)
    json.dumps(ASK).encode()[:-1] + b', "tools": ' + nested(MAX_JSON_DEPTH) + b"}",  # one level past the limit
])
def test_json_nested_too_deep_is_a_400(gw, body):
    for path in ("route", "chat/completions"):
        error(post(gw, body, path), 400, "invalid_json", None, f"deeper than {MAX_JSON_DEPTH} levels")
    ok = json.dumps(ASK).encode()[:-1] + b', "tools": ' + nested(MAX_JSON_DEPTH - 1) + b"}"  # at the limit
    assert post(gw, ok).status_code == 200
    serves(gw)


@pytest.mark.parametrize(("change", "param", "says"), [
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"stream": 1}, "stream", "valid boolean"),
    ({"model": 5}, "model", "valid string"),
    ({"model": "zooter:" + "a" * 300}, "model", "at most 256 characters"),
    ({"messages": [{"role": 1, "content": "hi"}]}, "messages.0.role", "valid string"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages.0.content.str", "valid string"),
    ({"messages": [{"role": "u" * 100, "content": "hi"}]}, "messages.0.role", "at most 64 characters"),
])
def test_request_fields_have_strict_types_and_sizes(gw, change, param, says):
    for path in ("route", "chat/completions"):
        r = httpx.post(f"{gw}/v1/{path}", json=ASK | change, timeout=30)
        error(r, 400, "invalid_value", param, says)
    serves(gw)


@pytest.mark.parametrize(("model", "says"), [
    ("zooter:lambda=0.1:lambda=2", "lambda is given twice"),
    ("zooter:a1a1a1:c5c5c5", "a router fingerprint is given twice"),
])
def test_a_model_option_given_twice_is_a_400(gw, model, says):
    error(httpx.post(f"{gw}/v1/route", json=ASK | {"model": model}, timeout=30), 400, "invalid_value", "model", says)
    serves(gw)


# --- the router's queue ---------------------------------------------------------------------------------------

class HeldRouter:
    """A router whose calls wait until released (so requests pile up behind the one it is running)."""

    experts = ["alpha", "beta"]

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def probs(self, texts: list[str]) -> np.ndarray:
        self.entered.set()
        assert self.release.wait(60)
        return np.tile([0.6, 0.4], (len(texts), 1))


def test_a_full_router_queue_is_a_429_and_the_queued_requests_still_get_answers(store_dir, endpoints):
    held = HeldRouter()
    routers = Routers(Store(str(store_dir)), load=lambda _s, _fp: held, max_queue=2)
    with serving(create_app(routers, endpoints)) as url, httpx.Client(timeout=60) as c:
        answers: list[httpx.Response] = []

        def ask() -> None:
            answers.append(c.post(f"{url}/v1/route", json=ASK))

        first = threading.Thread(target=ask)
        first.start()
        assert held.entered.wait(30)  # the router runs the first request
        queued = [threading.Thread(target=ask) for _ in range(2)]
        for t in queued:
            t.start()
        deadline = threading.Event()
        while len(routers.champion._queued) < 2:  # both wait behind it, filling the queue
            assert not deadline.wait(0.01) and all(t.is_alive() for t in queued)
        r = c.post(f"{url}/v1/route", json=ASK)
        err = error(r, 429, "rate_limit_exceeded", None, "has 2 requests waiting, its limit (--max-queue)")
        assert err["type"] == "requests" and r.headers["retry-after"] == "1"
        held.release.set()
        for t in [first, *queued]:
            t.join(60)
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert c.post(f"{url}/v1/route", json=ASK).status_code == 200


# --- docs and upstream errors ---------------------------------------------------------------------------------

def test_docs_and_the_openapi_schema_need_the_key_when_there_is_one(store_dir, endpoints):
    with serving(create_app(Routers(Store(str(store_dir))), endpoints, api_key="s3cret")) as url:
        assert httpx.get(f"{url}/docs").status_code == 404 and httpx.get(f"{url}/redoc").status_code == 404
        error(httpx.get(f"{url}/openapi.json"), 401, "invalid_api_key", None, "missing or wrong bearer key")
        schema = httpx.get(f"{url}/openapi.json", headers={"authorization": "Bearer s3cret"})
        assert schema.status_code == 200 and "/v1/route" in schema.json()["paths"]
    with serving(create_app(Routers(Store(str(store_dir))), endpoints)) as url:  # no key: open, as before
        assert httpx.get(f"{url}/docs").status_code == 200 and httpx.get(f"{url}/openapi.json").status_code == 200


@pytest.mark.parametrize(("router", "status", "code", "param", "says"), [
    ("c5c5c5", 502, "expert_error", None, "expert crash answered 500 Internal Server Error"),
    ("f6f6f6", 400, "context_length_exceeded", "messages",
     "expert picky refused the request (400 Bad Request): This model's maximum context length is 4096 tokens."),
    ("a7a7a7", 404, "expert_rejected", None, "expert html refused the request (404 Not Found)"),
])
def test_an_experts_error_answer_is_summarised_not_relayed(gw, router, status, code, param, says):
    for stream in (False, True):
        r = httpx.post(f"{gw}/v1/chat/completions", json=ASK | {"model": f"zooter:{router}", "stream": stream},
                       timeout=30)
        err = error(r, status, code, param, says)
        assert SECRET not in r.text and "Traceback" not in r.text and len(err["message"]) <= 300
        assert r.headers["x-zooter-expert"] == ROUTERS[router][0][0]
    serves(gw)


def test_the_cli_takes_the_limits_and_refuses_nonsense(tmp_path):
    for args in (["--max-body-bytes", "10"], ["--body-timeout", "0"], ["--max-queue", "0"]):
        result = CliRunner().invoke(cli, ["gateway", "--store", str(tmp_path), *args])
        assert result.exit_code == 2 and args[0] in result.output, result.output


# --- the default runtime ---------------------------------------------------------------------------------------

def test_the_default_runtime_is_onnx_on_cpu_and_torch_where_onnx_cannot_serve(store_dir, monkeypatch, tmp_path):
    from gateway.routers import load_router

    monkeypatch.setenv("ZOOTER_CACHE", str(tmp_path / "cache"))
    store = Store(str(store_dir))
    auto = load_router(store, "a1a1a1", runtime="auto")
    torch_router = load_router(store, "a1a1a1", runtime="torch")
    assert auto.runtime == "onnx" and auto.onnx is not None and torch_router.onnx is None
    texts = ["a question", "another, somewhat longer question about routing"]
    np.testing.assert_allclose(auto.probs(texts), torch_router.probs(texts), atol=1e-5)
    from cluster.onnx_encoder import OnnxEncoder

    def broken(*_a, **_kw):
        raise RuntimeError("no ONNX Runtime here")

    monkeypatch.setattr(OnnxEncoder, "load_or_export", broken)  # an encoder ONNX Runtime cannot take
    fallback = load_router(store, "a1a1a1", runtime="auto")
    assert fallback.runtime == "torch" and fallback.onnx is None
    np.testing.assert_allclose(fallback.probs(texts), torch_router.probs(texts), atol=1e-6)
