"""preflight: every check that can fail before a model loads or the store is written.

Config (already validated by pydantic), model sources (exist, no hashing), experts behind an endpoint (the API
key's variable is set; `GET {base_url}/models` lists the model: one request, 5 s), prompt templates, what each reward
model is (config.json only), the data columns the config names (against the file's columns), the whole query
file, S3 credentials, the store (a directory this process can write; its existing query shards: Parquet footers,
plus the ids, texts and splits they hold; the champion record), and enough training queries for the router's
validation slice: it reads the store, never writes it. Model sources are checked where they live (a local
directory, an S3 prefix: one LIST, a hub id: the local HF cache) without reading weights. Raises a
`ConfigError` (an `InputError` for the query file) whose one-line message names the file/line or the config key,
an `ArtifactError` for a corrupted record in the store, `StoreUnavailable` when the store does not answer, or
`EndpointUnavailable` when an expert's endpoint does not.
`preflight_train` does the same for `zooter train` (imported scores); `preflight_cluster` refuses a store
the nodes of a cluster cannot share.
"""

from __future__ import annotations

import os
import warnings
from itertools import islice
from pathlib import Path

import polars as pl
import pyarrow as pa

from cluster.models import ModelSourceError, architectures, check_source
from cluster.openai_backend import api_key, check_endpoint
from schemas.artifacts import QUERIES, SCORES, import_path, queries_path, score_path
from schemas.config import (
    ALLOW_SYNTHETIC,
    ConfigError,
    DataConfig,
    ExpertSpec,
    FlowConfig,
    RewardSpec,
    StoreConfig,
    TrainConfig,
)
from schemas.errors import ZooterError
from schemas.evaluation import read_champion
from schemas.store import ArtifactError, Store, same_fields
from tasks.aggregate import VAL_FRACTION, ScoreSource, hash_split, scan_scores, train_val
from tasks.generate import template_text
from tasks.import_scores import ImportRecord, read_import
from tasks.ingest import check_stored_ids, read_queries, store_shards
from tasks.records import check_file, records, schema
from tasks.tag import check_tagger

CAUSAL_LM = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
COLUMN_KEYS = ("text_field", "id_field", "tags_field", "reference_field")  # DataConfig keys that name a column


def preflight(cfg: FlowConfig) -> pl.DataFrame:
    _synthetic(cfg)
    check_tagger(cfg.tagger, cfg)  # e.g. tagger.expert not in the pool
    for i, e in enumerate(cfg.experts):
        check_expert(f"experts.{i}", e)
    for i, rm in enumerate(cfg.reward_models):
        if rm.model:
            _source(f"reward_models.{i}.model", rm.model, rm.revision)
            _reward_kind(f"reward_models.{i}.model", rm)
    _source("router.encoder", cfg.router.encoder)
    for key, spec in [*(("experts", e) for e in cfg.experts), *(("reward_models", r) for r in cfg.reward_models)]:
        if spec.trust_remote_code:
            warnings.warn(f"{key}: {spec.name!r} sets trust_remote_code: code from {spec.model} will run",
                          stacklevel=2)
    _columns(cfg.data)
    queries = read_queries(cfg.data)
    _s3_credentials(cfg.store)
    store = Store.from_config(cfg.store)
    store.check_writable()
    known = _stored_queries(store, queries, cfg.data.path)
    read_champion(store)  # publish reads it after training: a corrupted one fails now
    new = queries.join(known, on="query_id", how="anti").select("query_id", pl.lit(None, pl.String).alias("split"))
    enough_training(pl.concat([known, new]), cfg.data.test_fraction, "data.test_fraction", cfg.data.path,
                    cfg.router.seed)
    return queries


