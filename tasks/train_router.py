"""train_router: fit encoder + linear head on the tag-enhanced targets with Ray Train; save the router in the store.

Training rows are the labels' `train` split; a slice of them (by a hash of the id) is held out for validation
and picks the best epoch. The targets' tag prior is taken from the fitted rows alone (`refit_targets`), so the
slice's rewards never reach the router it measures. The rows reach the Ray Train workers through Ray's object
store (cluster/train.py). The router directory is written file by file with its metadata file (ROUTER_JSON)
last, so a router exists exactly when that file does.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl

from cluster import models
from schemas.artifacts import (
    ROUTER_JSON,
    embeddings_dir,
    fingerprint,
    router_file,
    router_train_dir,
)
from schemas.config import AggregateConfig, RouterConfig
from schemas.errors import ArtifactError, ConfigError
from schemas.leases import compute_once
from schemas.plan import LabelsRef, RouterRef
from schemas.store import Store
from tasks.aggregate import refit_targets, train_val

# 2: frozen-encoder routers store only their head; 3: the tag prior from the fitted rows only (refit_targets)
CODE_VERSION = 3
# Options added later enter the fingerprint only when set, so routers trained before them keep their fingerprints.
LATER_DEFAULTS = {"heads": 1, "select": "loss"}


def router_fingerprint(cfg: RouterConfig, labels_fp: str, encoder_identity: str | None = None) -> str:
    """`encoder_identity`: the encoder's, as the run's plan resolved it (None: resolved here)."""
    d = cfg.model_dump(mode="json", exclude={"use_gpu", "cpus_per_worker", "encoder"})
    d = {k: v for k, v in d.items() if LATER_DEFAULTS.get(k, object()) != v}
    d["num_workers"] = max(1, d["num_workers"])  # local mode (0) is one worker's computation: the same router
    d.update(labels=labels_fp, encoder=encoder_identity or models.identity(cfg.encoder), code=CODE_VERSION)
    return fingerprint(d)


def with_features(store: Store, labels: pl.DataFrame, embed_fp: str) -> pl.DataFrame:
    """Labels joined with the embed step's cells (`vector`); every label row must have one."""
    cells = [f"{embeddings_dir(embed_fp)}/{n}" for n in store.ls(embeddings_dir(embed_fp)) if n.endswith(".parquet")]
    if not cells:
        raise ArtifactError(f"router.freeze_encoder: no embeddings {embed_fp} in {store.url}; run the embed step")
    out = labels.join(store.scan(cells).collect(), on="query_id", how="left", maintain_order="left")
    missing = out.filter(pl.col("vector").is_null()).height
    if missing:
        raise ArtifactError(f"{store.uri(embeddings_dir(embed_fp))}: {missing} labelled queries have no embedding; "
                            "run the embed step")
    return out


def bce_targets(fit_rows: pl.DataFrame, rows: pl.DataFrame, beta: float) -> pl.DataFrame:
    """`rows` with `target` replaced by each expert's success target for router.loss `bce`: the reward scaled to
    [0, 1] by the training rows' range (0/1 credits stay 0/1), tag-enhanced as the soft labels are:
    beta * own + (1 - beta) * mean over the query's known tags of the tag's mean scaled reward on `fit_rows`."""
    fit = np.array(fit_rows["rewards"].to_list(), dtype=float)
    lo, span = fit.min(), (fit.max() - fit.min()) or 1.0
    cols = [f"e{i}" for i in range(fit.shape[1])]

    def scaled(df: pl.DataFrame) -> pl.DataFrame:
        own = (np.array(df["rewards"].to_list(), dtype=float) - lo) / span
        return pl.DataFrame(own, schema=cols).with_columns(df["tags"], pl.int_range(df.height).alias("_row"))

    tag_means = scaled(fit_rows).explode("tags").drop_nulls("tags").group_by("tags").agg(pl.col(cols).mean())
    own = scaled(rows)
    prior = (own.select("_row", "tags").explode("tags").join(tag_means, on="tags")
             .group_by("_row").agg(pl.col(cols).mean()))
    mixed = own.join(prior, on="_row", how="left", suffix="_t", maintain_order="left").select(
        pl.when(pl.col(f"{c}_t").is_null()).then(pl.col(c)).otherwise(beta * pl.col(c) + (1 - beta) * pl.col(f"{c}_t"))
        for c in cols)
    return rows.with_columns(pl.Series("target", mixed.to_numpy().tolist(), dtype=rows.schema["target"]))


