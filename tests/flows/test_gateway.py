"""The gateway over real HTTP on 127.0.0.1: the `openai` client talks to it, it routes with real routers loaded from
a store (a tiny random encoder whose head is set so the choice is known) and forwards to fake OpenAI-compatible
experts (FastAPI apps on loopback that answer with their own name)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from flows.cli import app as cli
from gateway.app import create_app
from gateway.experts import Endpoint, load_endpoints, local_experts
from gateway.routers import Loaded, Routers
from schemas.artifacts import CHAMPION_PATH, report_path, run_manifest_path, run_plan_path
from schemas.config import ConfigError, RouterConfig, load_config
from schemas.evaluation import Champion, EvalReport
from schemas.store import Store
from tasks.experts import CURRENT, publish_config, published
from tests.conftest import minilm_dir

# router fingerprint -> (experts, probabilities it gives every text)
ROUTERS = {"a1a1a1": (["alpha", "beta"], [0.6, 0.4]),
           "b2b2b2": (["alpha", "beta"], [0.1, 0.9]),
           "d3d3d3": (["down", "alpha"], [0.9, 0.1]),
           "e4e4e4": (["slow", "alpha"], [0.9, 0.1])}
COSTS = {"alpha": 10.0, "beta": 99.0}  # what the champion's evaluation recorded (the experts file says beta: 1)
KEY = "ZOOTER_TEST_ALPHA_KEY"


# --- servers ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def fake_expert(name: str, delay_s: float = 0.0) -> FastAPI:
    """An OpenAI-compatible chat endpoint that answers "I am <name>" (streamed in two chunks when asked) and keeps
    every request body and Authorization header it got in `app.state.got`."""
    app = FastAPI()
    app.state.got = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.got.append((body, request.headers.get("authorization")))
        await asyncio.sleep(delay_s)
        if body.get("stream"):
            async def events():
                for i, piece in enumerate(["I am", f" {name}"]):
                    delta = {"content": piece} | ({"role": "assistant"} if i == 0 else {})
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"I am {name}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a store with routers ---------------------------------------------------------------------------------------

def crown(store_dir: Path, fp: str, lam: float = 0.0) -> None:
    """Make router `fp` the store's champion, with an evaluation that recorded COSTS and `lam`."""
    experts, store = ROUTERS[fp][0], Store(str(store_dir))
    report = EvalReport(evaluation=f"ev{fp}", labels="l0", router=fp, experts=experts, test_queries=1,
                        best_single=experts[0], rows=[], router_share={}, costs=COSTS, lam=lam)
    store.write_json(report_path(report.evaluation), report.model_dump(mode="json"))
    champ = Champion(router=f"routers/{fp}", evaluation=f"evaluations/{report.evaluation}", labels="l0",
                     experts=experts, reward=None, run_id="test", published=dt.datetime.now(dt.UTC).isoformat())
    store.write_json(CHAMPION_PATH, champ.model_dump(mode="json"))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """A store with the ROUTERS (real router directories: a tiny random BERT, the head's weights zero and its bias
    the log of the wanted probabilities) and a1a1a1 as champion."""
    root = tmp_path_factory.mktemp("gw")
    write_routers(root, ROUTERS, max_length=16)
    crown(root / "store", "a1a1a1")
    return root / "store"