def preflight_train(cfg: TrainConfig) -> ImportRecord:
    """What `zooter train` checks before Ray starts: the encoder, S3 credentials, the store, the import record,
    its scores (missing (query, expert) pairs and NaN/inf scores are warned about as counts; none usable is an
    error) and enough scored training queries for the router's validation slice."""
    check_tagger(cfg.tagger, cfg)  # e.g. tagger kind llm: a `zooter train` config has no experts
    _source("router.encoder", cfg.router.encoder)
    _s3_credentials(cfg.store)
    store = Store.from_config(cfg.store)
    store.check_writable()
    rec = read_import(store, cfg.source)
    read_champion(store)
    where = store.uri(import_path(rec.name))
    _query_cells(store, rec.shards)
    for e, efp in rec.experts:  # Polars would fail on a missing or foreign cell with a traceback
        for s in rec.shards:
            rel = score_path(rec.name, rec.rm_fingerprint, e, efp, s)
            why = store.check_cell(rel, SCORES, rec.rm_fingerprint)
            if why is not None:
                raise ArtifactError(f"{store.uri(rel)}: {why}; run `zooter import-scores` again")
    scores = scan_scores(store, rec.experts, [ScoreSource(rec.name, rec.rm_fingerprint, 1.0)], rec.shards)
    counts = scores.select(
        pl.len().alias("pairs"),
        (pl.col("score").is_null() & pl.col("flag").is_null()).sum().alias("missing"),
        (pl.col("flag") == "nonfinite").sum().alias("nonfinite")).collect().row(0, named=True)
    if counts["missing"] or counts["nonfinite"]:
        warnings.warn(f"{where}: of {counts['pairs']} (query, expert) pairs, {counts['missing']} have no score and "
                      f"{counts['nonfinite']} had a NaN/inf score (both left out of the reward; see README)",
                      stacklevel=2)
    scored = scores.group_by("query_id").agg(pl.col("score").is_not_null().any().alias("ok")).filter("ok")
    queries = (store.scan([queries_path(s) for s in rec.shards]).select("query_id", "split")
               .join(scored.select("query_id"), on="query_id").collect())
    if queries.height == 0:
        raise ArtifactError(f"{where}: no query has a usable score ({counts['missing']} missing, "
                            f"{counts['nonfinite']} NaN/inf of {counts['pairs']}); import the scores again")
    enough_training(queries, cfg.test_fraction, "test_fraction", where, cfg.router.seed)
    return rec


def preflight_cluster(cfg: FlowConfig | TrainConfig, nodes: int) -> None:
    """Refuse a local-path store while connected to a Ray cluster of more than one alive node: each node's
    actors would write their cells to that node's own disk, where no other node (and no later run) finds them."""
    url = cfg.store.url
    scheme, sep, _ = url.partition("://")
    if nodes > 1 and (not sep or scheme == "file"):
        raise ConfigError(f"store.url: {url} is a local path, but the Ray cluster has {nodes} alive nodes: each "
                          "node would write its cells to its own disk; use an s3:// store")


def enough_training(queries: pl.DataFrame, test_fraction: float, key: str, where: str, seed: int = 0) -> None:
    """Refuse, before any model loads, a query set (query_id, split: null = by a hash of the id) whose training
    split gives the router no validation slice: the split and the slice are computed by the functions the
    aggregate and train_router steps use (the router fails on an empty slice after every model has run)."""

    split = pl.Series(hash_split(queries["query_id"].to_list(), test_fraction), dtype=pl.String)
    labels = queries.with_columns(pl.col("split").fill_null(split))
    train, val = train_val(labels, seed)
    if val.height == 0:
        n, t = labels.height, train.height
        raise ConfigError(f"{where}: too few queries to train the router: {key} {test_fraction} leaves {t} of {n} "
                          f"for training, and none of them falls into the router's validation slice (about "
                          f"{VAL_FRACTION:.0%} of them, by a hash of the id; none below 8); add queries or lower "
                          f"{key}")
    if not (labels["split"] == "test").any():  # evaluate would measure the router on nothing, then promote it
        raise ConfigError(f"{where}: no held-out queries: {key} {test_fraction} leaves all {labels.height} for "
                          f"training, so the router could not be evaluated (or promoted); set {key} above 0 (e.g. "
                          "0.25) or give some queries split 'test'")


