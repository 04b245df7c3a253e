"""train_router: fit encoder + linear head on the tag-enhanced targets with Ray Train; save the router in the store.

Training rows are the labels' `train` split; a slice of them (by a hash of the id) is held out for validation
and picks the best epoch. The router directory is written file by file with `router.json` last, so a router
exists exactly when its `router.json` does.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl

from cluster import models
from cluster.router import build_from_config, save
from cluster.train import fit
from schemas.artifacts import LABELS, fingerprint, labels_path, router_dir
from schemas.config import RouterConfig
from schemas.store import Store, compute_once
from tasks.aggregate import hash_split

CODE_VERSION = 2  # 2: frozen-encoder routers store only their head
VAL_FRACTION = 0.15


def router_fingerprint(cfg: RouterConfig, labels_fp: str) -> str:
    d = cfg.model_dump(mode="json", exclude={"use_gpu", "cpus_per_worker", "encoder"})
    d.update(labels=labels_fp, encoder=models.identity(cfg.encoder), code=CODE_VERSION)
    return fingerprint(d)


def train_val(labels: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    train = labels.filter(pl.col("split") == "train")
    is_val = pl.Series(hash_split(train["query_id"].to_list(), VAL_FRACTION, salt="val")) == "test"
    if train.height < 8:  # too few rows to hold any out
        is_val = pl.Series([False] * train.height)
    return train.filter(~is_val), train.filter(is_val)


def with_features(store: Store, labels: pl.DataFrame, embed_fp: str) -> pl.DataFrame:
    """Labels joined with the embed step's cells (`vector`); every label row must have one."""
    cells = [f"embeddings/{embed_fp}/{n}" for n in store.ls(f"embeddings/{embed_fp}") if n.endswith(".parquet")]
    if not cells:
        raise ValueError(f"router.freeze_encoder: no embeddings {embed_fp} in {store.url}; run the embed step")
    out = labels.join(store.scan(cells).collect(), on="query_id", how="left", maintain_order="left")
    missing = out.filter(pl.col("vector").is_null()).height
    if missing:
        raise ValueError(f"embeddings {embed_fp}: {missing} labelled queries have no embedding")
    return out


def run_train_router(store: Store, labels_fp: str, cfg: RouterConfig,
                     embed_fp: str | None = None) -> tuple[str, dict]:
    """Train unless this exact router exists; returns (router fingerprint, router.json contents).
    With `cfg.freeze_encoder`, `embed_fp` names the embedding cells the head trains on. Leased: two runs that
    need the same router train it once, the other waits for it."""
    fp = router_fingerprint(cfg, labels_fp)
    done = f"{router_dir(fp)}/router.json"

    def compute(keys: list[str], claim: Callable[[str], bool]) -> Iterator[str]:
        if claim(fp):
            _train(store, labels_fp, cfg, embed_fp, fp)
            yield fp

    compute_once(store, [fp], lambda _: done, lambda _: store.exists(done), compute)
    return fp, store.read_json(done)


def _train(store: Store, labels_fp: str, cfg: RouterConfig, embed_fp: str | None, fp: str) -> dict:
    rel = router_dir(fp)
    labels = pl.from_arrow(store.read_table(labels_path(labels_fp), LABELS))
    experts = store.read_meta(labels_path(labels_fp))["experts"]
    train, val = train_val(labels)
    if train.height == 0:
        raise ValueError(f"labels {labels_fp}: no training rows (data.test_fraction leaves none)")
    cols = ["text", "target"]
    if cfg.freeze_encoder:
        if embed_fp is None:
            raise ValueError("router.freeze_encoder needs the embed step's fingerprint")
        train, val, cols = with_features(store, train, embed_fp), with_features(store, val, embed_fp), \
            ["vector", "target"]
    with tempfile.TemporaryDirectory(prefix="zooter-train-") as tmp:
        tmp_p = Path(tmp)
        train.select(cols).write_parquet(tmp_p / "train.parquet")
        val.select(cols).write_parquet(tmp_p / "val.parquet")
        loop_cfg = {**cfg.model_dump(mode="json"), "experts": experts, "labels_fingerprint": labels_fp,
                    "train_path": str(tmp_p / "train.parquet"), "val_path": str(tmp_p / "val.parquet"),
                    "threads": max(1, int(cfg.cpus_per_worker))}
        payload, history = fit(loop_cfg, store.path(f"{rel}/ray_train"), "train", cfg.num_workers, cfg.use_gpu,
                               cfg.cpus_per_worker, None if store.local else store.arrow_fs())
        model, tok = build_from_config(cfg.model_dump(mode="json"), len(experts))
        # A frozen encoder's checkpoints hold only the head: the encoder weights are the shipped ones.
        missing, unexpected = model.load_state_dict(payload["model"], strict=not cfg.freeze_encoder)
        if unexpected or any(not k.startswith("encoder.") for k in missing):
            raise ValueError(f"router {fp}: checkpoint does not fit the model ({missing[:3]}, {unexpected[:3]})")
        meta = {"router_fingerprint": fp, "labels_fingerprint": labels_fp, "experts": experts,
                "encoder": cfg.encoder, "pooling": cfg.pooling, "max_length": cfg.max_length,
                "config": cfg.model_dump(mode="json"), "best_epoch": payload["epoch"], "history": history,
                "train_rows": train.height, "val_rows": val.height, "embeddings": embed_fp,
                "encoder_identity": models.identity(cfg.encoder)}
        out = tmp_p / "router"
        save(model, tok, out, meta)
        for f in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "router.json"):
            store.write_bytes(f"{rel}/{f.relative_to(out).as_posix()}", f.read_bytes())
        store.write_bytes(f"{rel}/router.json", (out / "router.json").read_bytes())
    return meta
