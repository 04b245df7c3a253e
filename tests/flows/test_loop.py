"""The served loop end to end (issue 36): a recording gateway over real HTTP on 127.0.0.1 answers chats (fake
OpenAI-compatible experts on loopback), users post feedback, a restart loses nothing, `zooter relabel --traffic`
(the real flow, in process) adds the recorded queries as shards and labels them with every expert and reward model
(user feedback a `kind: feedback` one), the retrained router is promoted, and the running gateway serves it within
its reload interval: /v1/models names the new fingerprint and its decisions on the recorded queries change.

Experts and the model reward models are synthetic (answers and scores from a hash: the test is about the loop, not
what a model computes); the router is a real one on the tiny random encoder."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import yaml
from typer.testing import CliRunner

from flows.cli import app as cli
from gateway.app import create_app
from gateway.experts import load_endpoints
from gateway.routers import Routers
from gateway.traffic import Traffic
from schemas.config import load_config
from schemas.evaluation import read_champion
from schemas.store import Store
from schemas.traffic import EVENT, FEEDBACK_DIR, REQUESTS_DIR
from tasks.experts import publish_config
from tasks.ingest import text_id
from tests.conftest import json_doc, synthetic_models, tiny_flow_config, tiny_router
from tests.flows.test_gateway import fake_expert, serving

TEXTS = ["How do I bake bread?", "Translate hello to French.", "What is the capital of Peru?",
         "Write a haiku about autumn.", "Explain recursion briefly.", "Is 17 a prime number?",
         "Suggest a name for a cat.", "How far is the Moon?"]


@contextlib.contextmanager
def gateway(store: Store, endpoints_file: Path) -> Iterator[str]:
    """A recording gateway (batches written only when it stops) that checks champion.json every 0.5 s."""
    app = create_app(Routers(store), load_endpoints(store, endpoints_file), timeout_s=30, reload_s=0.5,
                     traffic=Traffic.of(store, batch_rows=1000, flush_s=600))
    with serving(app) as url:
        yield url


def ask(url: str, text: str) -> tuple[str, str]:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={"model": "zooter", "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == f"I am {r.headers['x-zooter-expert']}"
    return r.headers["x-zooter-request-id"], r.headers["x-zooter-expert"]


def route(url: str, text: str) -> dict:
    r = httpx.post(f"{url}/v1/route", json={"model": "zooter", "messages": [{"role": "user", "content": text}]},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def thumbs_down(url: str, rid: str) -> None:
    r = httpx.post(f"{url}/v1/feedback", json={"request_id": rid, "thumbs": "down"}, timeout=60)
    assert r.status_code == 200, r.text


def test_traffic_and_feedback_become_a_served_champion(tmp_path, tiny_models, ray_session, prefect_harness,
                                                       monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    from flows.label import label_flow

    monkeypatch.setenv("ZOOTER_ALLOW_SYNTHETIC", "1")
    path = tiny_flow_config(tmp_path, tiny_models, router=tiny_router(tiny_models, epochs=8, lr=1e-3),
                            traffic={"relabel_after": 4})
    cfg = yaml.safe_load(path.read_text())
    synthetic_models(cfg)
    # users' feedback outweighs the synthetic scores: a thumbs down sinks that (query, expert) pair
    cfg["reward_models"].append({"name": "users", "kind": "feedback", "weight": 20.0})
    path.write_text(yaml.safe_dump(cfg))
    store = Store(cfg["store"])
    label_flow(str(path))
    publish_config(load_config(path))  # the gateway reads traffic.relabel_after from the published config
    before = read_champion(store).router_fp

    with serving(fake_expert("a")) as a, serving(fake_expert("b")) as b:
        endpoints = tmp_path / "experts.yaml"
        endpoints.write_text(yaml.safe_dump({"a": {"base_url": f"{a}/v1", "model": "served-a"},
                                             "b": {"base_url": f"{b}/v1", "model": "served-b"}}))
        with gateway(store, endpoints) as url:
            first = [ask(url, t) for t in TEXTS[:4]]
            assert not (tmp_path / "store" / REQUESTS_DIR).exists()  # pending until the gateway stops
        # stopped: the batch is written and 4 new queries announced
        deadline = time.monotonic() + 60
        with get_client(sync_client=True) as client:  # the API stores an event a moment after it arrives
            while not (events := client.read_events(EventFilter(event=EventNameFilter(name=[EVENT])), 50).events):
                assert time.monotonic() < deadline, f"no {EVENT} event"
                time.sleep(0.5)
        assert [e.payload["queries"] for e in events] == [4]
        assert events[0].payload["config_url"] == store.uri("configs/current.yaml")

        with gateway(store, endpoints) as url:  # a restart: feedback on the first process's requests still lands
            for rid, _ in first:
                thumbs_down(url, rid)
            rest = [ask(url, t) for t in TEXTS[4:]]
            for rid, _ in rest:
                thumbs_down(url, rid)
        served = first + rest
        recorded = pl.read_parquet(tmp_path / "store" / REQUESTS_DIR)
        assert sorted(recorded["request_id"]) == sorted(rid for rid, _ in served)  # nothing lost
        assert pl.read_parquet(tmp_path / "store" / FEEDBACK_DIR).height == len(TEXTS)

        with gateway(store, endpoints) as url:  # serves the old champion while the relabel runs
            assert f"zooter:{before}" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
            res = CliRunner().invoke(cli, ["relabel", str(path), "--traffic", "--json"])
            assert res.exit_code == 0, res.output[-3000:]
            out = json_doc(res.output)
            m = out["manifest"]
            # the 8 recorded queries are 2 new shards (shard size 4): only their cells were generated
            assert m["queries"] == len(cfg_queries(path)) + len(TEXTS) and len(m["shards"]) == 5
            assert {g["name"]: g["cells_computed"] for g in m["generate"]} == {"a": 2, "b": 2}
            assert m["champion"]["decision"] == "promoted", m["champion"]
            after = read_champion(store).router_fp
            assert after != before
            deadline = time.monotonic() + 60
            while f"zooter:{after}" not in [d["id"] for d in httpx.get(f"{url}/v1/models").json()["data"]]:
                assert time.monotonic() < deadline, "the gateway did not reload the new champion"
                time.sleep(0.2)
            now = {t: route(url, t) for t in TEXTS}
            assert {d["router"] for d in now.values()} == {after}

    # the feedback reward model scored exactly the pairs users judged, -1 each
    shards = pl.read_parquet(tmp_path / "store" / "queries" / "*.parquet")
    assert set(text_id(t) for t in TEXTS) <= set(shards["query_id"])
    fb = pl.read_parquet(tmp_path / "store" / "scores" / "users-*" / "*" / "*.parquet")
    judged = fb.filter(pl.col("score").is_not_null())
    assert judged.height == len(TEXTS) and judged["score"].to_list() == [-1.0] * len(TEXTS)
    # the router learned the thumbs down: the recorded queries go elsewhere now
    changed = [t for (_, e), t in zip(served, TEXTS, strict=True) if now[t]["expert"] != e]
    assert len(changed) >= len(TEXTS) // 2, (served, now)


def cfg_queries(path: Path) -> list[dict]:
    data = yaml.safe_load(path.read_text())["data"]["path"]
    return [json.loads(line) for line in Path(data).read_text().splitlines()]
