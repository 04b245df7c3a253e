"""preflight: every check that can fail before a model loads or the store is written.

Config (already validated by pydantic), model sources (exist, no hashing), prompt templates, what each reward
model is (config.json only), the whole query file, S3 credentials, and the store's existing query shards
(Parquet footers, plus the ids and texts they hold): it reads the store, never writes it. Raises a `ConfigError`
(an `InputError` for the query file) whose one-line message names the file/line or the config key, or
`StoreUnavailable` when the store does not answer.
"""

from __future__ import annotations

import warnings

import polars as pl
import pyarrow as pa

from cluster.models import ModelSourceError, architectures, check_source
from schemas.artifacts import QUERIES, queries_path
from schemas.config import ConfigError, FlowConfig, RewardSpec, StoreConfig
from schemas.store import ArtifactError, Store, same_fields
from tasks.generate import template_text
from tasks.ingest import check_stored_ids, read_queries, store_shards

CAUSAL_LM = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


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
            _reward_kind(f"reward_models.{i}.model", rm)
    _source("router.encoder", cfg.router.encoder)
    for key, spec in [*(("experts", e) for e in cfg.experts), *(("reward_models", r) for r in cfg.reward_models)]:
        if spec.trust_remote_code:
            warnings.warn(f"{key}: {spec.name!r} sets trust_remote_code: code from {spec.model} will run",
                          stacklevel=2)
    queries = read_queries(cfg.data)
    _s3_credentials(cfg.store)
    _stored_queries(Store.from_config(cfg.store), queries, cfg.data.path)
    return queries


def _source(key: str, ref: str) -> None:
    try:
        check_source(ref)
    except ModelSourceError as e:
        raise ConfigError(f"{key}: {e}") from None


def _reward_kind(key: str, rm: RewardSpec) -> None:
    """A classifier must be a one-logit *ForSequenceClassification, a loglik judge a causal LM."""
    assert rm.model is not None
    try:
        archs, labels = architectures(rm.model)
    except ModelSourceError as e:
        raise ConfigError(f"{key}: {e}") from None
    if not archs:  # config.json does not say: the load will tell
        return
    if rm.kind == "classifier":
        ok = any(a.endswith("ForSequenceClassification") for a in archs) and labels == 1
        need = "kind classifier needs a *ForSequenceClassification with num_labels 1"
    else:
        ok = any(a.endswith(CAUSAL_LM) for a in archs)
        need = "kind loglik needs a causal LM (*ForCausalLM)"
    if not ok:
        what = f"architectures [{', '.join(archs)}]" + ("" if labels is None else f", num_labels {labels}")
        raise ConfigError(f"{key}: {rm.model}: not a {'reward model' if rm.kind == 'classifier' else 'judge LM'} "
                          f"({what}; {need})")


def _s3_credentials(store: StoreConfig) -> None:
    """An s3:// store needs credentials: store.options key+secret, anon, or botocore's default chain
    (environment, shared files, profile; never a request to S3 itself)."""
    if not store.url.startswith("s3://"):
        return
    o = store.options
    if (o.get("key") and o.get("secret")) or str(o.get("anon", "")).lower() in ("true", "1", "yes"):
        return
    import botocore.exceptions
    import botocore.session

    try:
        creds = botocore.session.Session(profile=o.get("profile")).get_credentials()
    except botocore.exceptions.BotoCoreError as e:
        raise ConfigError(f"store.options: {store.url}: no usable S3 credentials ({e})") from None
    if creds is None or not creds.access_key:
        raise ConfigError(f"store.options: {store.url}: no S3 credentials (set key and secret, or anon: 'true', "
                          "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")


def _fields(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _stored_queries(store: Store, queries: pl.DataFrame, data_path: str) -> None:
    """Existing query shards must be queries cells (footers only) and must not hold a query's id with another
    text; reading, never writing."""
    try:
        shards = store_shards(store)
    except ValueError as e:  # a stray queries/shard-*.parquet name that is not a number
        raise ConfigError(f"store: {store.uri('queries')}: not a zooter store ({e})") from None
    if not shards:
        return
    for s in shards:
        rel = queries_path(s)
        try:
            got = store.read_schema(rel)
        except ArtifactError as e:
            raise ConfigError(f"store: {' '.join(str(e).split())}") from None
        if not same_fields(got, QUERIES):
            raise ConfigError(f"store: {store.uri(rel)}: not a queries cell (columns {_fields(got)}; expected "
                              f"{_fields(QUERIES)})")
    known = store.scan([queries_path(s) for s in shards]).select("query_id", "text").collect()
    check_stored_ids(queries, known, store.url, data_path)
