"""Backend registry: a model spec -> a zero-argument builder that an actor calls once to load its model.

Builders are `functools.partial` objects of backend classes (or a `Fallback` of them), so they pickle by
reference and the model is only ever loaded inside the actor: generators (experts: hf, vllm, or an OpenAI-compatible
endpoint), scorers (reward models) and the router's frozen encoder (`QueryEncoder`, the embed step's model). The
hf and vllm builders carry the identity the run's plan fingerprinted (`schemas.plan`; `models.identity`, no
weights read), so an actor refuses a source that changed since; the synthetic builders (benchmarks and tests:
cluster/synthetic.py) load nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from schemas.config import RouterConfig
from schemas.plan import PlannedExpert, PlannedRM

log = logging.getLogger("zooter.backends")


class Fallback:
    """Build with the first builder that works (e.g. vLLM's pooling runner, else transformers)."""

    def __init__(self, *builders: Callable[[], Any]):
        self.builders = builders

    def __call__(self) -> Any:
        for b in self.builders[:-1]:
            try:
                return b()
            except Exception as e:  # noqa: BLE001 - any failure to build means: use the next backend
                log.warning("%s failed (%s: %s); falling back", getattr(b, "func", b), type(e).__name__, e)
        return self.builders[-1]()


def generator_builder(expert: PlannedExpert) -> Callable[[], Any]:
    """How an actor builds the expert, carrying its weights' identity as the run's plan resolved it."""
    spec, identity = expert.spec, expert.identity
    if spec.backend == "synthetic":  # benchmarks/tests: answers from a hash, nothing to load
        from cluster.synthetic import SyntheticGenerator

        return partial(SyntheticGenerator, spec.name)
    if spec.backend == "openai":  # `model` is the served model id: nothing to resolve or identify here
        from cluster.openai_backend import OpenAIGenerator

        # the pool's actors share the endpoint's in-flight budget (ExpertSpec refuses pool_size > max_in_flight)
        return partial(OpenAIGenerator, spec.name, spec.base_url, spec.model, chat=spec.prompt == "chat",
                       api_key_env=spec.api_key_env, max_in_flight=spec.max_in_flight // spec.resources.pool_size,
                       timeout_s=spec.timeout_s)
    # `expect`: the identity the driver fingerprinted; the actor refuses other weights (cluster/models.py resolve)
    common = dict(dtype=spec.dtype, threads=spec.resources.threads, trust_remote_code=spec.trust_remote_code,
                  revision=spec.revision, expect=identity)
    if spec.backend == "vllm":
        from cluster.vllm_backend import VLLMGenerator

        return partial(VLLMGenerator, spec.model, max_model_len=spec.max_model_len,
                       tensor_parallel_size=spec.tensor_parallel_size, **common)
    from cluster.hf import HFGenerator

    return partial(HFGenerator, spec.model, **common)


def scorer_builder(planned: PlannedRM) -> Callable[[], Any]:
    """How an actor builds the reward model, carrying its weights' identity as the run's plan resolved it."""
    rm, identity = planned.spec, planned.identity
    if rm.kind == "verifiable":
        raise ValueError(f"reward model {rm.name!r}: kind 'verifiable' runs without a model")
    if rm.backend == "synthetic":  # scores from a hash of what the RM's fingerprint covers (not its name)
        from cluster.synthetic import SyntheticScorer

        return partial(SyntheticScorer, json.dumps(rm.model_dump(mode="json", exclude={"name", "resources", "weight"}),
                                                   sort_keys=True))
    from cluster.hf import HFClassifierScorer, HFLoglikScorer

    common = dict(dtype=rm.dtype, threads=rm.resources.threads, trust_remote_code=rm.trust_remote_code,
                  max_length=rm.max_length, revision=rm.revision, expect=identity)
    hf = (partial(HFLoglikScorer, rm.model, normalise=rm.normalise, **common) if rm.kind == "loglik"
          else partial(HFClassifierScorer, rm.model, **common))
    if rm.backend == "vllm":
        from cluster.vllm_backend import VLLMClassifierScorer

        return Fallback(partial(VLLMClassifierScorer, rm.model, tensor_parallel_size=rm.tensor_parallel_size,
                                **common), hf)
    return hf


class QueryEncoder:
    """A router's encoder as shipped (frozen): pooled features of query texts, loaded once per actor."""

    def __init__(self, encoder: str, pooling: str, max_length: int, prefix: str = "", threads: int = 1,
                 batch_size: int = 32, expect: str | None = None):
        import torch

        from cluster.router import build

        torch.set_num_threads(threads)
        self.model, self.tok = build(encoder, 1, pooling, expect=expect)
        self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.max_length, self.prefix, self.batch_size = max_length, prefix, batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), hidden) float32 features, as the router computes them at inference."""
        from cluster.router import embed_texts

        return embed_texts(self.model, self.tok, texts, self.max_length, self.prefix, self.batch_size)


def encoder_builder(cfg: RouterConfig, identity: str, threads: int = 1) -> Callable[[], QueryEncoder]:
    return partial(QueryEncoder, cfg.encoder, cfg.pooling, cfg.max_length, cfg.prefix, threads, expect=identity)
