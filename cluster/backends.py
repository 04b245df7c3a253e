"""Backend registry: a model spec -> a zero-argument builder that an actor calls once to load its model.

Builders are `functools.partial` objects of backend classes, so they pickle by reference and the model is
only ever loaded inside the actor.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from schemas.config import ExpertSpec, RewardSpec


def generator_builder(spec: ExpertSpec) -> Callable[[], Any]:
    if spec.backend == "hf":
        from cluster.hf import HFGenerator

        return partial(HFGenerator, spec.model, dtype=spec.dtype, threads=spec.resources.threads,
                       trust_remote_code=spec.trust_remote_code)
    raise ValueError(f"expert {spec.name!r}: unknown backend {spec.backend!r}; choose one of ['hf']")


def scorer_builder(rm: RewardSpec) -> Callable[[], Any]:
    from cluster.hf import HFClassifierScorer, HFLoglikScorer

    cls = {"loglik": HFLoglikScorer, "classifier": HFClassifierScorer}.get(rm.kind)
    if cls is None:
        raise ValueError(f"reward model {rm.name!r}: kind {rm.kind!r} runs without a model")
    return partial(cls, rm.model, dtype=rm.dtype, threads=rm.resources.threads,
                   trust_remote_code=rm.trust_remote_code, max_length=rm.max_length)
