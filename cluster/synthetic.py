"""The `synthetic` backend: deterministic answers and scores at no cost, for benchmarks and tests only.

An expert's answer is derived from a hash of its name and the rendered prompt (which holds the query), with a
plausible token count; a reward model's score from a hash of its spec, the query and the answer. Nothing is loaded,
so a run measures only the flow's own cost (store calls, leases, planning, Polars). Configs accept the backend only
where ZOOTER_ALLOW_SYNTHETIC=1 (schemas/config.py), so real labels never come from it.

A latency model (optional, off by default) makes the same answers and scores take the time a GPU would: a call
sleeps prompt_tokens / prefill rate + new_tokens / decode rate (a reward model: its scored tokens / prefill rate),
times a time scale (benchmarks/sim_cluster.py: a simulated GPU cluster). It is an operational knob, like a pool
size: it lives outside the spec (the `latency` argument, else ZOOTER_SYNTHETIC_LATENCY in the actor's environment)
and changes neither outputs nor fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass

from cluster.batches import Generation

# JSON: {"time_scale": s, "experts": {expert name: rates}, "scorers": {scorer seed: rates}}, rates =
# {"prefill_tps": tokens/s, "decode_tps": tokens/s} of one model instance (all its GPUs together).
LATENCY_ENV = "ZOOTER_SYNTHETIC_LATENCY"


@dataclass(frozen=True)
class Latency:
    """How long one model instance takes: prompt tokens at `prefill_tps`, generated tokens at `decode_tps`, the
    sum times `time_scale` (simulated seconds per modelled second)."""

    prefill_tps: float
    decode_tps: float = float("inf")
    time_scale: float = 1.0

    def seconds(self, prompt_tokens: int, new_tokens: int = 0) -> float:
        """Modelled (unscaled) seconds of one call."""
        return prompt_tokens / self.prefill_tps + new_tokens / self.decode_tps

    def spend(self, since: float, prompt_tokens: int, new_tokens: int = 0) -> None:
        """Sleep until the call that started at `since` (time.perf_counter()) has taken its modelled time: the
        hashing that made its outputs counts, as a real model's own work would."""
        left = self.seconds(prompt_tokens, new_tokens) * self.time_scale - (time.perf_counter() - since)
        if left > 0:
            time.sleep(left)


def latency_from_env(kind: str, key: str) -> Latency | None:
    """The latency ZOOTER_SYNTHETIC_LATENCY gives `key` (an expert's name: kind "experts"; a scorer's seed:
    "scorers"); None when the variable is unset or does not name it."""
    raw = os.environ.get(LATENCY_ENV)
    if not raw:
        return None
    spec = json.loads(raw)
    rates = spec.get(kind, {}).get(key)
    if rates is None:
        return None
    return Latency(float(rates["prefill_tps"]), float(rates.get("decode_tps", float("inf"))),
                   float(spec.get("time_scale", 1.0)))


def scored_tokens(query: str, answer: str) -> int:
    """The tokens a reward model reads for one pair (words, as the generator counts prompt tokens)."""
    return len(query.split()) + len(answer.split())

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

    def __init__(self, name: str, latency: Latency | None = None):
        self.name = name
        self.latency = latency or latency_from_env("experts", name)

    def render(self, query: str) -> str:
        return query  # no chat template: the query as it is (like an endpoint's server)

    def generate(self, prompts: list[str], max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop: list[str] | None = None, batch_size: int = 8) -> list[Generation]:
        # greedy: one answer per prompt; sampled: the seed picks another one, as it would with a real model
        t0 = time.perf_counter()
        salt = f"{seed}:{temperature}:{top_p}" if temperature > 0 else ""
        out = [self._answer(p, max_new_tokens, salt) for p in prompts]
        if self.latency is not None:
            self.latency.spend(t0, sum(g.prompt_tokens for g in out), sum(g.new_tokens for g in out))
        return out

    def _answer(self, prompt: str, max_new_tokens: int, salt: str) -> Generation:
        d = _digest(self.name, salt, prompt)
        n = min(max_new_tokens, 8 + d[0] % 57)  # 8..64 tokens, cut at the expert's limit
        words = [WORDS[b % len(WORDS)] for b in (d * (n // len(d) + 1))[1:n + 1]]
        return Generation(response=" ".join(words), prompt_tokens=len(prompt.split()), new_tokens=n,
                          finish_reason="length" if n == max_new_tokens else "stop")


class SyntheticScorer:
    """A reward model that scores instantly: a value in [-4, 4) from a hash of (seed, query, answer)."""

    backend = "synthetic"

    def __init__(self, seed: str, latency: Latency | None = None):
        self.seed = seed
        self.latency = latency or latency_from_env("scorers", seed)

    def score(self, queries: list[str], answers: list[str], batch_size: int = 8) -> list[float | None]:
        t0 = time.perf_counter()
        out = [struct.unpack("<Q", _digest(self.seed, q, a)[:8])[0] / 2**64 * 8 - 4
               for q, a in zip(queries, answers, strict=True)]
        if self.latency is not None:
            self.latency.spend(t0, sum(map(scored_tokens, queries, answers)))
        return out
