"""preflight: every check that can fail before a model loads or the store is touched.

Config (already validated by pydantic), model sources (exist, no hashing), prompt templates, the reward
model kinds, and the whole query file. Raises a `ConfigError` whose one-line message names the file/key.
"""

from __future__ import annotations

import warnings

import polars as pl

from cluster.models import ModelSourceError, check_source
from schemas.config import ConfigError, FlowConfig
from tasks.generate import template_text
from tasks.ingest import read_queries


def preflight(cfg: FlowConfig) -> pl.DataFrame:
    for i, e in enumerate(cfg.experts):
        _source(f"experts.{i}.model", e.model)
        try:
            template_text(e.prompt)
        except ConfigError as err:
            raise ConfigError(f"experts.{i}.prompt: {err}") from None
    for i, rm in enumerate(cfg.reward_models):
        if rm.model:
            _source(f"reward_models.{i}.model", rm.model)
    _source("router.encoder", cfg.router.encoder)
    for key, spec in [*(("experts", e) for e in cfg.experts), *(("reward_models", r) for r in cfg.reward_models)]:
        if spec.trust_remote_code:
            warnings.warn(f"{key}: {spec.name!r} sets trust_remote_code: code from {spec.model} will run",
                          stacklevel=2)
    return read_queries(cfg.data)


def _source(key: str, ref: str) -> None:
    try:
        check_source(ref)
    except ModelSourceError as e:
        raise ConfigError(f"{key}: {e}") from None