def write_routers(root: Path, routers: dict[str, tuple[list[str], list[float]]], max_length: int) -> None:
    """Real router directories under root/store/routers/<fp> on one tiny random BERT (root/enc): each head's weights
    zero and its bias the log of the wanted probabilities, so the router gives those for any text."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from cluster.router import build_from_config, save

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128)).save_pretrained(root / "enc")
    tok.save_pretrained(root / "enc")
    cfg = RouterConfig(encoder=str(root / "enc"), max_length=max_length)
    for fp, (experts, p) in routers.items():
        model, tok = build_from_config(cfg, len(experts))
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.log(torch.tensor(p)))
        save(model, tok, cfg, root / "store" / "routers" / fp, {"experts": experts})


@pytest.fixture(scope="module")
def experts() -> Iterator[dict]:
    """Running experts alpha, beta and slow, their apps, and an experts file (alpha needs a key; down: nothing
    listens on its port)."""
    apps = {"alpha": fake_expert("alpha"), "beta": fake_expert("beta"), "slow": fake_expert("slow", delay_s=5)}
    with serving(apps["alpha"]) as a, serving(apps["beta"]) as b, serving(apps["slow"]) as s:
        yield {"apps": apps, "urls": {"alpha": a, "beta": b, "slow": s}, "file": {
            "alpha": {"base_url": f"{a}/v1", "model": "served-alpha", "api_key_env": KEY},
            "beta": {"base_url": f"{b}/v1", "model": "served-beta", "cost": 1},
            "slow": {"base_url": f"{s}/v1", "model": "served-slow"},
            "down": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "served-down"}}}


@contextlib.contextmanager
def gateway(store_dir: Path, experts: dict, tmp: Path, **kw) -> Iterator[str]:
    """The gateway app on `store_dir` with the `experts` file, served on loopback; yields its /v1 URL."""
    path = tmp / "experts.yaml"
    path.write_text(yaml.safe_dump(experts["file"]))
    store = Store(str(store_dir))
    os.environ[KEY] = "alpha-secret"
    try:
        app = create_app(Routers(store), load_endpoints(store, path), **{"timeout_s": 1.0} | kw)
    finally:
        del os.environ[KEY]
    with serving(app) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def gw(store_dir, experts, tmp_path_factory) -> Iterator[str]:
    with gateway(store_dir, experts, tmp_path_factory.mktemp("gw-cfg")) as url:
        yield url


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def metrics(url: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, from /metrics."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "the question that routes"}]


# --- tests --------------------------------------------------------------------------------------------------------

def test_a_chat_goes_to_the_champions_choice_and_comes_back_naming_it(gw, experts):
    got = experts["apps"]["alpha"].state.got
    before = len(got)
    raw = client(gw).chat.completions.with_raw_response.create(model="zooter", messages=CHAT, temperature=0.3,
                                                               extra_body={"top_k": 5})
    answer = raw.parse()
    assert raw.headers["x-zooter-expert"] == "alpha" and raw.headers["x-zooter-router"] == "a1a1a1"
    assert answer.model == "zooter/alpha" and answer.choices[0].message.content == "I am alpha"
    assert answer.usage.total_tokens == 6
    body, auth = got[before]  # the body went upstream as sent, with the served model id and alpha's own key
    assert body == {"model": "served-alpha", "messages": CHAT, "temperature": 0.3, "top_k": 5}
    assert auth == "Bearer alpha-secret"


def test_a_stream_comes_through_unchanged(gw, experts):
    raw = client(gw).chat.completions.with_raw_response.create(model="zooter:b2b2b2", messages=CHAT, stream=True)
    assert raw.headers["x-zooter-expert"] == "beta"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "I am beta"
    assert {c.model for c in chunks} == {"served-beta"}  # the expert's own chunks
    body = {"model": "zooter:b2b2b2", "messages": CHAT, "stream": True}
    via_gateway = httpx.post(f"{gw}/chat/completions", json=body).content
    direct = httpx.post(f"{experts['urls']['beta']}/v1/chat/completions", json=body | {"model": "served-beta"})
    assert via_gateway == direct.content and via_gateway.endswith(b"data: [DONE]\n\n")


def test_route_answers_only_the_decision_and_lambda_weighs_cost(gw, experts):
    calls = {n: len(a.state.got) for n, a in experts["apps"].items()}
    d = httpx.post(f"{gw}/route", json={"model": "zooter", "messages": CHAT}).json()
    assert d["expert"] == "alpha" and d["router"] == "a1a1a1" and d["lambda"] == 0
    assert d["probs"] == pytest.approx({"alpha": 0.6, "beta": 0.4}, abs=1e-5)
    # costs alpha 10 (recorded), beta 1 (the file's, not the recorded 99): 0.6 - 0.5 * 10/10 < 0.4 - 0.5 * 1/10
    d = httpx.post(f"{gw}/route", json={"model": "zooter:lambda=0.5", "messages": CHAT}).json()
    assert d["expert"] == "beta" and d["lambda"] == 0.5
    d = httpx.post(f"{gw}/route", json={"model": "zooter:b2b2b2:lambda=0.01", "messages": CHAT}).json()
    assert d["expert"] == "beta" and d["router"] == "b2b2b2"
    assert {n: len(a.state.got) for n, a in experts["apps"].items()} == calls  # no expert was called


def test_lambda_is_ignored_when_an_expert_has_no_cost(gw):
    d = httpx.post(f"{gw}/route", json={"model": "zooter:d3d3d3:lambda=5", "messages": CHAT}).json()
    assert d["expert"] == "down" and d["lambda"] == 0  # `down` has no cost


def test_models_health_and_metrics(gw):
    assert [m.id for m in client(gw).models.list()] == ["zooter", "zooter:a1a1a1"]
    r = httpx.get(f"{gw}/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    health = httpx.get(gw.removesuffix("/v1") + "/health").json()
    assert health == {"status": "ok", "router": "a1a1a1", "experts": ["alpha", "beta"],
                      "endpoints": ["alpha", "beta", "down", "slow"]}
    before = metrics(gw)
    for _ in range(2):
        client(gw).chat.completions.create(model="zooter", messages=CHAT)
    httpx.post(f"{gw}/route", json={"model": "zooter", "messages": CHAT})
    with pytest.raises(openai.NotFoundError):
        client(gw).chat.completions.create(model="gpt-4", messages=CHAT)
    after = metrics(gw)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert grew("zooter_gateway_requests_total", endpoint="chat", expert="alpha") == 2
    assert grew("zooter_gateway_requests_total", endpoint="route", expert="alpha") == 1
    assert grew("zooter_gateway_request_seconds_count", expert="alpha") == 2
    assert grew("zooter_gateway_route_seconds_count") == 3
    assert grew("zooter_gateway_errors_total", kind="model_not_found") == 1


@pytest.mark.parametrize(("body", "status", "param", "says"), [
    (b'{"model": "zooter", "messages": [', 400, None, "not valid JSON"),
    (b'["a list"]', 400, None, "must be a JSON object"),
    (json.dumps({"model": "zooter"}).encode(), 400, "messages", "messages: Field required"),
    (json.dumps({"model": "zooter", "messages": "hi"}).encode(), 400, "messages", "messages: "),
    (json.dumps({"model": "zooter", "messages": [{"role": "system", "content": "x"}]}).encode(), 400, "messages",
     "no user message"),
    (json.dumps({"model": "zooter", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
     400, "messages.0.content", "no text to route on"),
    (json.dumps({"model": "zooter:lambda=-1", "messages": CHAT}).encode(), 400, "model", "lambda must be"),
    (json.dumps({"model": "gpt-4", "messages": CHAT}).encode(), 404, "model", "'gpt-4' does not exist"),
    (json.dumps({"model": "zooter:ffffff", "messages": CHAT}).encode(), 404, "model", "no router ffffff"),
])
def test_bad_requests_get_openai_errors_naming_the_field(gw, body, status, param, says):
    for path in ("chat/completions", "route"):
        r = httpx.post(f"{gw}/{path}", content=body, headers={"content-type": "application/json"})
        err = r.json()["error"]
        assert r.status_code == status and err["param"] == param and says in err["message"], r.text
        assert set(err) == {"message", "type", "param", "code"}


def test_the_openai_client_sees_4xx_as_its_own_errors(gw):
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        client(gw).chat.completions.create(model="zooter:lambda=1:nope", messages=CHAT)
    assert e.value.param == "model"
    with pytest.raises(openai.BadRequestError, match="no user message"):
        client(gw).chat.completions.create(model="zooter", messages=[{"role": "system", "content": "x"}])


def test_an_expert_that_is_down_is_a_502_naming_it(gw):
    with pytest.raises(openai.InternalServerError) as e:
        client(gw).chat.completions.create(model="zooter:d3d3d3", messages=CHAT)
    assert e.value.status_code == 502 and "expert down is unreachable" in e.value.message
    assert e.value.response.headers["x-zooter-expert"] == "down"
    for stream in (False, True):  # a stream fails before it starts
        r = httpx.post(f"{gw}/chat/completions", json={"model": "zooter:d3d3d3", "messages": CHAT, "stream": stream})
        assert r.status_code == 502 and r.json()["error"]["code"] == "expert_unavailable"


def test_an_expert_that_takes_too_long_is_a_504(gw):
    r = httpx.post(f"{gw}/chat/completions", json={"model": "zooter:e4e4e4", "messages": CHAT}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "expert_timeout"
    assert "expert slow did not answer in time" in r.json()["error"]["message"]


def test_a_promoted_champion_takes_over_without_a_restart(store_dir, experts, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    with gateway(store, experts, tmp_path, reload_s=0.1) as url:
        assert client(url).chat.completions.create(model="zooter", messages=CHAT).model == "zooter/alpha"
        crown(store, "b2b2b2", lam=0.5)
        deadline = time.monotonic() + 30
        while (d := httpx.post(f"{url}/route", json={"model": "zooter", "messages": CHAT}).json())["router"] \
                != "b2b2b2":
            assert time.monotonic() < deadline, "the new champion was not picked up"
            time.sleep(0.1)
        assert d["lambda"] == 0.5 and d["expert"] == "beta"  # its evaluation's lambda came with it
        answer = client(url).chat.completions.create(model="zooter", messages=CHAT)
        assert answer.model == "zooter/beta" and answer.choices[0].message.content == "I am beta"
        assert [m.id for m in client(url).models.list()] == ["zooter", "zooter:b2b2b2"]
        (store / CHAMPION_PATH).write_text("{broken")  # a bad record: keep serving the router that works
        time.sleep(0.5)
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["router"] == "b2b2b2"
        assert metrics(url)[("zooter_gateway_errors_total", (("kind", "reload_failed"),))] >= 1


def test_the_bearer_key_is_enforced(store_dir, experts, tmp_path):
    with gateway(store_dir, experts, tmp_path, api_key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").chat.completions.create(model="zooter", messages=CHAT)
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(url.removesuffix("/v1") + path).status_code == 401
        assert httpx.post(f"{url}/route", json={"model": "zooter", "messages": CHAT}).status_code == 401
        assert client(url, "s3cret").chat.completions.create(model="zooter", messages=CHAT).model == "zooter/alpha"
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # liveness stays open


def test_experts_file_errors_name_the_key(tmp_path):
    store = Store(str(tmp_path / "store"))
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump({"alpha": {"base_url": "localhost:8000", "model": "m"}}))
    with pytest.raises(ConfigError, match=r"experts.yaml: alpha.base_url: 'localhost:8000' is not an http"):
        load_endpoints(store, path)
    path.write_text(yaml.safe_dump({"alpha": {"base_url": "http://h/v1", "model": "m", "key": "x"}}))
    with pytest.raises(ConfigError, match=r"alpha.key: Extra inputs are not permitted"):
        load_endpoints(store, path)
    path.write_text(yaml.safe_dump({"alpha": {"base_url": "http://h/v1", "model": "m", "api_key_env": "NOPE_X"}}))
    endpoints = load_endpoints(store, path)
    with pytest.raises(ConfigError, match="expert 'alpha': api_key_env NOPE_X is not set"):
        create_app(None, endpoints)  # type: ignore[arg-type]  # fails on the endpoints, before any router


def test_endpoints_come_from_the_published_configs_openai_experts(tiny_config):
    path = tiny_config()
    raw = yaml.safe_load(path.read_text())
    raw["experts"].append({"name": "c", "backend": "openai", "base_url": "http://10.0.0.5:8000/v1/",
                           "model": "org/served-c", "api_key_env": "C_KEY"})
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    store = Store(cfg.store.url)
    assert load_endpoints(store) == {}  # nothing published yet
    publish_config(cfg)
    assert load_endpoints(store) == {"c": Endpoint(base_url="http://10.0.0.5:8000/v1", model="org/served-c",
                                                   api_key_env="C_KEY")}  # the hf experts have no endpoint


def test_the_cli_refuses_a_store_without_a_champion_and_a_missing_key(tmp_path):
    res = CliRunner().invoke(cli, ["gateway", "--store", str(tmp_path)])
    assert res.exit_code == 2 and "no champion router" in res.output
    res = CliRunner().invoke(cli, ["gateway", "--store", str(tmp_path), "--api-key-env", "ZOOTER_TEST_UNSET"])
    assert res.exit_code == 2 and "--api-key-env ZOOTER_TEST_UNSET: the environment variable is not set" in res.output


def test_routers_load_once_and_keep_the_champion(store_dir):
    loads: list[str] = []

    def load(store, fp):
        from cluster.router import Router

        loads.append(fp)
        return Router.from_store(store, fp)

    routers = Routers(Store(str(store_dir)), load, keep=1)
    for fp, (experts, p) in ROUTERS.items():
        loaded = routers.get(fp)
        assert loaded.experts == experts
        np.testing.assert_allclose(loaded.probs("any text"), p, atol=1e-5)
    assert routers.get("a1a1a1") is routers.champion  # the champion was not evicted; the others were but one
    assert loads == list(ROUTERS) and routers.get("b2b2b2") and loads[-1] == "b2b2b2"


def test_the_gateways_onnx_runtime_loads_champions_in_onnx_runtime(store_dir, monkeypatch, tmp_path):
    from gateway.routers import load_router as _load_router

    monkeypatch.setenv("ZOOTER_CACHE", str(tmp_path / "cache"))
    routers = Routers(Store(str(store_dir)), lambda store, fp: _load_router(store, fp, "int8", "onnx"))
    experts, p = ROUTERS["a1a1a1"]
    router = routers.champion.router
    assert router.runtime == "onnx" and router.quantized == "int8" and router.onnx is not None
    np.testing.assert_allclose(routers.champion.probs("any text"), p, atol=1e-5)  # the head decides here
    result = CliRunner().invoke(cli, ["gateway", "--store", str(store_dir), "--runtime", "tensorrt"])
    assert result.exit_code == 2 and "tensorrt" in result.output


class SlowRouter:
    """A router whose every call takes a while and records the texts it was given (one call = one batch)."""

    experts = ["a", "b"]

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def probs(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        time.sleep(0.2)
        if "boom" in texts:
            raise RuntimeError("router failed")
        return np.array([[len(t) / 100, 1 - len(t) / 100] for t in texts])


def test_requests_that_arrive_while_the_router_is_busy_go_in_one_batch():
    from concurrent.futures import ThreadPoolExecutor

    router = SlowRouter()
    loaded = Loaded("fp", router)
    texts = [f"q{'x' * i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(loaded.probs, texts))
    for t, p in zip(texts, out, strict=True):  # each request gets its own row back
        np.testing.assert_allclose(p, [len(t) / 100, 1 - len(t) / 100])
    assert sorted(t for call in router.calls for t in call) == sorted(texts)  # each text routed exactly once
    assert len(router.calls) < len(texts)  # the ones that waited went together
    router.calls.clear()
    with ThreadPoolExecutor(2) as pool:  # a failing batch fails every request in it, and the next batch works
        bad, good = pool.submit(loaded.probs, "boom"), pool.submit(loaded.probs, "fine")
        with pytest.raises(RuntimeError, match="router failed"):
            bad.result()
        if any("fine" in call and "boom" in call for call in router.calls):
            with pytest.raises(RuntimeError, match="router failed"):
                good.result()
        else:
            assert good.result()[0] == pytest.approx(0.04)
    assert loaded.probs("again")[0] == pytest.approx(0.05)


def test_local_experts_answer_on_a_store_whose_experts_are_weights(store_dir, tmp_path, tiny_config):
    """`--local-experts` (a store like the demo's, whose experts are model weights with no endpoint): the gateway
    answers chat itself, rendered and sampled as the generate step does; the experts come from the store's latest
    run's config, or from the published config when there is one."""
    from cluster.backends import generator_builder
    from schemas.manifest import RunManifest
    from tasks.generate import plan_expert, render, template_text

    shutil.copytree(store_dir, tmp_path / "store")
    store = Store(str(tmp_path / "store"))
    raw = yaml.safe_load(tiny_config().read_text())
    raw["experts"][0]["name"], raw["experts"][1]["name"] = "alpha", "beta"  # the champion's experts
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")
    assert local_experts(store) == {}  # no run, no published config
    m = RunManifest(run_id="20260101T000000Z-aaaaaa", flow="label", status="completed")
    store.write_json(run_manifest_path(m.run_id), m.model_dump(mode="json"))
    store.write_json(run_plan_path(m.run_id), {"config": cfg.model_dump(mode="json")})  # the run's plan.json
    local = local_experts(store)
    assert sorted(local) == ["alpha", "beta"] and local["alpha"].spec == cfg.experts[0]
    store.write_bytes(CURRENT, published(cfg.model_copy(update={"experts": cfg.experts[1:]})))
    assert sorted(local_experts(store)) == ["beta"]  # the published config wins

    with serving(create_app(Routers(store), {}, local=local)) as url:
        c = client(f"{url}/v1")
        first = c.chat.completions.with_raw_response.create(model="zooter", messages=CHAT)
        streamed = list(c.chat.completions.create(model="zooter", messages=CHAT, stream=True))
    answer = first.parse()
    assert first.headers["x-zooter-expert"] == "alpha" and answer.model == "zooter/alpha"
    spec, s = cfg.experts[0], cfg.experts[0].sampling
    model = generator_builder(plan_expert(spec))()
    [prompt] = render(model, template_text(spec.prompt), ["the question that routes"])
    want = model.generate([prompt], max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                          seed=s.seed, stop=s.stop, batch_size=1)[0]
    assert answer.choices[0].message.content == want.response
    assert answer.usage.completion_tokens == want.new_tokens
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == want.response
    assert streamed[-1].choices[0].finish_reason == want.finish_reason
