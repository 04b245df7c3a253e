"""Every packaged model loads offline (sha256-verified) and produces non-empty output."""

import pytest
import torch

from cluster.models import PACKAGED, ModelSourceError, identity, packaged, resolve

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
