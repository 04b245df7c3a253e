"""The loglik reward's `pmi` normalisation: log p(answer | question) - log p(answer), per answer token, against a
hand computation on a tiny random LM; and its config key, which leaves existing fingerprints alone."""

import pytest
import torch

from cluster.hf import HFLoglikScorer, render_chat
from schemas.config import RewardSpec
from tasks.score import rm_fingerprint

QUERIES = ["What is 2 + 3?", "Name a planet that has rings, please."]
ANSWERS = ["5", "Saturn has the most famous rings of all."]


def hand_mean_logp(scorer: HFLoglikScorer, query: str, answer: str) -> float:
    """One unpadded forward pass over prompt + answer: the mean log-probability of the answer's tokens."""
    pre = scorer.tok(render_chat(scorer.tok, query), add_special_tokens=False)["input_ids"]
    ans = scorer.tok(answer, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = scorer.model(input_ids=torch.tensor([pre + ans])).logits.float()[0]
    logp = torch.log_softmax(logits, -1)
    return float(torch.stack([logp[len(pre) + i - 1, t] for i, t in enumerate(ans)]).mean())


def test_pmi_is_the_conditional_minus_the_unconditional_loglik(tiny_models):
    mean = HFLoglikScorer(str(tiny_models["lm_a"]), dtype="float32")
    pmi = HFLoglikScorer(str(tiny_models["lm_a"]), dtype="float32", normalise="pmi")
    cond = [hand_mean_logp(mean, q, a) for q, a in zip(QUERIES, ANSWERS, strict=True)]
    prior = [hand_mean_logp(mean, "", a) for a in ANSWERS]  # the answer after an empty question
    assert mean.score(QUERIES, ANSWERS, batch_size=2) == pytest.approx(cond, abs=1e-4)
    got = pmi.score(QUERIES, ANSWERS, batch_size=2)  # batched: left padding must not change a row
    assert got == pytest.approx([c - p for c, p in zip(cond, prior, strict=True)], abs=1e-4)
    assert all(abs(g - c) > 1e-3 for g, c in zip(got, cond, strict=True))  # it is not the plain mean
    assert pmi.score(["Hi"], [""]) == [None]  # an empty answer has no score under either


def test_normalise_key_keeps_existing_fingerprints(tiny_models):
    base = RewardSpec(name="judge", kind="loglik", model=str(tiny_models["lm_a"]))
    assert rm_fingerprint(base) == rm_fingerprint(base.model_copy(update={"normalise": "mean"}))
    assert rm_fingerprint(base) != rm_fingerprint(base.model_copy(update={"normalise": "pmi"}))
    with pytest.raises(ValueError, match="normalise 'pmi' is for kind `loglik` only"):
        RewardSpec(name="rm", kind="classifier", model=str(tiny_models["rm"]), normalise="pmi")