def fit_targets(labels: pl.DataFrame, seed: int, agg: AggregateConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(fitted, validation) rows (`train_val`) with targets whose tag prior comes from the fitted rows only."""
    train, val = train_val(labels, seed)
    fitted = pl.Series([True] * train.height + [False] * val.height, dtype=pl.Boolean)
    both = refit_targets(pl.concat([train, val]), fitted, agg)
    return both.head(train.height), both.tail(val.height)


def run_train_router(store: Store, labels: LabelsRef | str, cfg: RouterConfig, embed_fp: str | None = None,
                     encoder_identity: str | None = None) -> RouterRef:
    """Train unless this exact router exists; returns its ref (fingerprint and metadata file). `labels`: the
    aggregate step's ref (its rows in memory when the run just computed them), or a labels fingerprint.
    With `cfg.freeze_encoder`, `embed_fp` names the embedding cells the head trains on. Leased: two runs that
    need the same router train it once, the other waits for it."""
    labels = labels if isinstance(labels, LabelsRef) else LabelsRef.read(store, labels)
    encoder_identity = encoder_identity or models.identity(cfg.encoder)  # the plan's, in a run
    fp = router_fingerprint(cfg, labels.content_key, encoder_identity)  # labels with left-out queries: their own
    done = router_file(fp, ROUTER_JSON)

    def compute(keys: list[str], claim: Callable[[str], bool]) -> Iterator[str]:
        if claim(fp):
            _train(store, labels, cfg, embed_fp, fp, encoder_identity)
            yield fp

    compute_once(store, [fp], lambda _: done, lambda _: store.exists(done), compute)
    return RouterRef(fingerprint=fp, meta=store.read_json(done))


def _train(store: Store, ref: LabelsRef, cfg: RouterConfig, embed_fp: str | None, fp: str,
           encoder_identity: str) -> None:
    # torch and Ray Train: imported when a router trains, not by every import of the flow (`zooter serve`)
    from cluster.router import build_from_config, save
    from cluster.train import fit

    labels_fp, experts, agg = ref.fingerprint, ref.experts, ref.aggregate
    train, val = fit_targets(ref.frame(store), cfg.seed, agg)
    if train.height == 0:
        raise ConfigError(f"labels {labels_fp}: no training rows (data.test_fraction leaves none)")
    if cfg.loss == "bce":
        train, val = (bce_targets(train, d, agg.beta) for d in (train, val))
    cols = ["text", "target"]
    if cfg.freeze_encoder:
        if embed_fp is None:
            raise ValueError("router.freeze_encoder needs the embed step's fingerprint")  # a caller's bug
        train, val, cols = with_features(store, train, embed_fp), with_features(store, val, embed_fp), \
            ["vector", "target"]
    # validation rows also carry rewards and tags: the routed expert's reward is measured every epoch
    payload, history, nodes = fit(cfg, train.select(cols).to_arrow(), val.select(*cols, "rewards", "tags").to_arrow(),
                                  experts, labels_fp, store.path(router_train_dir(fp)),
                                  None if store.local else store.arrow_fs())
    model, tok = build_from_config(cfg, len(experts))
    # A frozen encoder's checkpoints hold only the head: the encoder weights are the shipped ones.
    missing, unexpected = model.load_state_dict(payload["model"], strict=not cfg.freeze_encoder)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise ValueError(f"router {fp}: checkpoint does not fit the model ({missing[:3]}, {unexpected[:3]})")
    meta = {"router_fingerprint": fp, "labels_fingerprint": labels_fp, "experts": experts,
            "encoder": cfg.encoder, "pooling": cfg.pooling, "max_length": cfg.max_length,
            "best_epoch": payload["epoch"], "history": history, "nodes": nodes, "train_rows": train.height,
            "val_rows": val.height,
            "embeddings": embed_fp, "encoder_identity": encoder_identity}
    with tempfile.TemporaryDirectory(prefix="zooter-router-") as tmp:
        out = Path(tmp)
        save(model, tok, cfg, out, meta)
        for f in sorted(p for p in out.rglob("*") if p.is_file() and p.name != ROUTER_JSON):
            store.write_bytes(router_file(fp, f.relative_to(out).as_posix()), f.read_bytes())
        store.write_bytes(router_file(fp, ROUTER_JSON), (out / ROUTER_JSON).read_bytes())