def _columns(data: DataConfig) -> None:
    """Every column the config names is one the file has: Parquet's schema, the CSV header, or a key of some JSON
    record (read until each has turned up). A file with no records is left to ingest ("no queries")."""
    path = Path(data.path)
    check_file(path, "data file", " (data.path)")
    wanted = {f"data.{k}": name for k in COLUMN_KEYS if (name := getattr(data, k))}
    fields = schema(path)
    found: list[str] = [] if fields is None else fields.names
    if fields is None:  # JSONL: keys in order of first appearance
        for _, rec in islice(records(path), data.limit):
            found += [k for k in rec if k not in found]
            if set(wanted.values()) <= set(found):
                return
    absent = [(key, name) for key, name in wanted.items() if name not in found]
    if absent and found:
        key, name = absent[0]
        shown = ", ".join(found[:20]) + (f", ... ({len(found) - 20} more)" if len(found) > 20 else "")
        raise ConfigError(f"{path}: {key} {name!r} is not a column of the file (columns found: {shown})")


def _synthetic(cfg: FlowConfig) -> None:
    """Config validation refuses `backend: synthetic` without ZOOTER_ALLOW_SYNTHETIC=1; a config validated while
    the variable was set (then unset) is refused here, before anything loads."""
    if os.environ.get(ALLOW_SYNTHETIC) == "1":
        return
    for key, specs in (("experts", cfg.experts), ("reward_models", cfg.reward_models)):
        for i, spec in enumerate(specs):
            if spec.backend == "synthetic":
                raise ConfigError(f"{key}.{i}.backend: synthetic returns made-up answers and scores for benchmarks "
                                  f"and tests; set {ALLOW_SYNTHETIC}=1 to use it")


def check_expert(key: str, e: ExpertSpec, endpoint: bool = True) -> None:
    """One expert as preflight checks it (also `zooter experts add`, before it writes, with `endpoint` False): its
    endpoint (`endpoint`) or its model source, and its prompt template."""
    if e.backend == "openai":
        if endpoint:
            _endpoint(key, e)
    elif e.backend != "synthetic":  # synthetic: no model to find (its `model` is not read)
        _source(f"{key}.model", e.model, e.revision)
    try:
        template_text(e.prompt)
    except ConfigError as err:
        raise ConfigError(f"{key}.prompt: {err}") from None


def _source(key: str, ref: str, revision: str | None = None) -> None:
    try:
        check_source(ref, revision)
    except ModelSourceError as e:
        raise ConfigError(f"{key}: {e}") from None


def _endpoint(key: str, e: ExpertSpec) -> None:
    """An expert behind an endpoint: its key's variable is set here and the endpoint serves its model."""
    assert e.base_url is not None  # ExpertSpec requires it for backend openai
    try:
        api_key(e.api_key_env, e.name)
    except ConfigError as err:
        raise ConfigError(f"{key}.api_key_env: {err}") from None
    try:
        check_endpoint(e.name, e.base_url, e.model, e.api_key_env)
    except ZooterError as err:  # EndpointUnavailable stays one: the endpoint may just be starting
        raise type(err)(f"{key}.base_url: {err}") from None


def _reward_kind(key: str, rm: RewardSpec) -> None:
    """A classifier must be a one-logit *ForSequenceClassification, a loglik judge a causal LM."""
    assert rm.model is not None
    try:
        archs, labels = architectures(rm.model, rm.revision)
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


def _query_cells(store: Store, shards: list[int]) -> None:
    """Each query shard is a queries cell (footers only)."""
    for s in shards:
        rel = queries_path(s)
        try:
            got = store.read_schema(rel)
        except ArtifactError as e:
            raise ConfigError(f"store: {' '.join(str(e).split())}") from None
        if not same_fields(got, QUERIES):
            raise ConfigError(f"store: {store.uri(rel)}: not a queries cell (columns {_fields(got)}; expected "
                              f"{_fields(QUERIES)})")


def _stored_queries(store: Store, queries: pl.DataFrame, data_path: str) -> pl.DataFrame:
    """Existing query shards must be queries cells (footers only) and must not hold a query's id with another
    text; reading, never writing. Returns the stored queries' (query_id, split)."""
    try:
        shards = store_shards(store)
    except ValueError as e:  # a stray queries/shard-*.parquet name that is not a number
        raise ConfigError(f"store: {store.uri('queries')}: not a zooter store ({e})") from None
    if not shards:
        return pl.DataFrame(schema={"query_id": pl.String, "split": pl.String})
    _query_cells(store, shards)
    known = store.scan([queries_path(s) for s in shards]).select("query_id", "text", "split").collect()
    check_stored_ids(queries, known.drop("split"), store.url, data_path)
    return known.select("query_id", "split")
