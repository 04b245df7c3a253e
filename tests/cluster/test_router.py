"""The router directory round trip (RouterConfig in router.json, head-only saves for a frozen encoder, loading
from a store) on a tiny random encoder, and Ray Train fed through Ray's object store."""

import json

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from cluster.router import Router, RouterError, build_from_config, save
from cluster.train import fit
from schemas.artifacts import ROUTER_JSON, ROUTER_WEIGHTS, router_dir
from schemas.config import RouterConfig
from schemas.store import Store
from tests.conftest import minilm_dir

TEXTS = ["what is 2 + 2?", "write a poem about rain", "a much longer question about routing queries to experts"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    """A tiny random BERT with the packaged MiniLM tokenizer (offline)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("enc")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def saved(cfg: RouterConfig, out, experts=("a", "b")):
    from cluster import models

    torch.manual_seed(1)
    model, tok = build_from_config(cfg, len(experts))
    save(model, tok, cfg, out, {"experts": list(experts), "encoder_identity": models.identity(cfg.encoder)})
    return model.eval(), tok


@pytest.mark.parametrize("frozen", [False, True])
def test_saved_router_loads_with_its_config_and_gives_the_same_probabilities(tmp_path, encoder, frozen):
    cfg = RouterConfig(encoder=encoder, head_hidden=8, max_length=16, prefix="query: ", pooling="cls",
                       freeze_encoder=frozen)
    model, tok = saved(cfg, tmp_path / "r")
    meta = json.loads((tmp_path / "r" / ROUTER_JSON).read_text())
    assert RouterConfig.model_validate(meta["config"]) == cfg
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "r" / ROUTER_WEIGHTS)).keys()
    assert any(k.startswith("encoder.") for k in keys) is not frozen  # a frozen encoder is not saved
    router = Router(tmp_path / "r", device="cpu")
    assert router.config == cfg and router.experts == ["a", "b"]
    enc = tok(["query: " + t for t in TEXTS], return_tensors="pt", padding=True, truncation=True, max_length=16)
    with torch.no_grad():
        want = torch.softmax(model(enc["input_ids"], enc["attention_mask"]), -1).numpy()
    np.testing.assert_allclose(router.probs(TEXTS), want, atol=1e-5)
    assert router.route(TEXTS) == [["a", "b"][i] for i in want.argmax(-1)]


def test_router_from_the_store_by_fingerprint(tmp_path, encoder):
    cfg = RouterConfig(encoder=encoder, max_length=16)
    saved(cfg, tmp_path / "r")
    store = Store(str(tmp_path / "store"))
    for f in (tmp_path / "r").rglob("*"):
        if f.is_file():
            store.write_bytes(f"{router_dir('fp1')}/{f.relative_to(tmp_path / 'r').as_posix()}", f.read_bytes())
    assert Router.from_store(store, "fp1").probs(TEXTS).shape == (3, 2)


def test_a_router_file_with_a_bad_config_is_a_router_error(tmp_path, encoder):
    saved(RouterConfig(encoder=encoder, max_length=16), tmp_path / "r")
    meta = json.loads((tmp_path / "r" / ROUTER_JSON).read_text())
    (tmp_path / "r" / ROUTER_JSON).write_text(json.dumps(meta | {"config": meta["config"] | {"pooling": "max"}}))
    with pytest.raises(RouterError, match=r"router.json: not a valid router config \(pooling: "):
        Router(tmp_path / "r")
    (tmp_path / "r" / ROUTER_JSON).write_text(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    with pytest.raises(RouterError, match="not a valid router config"):
        Router(tmp_path / "r")


def test_frozen_router_refuses_a_different_encoder(tmp_path, encoder):
    cfg = RouterConfig(encoder=encoder, max_length=16, freeze_encoder=True)
    saved(cfg, tmp_path / "r")
    meta = json.loads((tmp_path / "r" / ROUTER_JSON).read_text())
    (tmp_path / "r" / ROUTER_JSON).write_text(json.dumps(meta | {"encoder_identity": "files:other"}))
    with pytest.raises(RouterError, match="differs from the one this router was trained on"):
        Router(tmp_path / "r")


def test_fit_takes_its_rows_through_ray_and_keeps_every_epoch(ray_session, tmp_path):
    # Train: expert a wins when the first feature is positive. Validation says the opposite, so the better the head
    # fits, the worse its validation loss: the best (checkpointed) epoch is the first, and the history still has
    # every epoch.
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    target = np.where(x[:, :1] > 0, [0.9, 0.1], [0.1, 0.9])
    train = pa.table({"vector": list(x[:48]), "target": list(target[:48])})
    val = pa.table({"vector": list(x[48:]), "target": list(target[48:, ::-1])})
    cfg = RouterConfig(freeze_encoder=True, epochs=3, lr=0.5, batch_size=8, seed=3)
    payload, history, nodes = fit(cfg, train, val, ["a", "b"], "labels-1", str(tmp_path / "train"))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0]["train_loss"] > history[2]["train_loss"]
    assert payload["epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"] == 1
    assert (payload["labels"], payload["experts"], payload["config"]) == ("labels-1", ["a", "b"],
                                                                        cfg.model_dump(mode="json"))
    assert nodes == [ray.get_runtime_context().get_node_id()]  # the one node of the session's Ray

    # Ray Train's local mode (num_workers 0): the same loop in this process, no actor started; one worker's
    # computation, so the same best epoch, weights and history, and the same router fingerprint
    from ray._private.state import actors

    from tasks.train_router import router_fingerprint

    before, threads = len(actors()), torch.get_num_threads()
    local = cfg.model_copy(update={"num_workers": 0, "cpus_per_worker": 1})
    got, got_history, got_nodes = fit(local, train, val, ["a", "b"], "labels-1", str(tmp_path / "local"))
    assert before > 0 and len(actors()) == before and torch.get_num_threads() == threads  # threads undone
    assert (got["epoch"], got_history, got_nodes) == (payload["epoch"], history, nodes)
    for k, v in payload["model"].items():
        torch.testing.assert_close(got["model"][k], v, rtol=0, atol=0)
    assert router_fingerprint(local, "labels-1") == router_fingerprint(cfg, "labels-1")
    assert not (tmp_path / "local").exists()  # nor a checkpoint written


def test_fit_trains_an_ensemble_of_bce_heads_and_selects_the_epoch_by_validation_reward(ray_session, tmp_path):
    # Expert a succeeds when the first feature is positive, b otherwise; validation rows carry their rewards and
    # tags, so each epoch reports the routed expert's reward (mean over tags) and the best of those is kept.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    success = np.where(x[:, :1] > 0, [1.0, 0.0], [0.0, 1.0])
    train = pa.table({"vector": list(x[:60]), "target": list(success[:60])})
    val = pa.table({"vector": list(x[60:]), "target": list(success[60:]), "rewards": list(success[60:]),
                    "tags": [["t1"] if i % 2 else ["t2"] for i in range(20)]})
    # in Ray Train's local mode: one worker's computation (the test above), without its actors' start-up
    cfg = RouterConfig(freeze_encoder=True, epochs=3, lr=0.05, batch_size=8, heads=3, loss="bce", select="reward",
                       num_workers=0)
    payload, history, _ = fit(cfg, train, val, ["a", "b"], "labels-1", str(tmp_path / "train"))
    assert all(0 <= h["val_reward"] <= 1 for h in history)
    best = max(history, key=lambda h: h["val_reward"])
    assert payload["epoch"] == best["epoch"] and best["val_reward"] > 0.8  # a separable task is learnt
    assert {"heads.0.weight", "heads.2.bias"} <= set(payload["model"])  # three linear heads


def test_ray_train_workers_import_no_transformers_for_a_head_only_fit():
    """Ray Train's controller and every worker import cluster.train per fit: transformers (~3 s on 2 cores) must
    not come with it; it is imported where an encoder loads."""
    import subprocess
    import sys

    code = "import sys, cluster.train; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
