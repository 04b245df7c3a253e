"""The `synthetic` backend: deterministic answers and scores at no cost, for benchmarks and tests only.

An expert's answer is derived from a hash of its name and the rendered prompt (which holds the query), with a
plausible token count; a reward model's score from a hash of its spec, the query and the answer. Nothing is loaded,
so a run measures only the flow's own cost (store calls, leases, planning, Polars). Configs accept the backend only
where ZOOTER_ALLOW_SYNTHETIC=1 (schemas/config.py), so real labels never come from it.
"""

from __future__ import annotations

import hashlib
import struct

from cluster.backends import Generation

# Words of the made-up answers: enough variety that answers differ in text and length.
WORDS = ("the", "answer", "is", "a", "model", "query", "because", "first", "then", "result", "value", "so",
         "we", "can", "see", "that", "it", "works", "with", "each", "step", "and", "one", "two")


def _digest(*parts: str) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.digest()


class SyntheticGenerator:
    """An expert that answers instantly: the same (name, prompt, sampling) always gives the same answer."""

    backend = "synthetic"

    def __init__(self, name: str):
        self.name = name

    def render(self, query: str) -> str:
        return query  # no chat template: the query as it is (like an endpoint's server)

    def generate(self, prompts: list[str], max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop: list[str] | None = None, batch_size: int = 8) -> list[Generation]:
        # greedy: one answer per prompt; sampled: the seed picks another one, as it would with a real model
        salt = f"{seed}:{temperature}:{top_p}" if temperature > 0 else ""
        return [self._answer(p, max_new_tokens, salt) for p in prompts]

    def _answer(self, prompt: str, max_new_tokens: int, salt: str) -> Generation:
        d = _digest(self.name, salt, prompt)
        n = min(max_new_tokens, 8 + d[0] % 57)  # 8..64 tokens, cut at the expert's limit
        words = [WORDS[b % len(WORDS)] for b in (d * (n // len(d) + 1))[1:n + 1]]
        return Generation(response=" ".join(words), prompt_tokens=len(prompt.split()), new_tokens=n,
                          finish_reason="length" if n == max_new_tokens else "stop")


class SyntheticScorer:
    """A reward model that scores instantly: a value in [-4, 4) from a hash of (seed, query, answer)."""

    backend = "synthetic"

    def __init__(self, seed: str):
        self.seed = seed

    def score(self, queries: list[str], answers: list[str], batch_size: int = 8) -> list[float | None]:
        return [struct.unpack("<Q", _digest(self.seed, q, a)[:8])[0] / 2**64 * 8 - 4
                for q, a in zip(queries, answers, strict=True)]
