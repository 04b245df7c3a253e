"""Length-aware batching in the hf backend: `length_batches` finds the cheapest grouping (against every partition of
a few rows), and generation and both scorers give every row the result it gets alone, in the caller's order."""

import random

import pytest

from cluster.batches import length_batches
from cluster.hf import HFClassifierScorer, HFGenerator, HFLoglikScorer


def cost(batches: list[list[int]], lengths: list[int], per_batch: float) -> float:
    return sum(len(b) * max(lengths[i] for i in b) + per_batch for b in batches)


def partitions(items: list[int]):
    """Every set partition of `items` (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in partitions(rest):
        yield [[first], *p]
        for k in range(len(p)):
            yield [*p[:k], [first, *p[k]], *p[k + 1:]]


@pytest.mark.parametrize("seed", range(20))
def test_length_batches_is_the_cheapest_partition(seed):
    rng = random.Random(seed)
    n, max_rows, per_batch = rng.randint(1, 7), rng.randint(1, 4), rng.choice([0.0, 3.0, 40.0])
    lengths = [rng.randint(1, 60) for _ in range(n)]
    got = length_batches(lengths, max_rows, per_batch)
    assert sorted(i for b in got for i in b) == list(range(n))  # every row once
    assert all(0 < len(b) <= max_rows for b in got)
    best = min(cost(p, lengths, per_batch) for p in partitions(list(range(n))) if all(len(b) <= max_rows for b in p))
    assert cost(got, lengths, per_batch) == best


def test_one_long_prompt_gets_its_own_batch():
    lengths = [51, 61, 67, 64, 55, 201, 55, 57]  # a demo shard's judge prompts (tokens)
    assert length_batches(lengths, 8, 32.0) == [[0, 4, 6, 7], [1, 3, 2], [5]]  # a scorer's on a CPU
    assert length_batches(lengths, 8, 32 * 32.0) == [[0, 4, 6, 7, 1, 3, 2, 5]]  # a generation's: 32 passes
    assert length_batches([], 8) == []


PROMPTS = ["hi", "a much longer prompt " * 12, "two words", "x " * 40, "short", "medium length prompt here"]
ANSWERS = ["yes", "a long answer " * 6, "no", "maybe so", "", "ok then"]


def test_generation_rows_match_their_unbatched_results(tiny_models):
    g = HFGenerator(str(tiny_models["lm_a"]), dtype="float32")
    alone = [g.generate([p], max_new_tokens=6)[0] for p in PROMPTS]
    assert g.generate(PROMPTS, max_new_tokens=6, batch_size=4) == alone  # same rows, caller's order
    assert len({a.prompt_tokens for a in alone}) > 3  # the prompts do differ in length


def test_scores_match_their_unbatched_results(tiny_models):
    judge = HFLoglikScorer(str(tiny_models["lm_a"]), dtype="float32")
    alone = [judge.score([q], [a])[0] for q, a in zip(PROMPTS, ANSWERS, strict=True)]
    got = judge.score(PROMPTS, ANSWERS, batch_size=4)
    assert got[4] is None and alone[4] is None  # the empty answer keeps its place
    assert got == pytest.approx(alone, abs=1e-4)
    for name in ("rm", "rm_llama"):  # absolute positions (BERT) and a decoder: padding must not move a row
        rm = HFClassifierScorer(str(tiny_models[name]), dtype="float32")
        assert rm.score(PROMPTS, ANSWERS, batch_size=4) == pytest.approx(
            [rm.score([q], [a])[0] for q, a in zip(PROMPTS, ANSWERS, strict=True)], abs=1e-4)
