"""The router as the gateway calls it: one text at a time (the short path), and encoder loads without noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.router import Router, RouterError, build, embed_texts, load_encoder
from schemas.config import RouterConfig
from tests.cluster.test_router import TEXTS, encoder, saved  # noqa: F401 - encoder is a fixture
from tests.conftest import minilm_dir


@pytest.mark.parametrize("frozen", [False, True])
def test_one_text_gets_the_same_probabilities_as_in_a_batch(tmp_path, encoder, frozen):  # noqa: F811
    cfg = RouterConfig(encoder=encoder, head_hidden=8, max_length=8, prefix="query: ", freeze_encoder=frozen)
    saved(cfg, tmp_path / "r")
    router = Router(tmp_path / "r", device="cpu")
    batched = router.probs(TEXTS)  # padded to the longest, sorted by length: the batch path
    # max_length 8 cuts the longer texts; in the batch the shorter ones are padded
    one = np.concatenate([router.probs([t]) for t in TEXTS])
    np.testing.assert_allclose(one, batched, atol=1e-6)
    before = router.probs_from_features(embed_texts(router.model, router.tok, TEXTS[:1], 8, "query: "))
    np.testing.assert_array_equal(router.probs(TEXTS[:1]), before)  # what probs computed before the short path
    assert router.route(TEXTS[:1]) == [["a", "b"][int(one[0].argmax())]]


def _bert(path, layers: int = 1, pooler: bool = True) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=64),
              add_pooling_layer=pooler).save_pretrained(path)
    tok.save_pretrained(path)


def test_an_encoder_without_a_pooler_loads_without_a_report(tmp_path, capfd):
    # multilingual-e5-small's conversion has no pooler: the router never uses one, so its absence is not news
    _bert(tmp_path / "enc", pooler=False)
    capfd.readouterr()
    model, _ = build(str(tmp_path / "enc"), 2, "mean")
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "not sharded" not in err  # nor a check that a quieter level would start
    assert "Loading weights" not in err  # nor a progress bar at every load
    assert model.encoder.config.num_hidden_layers == 1


def test_an_encoder_missing_other_weights_is_a_router_error(tmp_path):
    _bert(tmp_path / "enc")
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    (tmp_path / "enc" / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 2}))
    with pytest.raises(RouterError, match=r"lacks weights \['encoder.layer.1.attention"):
        load_encoder(tmp_path / "enc")
    (tmp_path / "enc" / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 48}))
    with pytest.raises(RouterError, match=r"mismatched shapes \['encoder.layer.0.intermediate.dense.bias"):
        load_encoder(tmp_path / "enc")


def test_an_int8_router_runs_its_encoder_quantised(tmp_path, encoder):  # noqa: F811
    from torch import nn

    cfg = RouterConfig(encoder=encoder, head_hidden=8, max_length=8)
    saved(cfg, tmp_path / "r")
    fp32, int8 = Router(tmp_path / "r", device="cpu"), Router(tmp_path / "r", device="cpu", quantize="int8")
    assert (fp32.quantized, int8.quantized) == (None, "int8")
    linear = [m for m in int8.model.encoder.modules() if type(m) is nn.Linear]
    assert not linear  # every encoder Linear runs quantised; the head stays float32
    assert any(type(m) is nn.Linear for m in int8.model.head.modules())
    p, q = fp32.probs(TEXTS), int8.probs(TEXTS)
    assert q.shape == p.shape and np.allclose(q.sum(axis=1), 1.0)
    np.testing.assert_allclose(q, p, atol=0.1)  # the same router, rounded: close, not equal
    np.testing.assert_allclose(np.concatenate([int8.probs([t]) for t in TEXTS]), q, atol=1e-5)  # both paths
    with pytest.raises(RouterError, match="only int8 on CPU"):
        Router(tmp_path / "r", device="cpu", quantize="int4")  # type: ignore[arg-type]


@pytest.mark.parametrize("frozen", [False, True])
def test_an_onnx_router_gives_the_torch_routers_probabilities(tmp_path, encoder, frozen, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ZOOTER_CACHE", str(tmp_path / "cache"))
    cfg = RouterConfig(encoder=encoder, head_hidden=8, max_length=8, prefix="query: ", freeze_encoder=frozen)
    saved(cfg, tmp_path / "r")
    torch_router = Router(tmp_path / "r", device="cpu")
    onnx = Router(tmp_path / "r", device="cpu", runtime="onnx")
    assert onnx.onnx is not None and onnx.runtime == "onnx" and onnx.quantized is None
    p = torch_router.probs(TEXTS)
    np.testing.assert_allclose(onnx.probs(TEXTS), p, atol=1e-5)  # the same graph, other kernels
    np.testing.assert_allclose(np.concatenate([onnx.probs([t]) for t in TEXTS]), p, atol=1e-5)  # batch 1 too
    assert onnx.route(TEXTS) == torch_router.route(TEXTS)

    # exported once into the model cache: a second load reads the graph, it does not export again
    graph = onnx.onnx.path
    assert graph.parent == tmp_path / "cache" / "onnx" and graph.name.endswith("-float32.onnx")
    before = graph.stat().st_mtime_ns
    again = Router(tmp_path / "r", device="cpu", runtime="onnx")
    assert again.onnx.path == graph and graph.stat().st_mtime_ns == before
    assert [f.name for f in graph.parent.iterdir()] == [graph.name]  # no export leftovers beside it

    int8 = Router(tmp_path / "r", device="cpu", runtime="onnx", quantize="int8")
    assert int8.quantized == "int8" and int8.onnx.path.name.endswith("-int8.onnx")
    q = int8.probs(TEXTS)
    assert q.shape == p.shape and np.allclose(q.sum(axis=1), 1.0)
    np.testing.assert_allclose(q, p, atol=0.1)  # rounded weights: close, not equal


def test_onnx_graphs_are_keyed_by_what_fixes_the_weights(tmp_path, encoder, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ZOOTER_CACHE", str(tmp_path / "cache"))
    # two routers on one frozen encoder share a graph; a fine-tuned encoder (other weights) gets its own
    for name, frozen in (("a", True), ("b", True), ("c", False)):
        saved(RouterConfig(encoder=encoder, head_hidden=8, max_length=8, freeze_encoder=frozen), tmp_path / name)
    paths = [Router(tmp_path / n, device="cpu", runtime="onnx").onnx.path for n in "abc"]
    assert paths[0] == paths[1] != paths[2]
    with pytest.raises(RouterError, match="runtime 'onnx' with quantize 'int4'"):
        Router(tmp_path / "a", device="cpu", runtime="onnx", quantize="int4")  # type: ignore[arg-type]
