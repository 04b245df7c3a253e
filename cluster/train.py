"""Ray Train for the router: a `TorchTrainer` whose workers run the explicit loop below.

The driver puts the training and validation rows into Ray's object store (`ray.put`) and passes their references
in the loop config, so a worker on any node reads them through Ray, never from the driver's disk. Each worker
shards the training rows by rank (DistributedSampler via `prepare_data_loader`), trains with the KL loss and
reports validation metrics every epoch; rank 0 attaches a checkpoint (model, optimizer, epoch, config, experts,
labels fingerprint) whenever validation loss improves, so the run's latest checkpoint is its best.

With `num_workers: 0` the same loop runs in Ray Train's local mode: in the calling process, with no worker,
controller or other actor started (for a router small enough that starting them costs more than the fit). One
worker and local mode are the same computation (no DDP, no distributed sampler with one worker): the same best
epoch, the same weights. Local mode keeps no checkpoint past `ray.train.report`, so there the loop hands its best
payload back in its return value.
"""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.utils.data import DataLoader, TensorDataset

from cluster.router import RouterHead, build_from_config, loss_fn
from schemas.config import RouterConfig
from schemas.errors import ArtifactError


def _tensors(tok, df: pl.DataFrame, max_length: int, prefix: str = "") -> TensorDataset:
    enc = tok([prefix + t for t in df["text"].to_list()], padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    target = torch.tensor(df["target"].to_list(), dtype=torch.float32)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], target)


def _features(df: pl.DataFrame) -> TensorDataset:
    x = torch.tensor(df["vector"].to_list(), dtype=torch.float32)
    return TensorDataset(x, torch.tensor(df["target"].to_list(), dtype=torch.float32))


def _setup(cfg: RouterConfig, n_experts: int, train_df: pl.DataFrame, val_df: pl.DataFrame):
    """(model, train set, val set). A frozen encoder trains only the head, on the embed step's features: the
    standardisation buffers come from the training features; the encoder is never loaded here."""
    if cfg.freeze_encoder:
        train, val = _features(train_df), _features(val_df)
        x = train.tensors[0]
        head = RouterHead(x.shape[1], n_experts, cfg.head_hidden, cfg.dropout, standardize=True, heads=cfg.heads,
                          sigmoid=cfg.loss == "bce")
        head.feat_mean.copy_(x.mean(0))
        head.feat_std.copy_(x.std(0).clamp(min=1e-6))
        return head, train, val
    model, tok = build_from_config(cfg, n_experts)
    return model, _tensors(tok, train_df, cfg.max_length, cfg.prefix), _tensors(tok, val_df, cfg.max_length, cfg.prefix)


def train_loop(loop: dict) -> dict:
    """Per-worker loop (Ray Train calls it with `train_loop_config`: the RouterConfig, the experts, the labels
    fingerprint and object references to the train/val rows); returns every epoch's metrics (`history`) and the
    Ray node ids of all workers (`nodes`)."""
    cfg: RouterConfig = loop["router"]
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    train_df, val_df = (pl.from_arrow(t) for t in ray.get([loop["train"], loop["val"]]))
    model, train_set, val_set = _setup(cfg, len(loop["experts"]), train_df, val_df)
    train = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True)
    val = DataLoader(val_set, batch_size=256) if val_df.height else None
    train = ray.train.torch.prepare_data_loader(train)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * max(0.0, (steps - s) / steps))
    rank = ray.train.get_context().get_world_rank()
    history: list[dict] = []
    best, kept = float("inf"), None
    for epoch in range(cfg.epochs):
        if hasattr(train.sampler, "set_epoch"):
            train.sampler.set_epoch(epoch)
        model.train()
        total, n = 0.0, 0
        for *inputs, target in train:  # every head fits the target on its own (members=True: (heads, n, experts))
            loss = loss_fn(model(*inputs, members=True), target.to(inputs[0].device), cfg.loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(target), n + len(target)
        metrics = {"epoch": epoch + 1, "train_loss": total / max(n, 1), **_validate(model, val, cfg.loss, val_df)}
        history.append(metrics)
        # Select on validation loss (or reward: negated, lower is better); without a validation split, on training
        # loss.
        select = (metrics["train_loss"] if val is None else -metrics["val_reward"] if cfg.select == "reward"
                  else metrics["val_loss"])
        payload = None
        if rank == 0 and select < best:  # only improvements are checkpointed: the latest one is the best
            best = select
            inner = model.module if hasattr(model, "module") else model
            payload = {"model": inner.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                       "config": cfg.model_dump(mode="json"), "experts": loop["experts"],
                       "labels": loop["labels_fingerprint"]}
        if loop.get("local"):  # training goes on with these tensors: keep a copy, as a checkpoint file would be
            kept = copy.deepcopy(payload) if payload is not None else kept
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if payload is not None:
                torch.save(payload, os.path.join(d, "checkpoint.pt"))
                ckpt = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
    return {"history": history, "nodes": _worker_nodes(), **({"best": kept} if loop.get("local") else {})}


def _worker_nodes() -> list[str]:
    """Every worker's Ray node id (the run manifest records where training ran); only rank 0's return is kept."""
    node = ray.get_runtime_context().get_node_id()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [node]
    nodes: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(nodes, node)
    return sorted({n for n in nodes if n})


@torch.no_grad()
def _validate(model, val, kind: str, val_df: pl.DataFrame) -> dict:
    """val_loss (mean over heads), val_top1 (the routed expert is the target's argmax) and val_reward: the routed
    expert's mean reward, averaged over tags when the rows carry tags (`rewards`, `tags` in `val_df`; None
    without `rewards`)."""
    if val is None:
        return {"val_loss": None, "val_top1": None, "val_reward": None}
    model.eval()
    total, agree, n, picks = 0.0, 0, 0, []
    for *inputs, target in val:
        members = model(*inputs, members=True)
        total += float(loss_fn(members, target, kind)) * len(target)
        choice = model(*inputs).argmax(-1)
        agree += int((choice == target.argmax(-1)).sum())
        picks.append(choice.cpu())
        n += len(target)
    return {"val_loss": total / n, "val_top1": agree / n, "val_reward": _routed_reward(val_df, torch.cat(picks))}


def _routed_reward(rows: pl.DataFrame, choice: torch.Tensor) -> float | None:
    """Mean reward of the chosen experts (over tags, then their mean, when `tags` are given)."""
    if "rewards" not in rows.columns:
        return None
    r = pl.DataFrame({"r": torch.tensor(rows["rewards"].to_list()).gather(1, choice[:, None])[:, 0].tolist()})
    if "tags" not in rows.columns or rows["tags"].list.len().max() == 0:
        return float(r["r"].mean())
    per = r.with_columns(rows["tags"]).explode("tags").drop_nulls("tags").group_by("tags").agg(pl.col("r").mean())
    return float(per["r"].mean())


def fit(cfg: RouterConfig, train: pa.Table, val: pa.Table, experts: list[str], labels_fp: str, storage_path: str,
        storage_filesystem=None) -> tuple[dict, list[dict], list[str]]:
    """Train on `train` (columns text or vector, and target), select the epoch on `val`; return the best
    checkpoint's payload, every epoch's metrics and the Ray node ids the workers ran on. Workers, resources and
    hyperparameters come from `cfg`.

    Checkpoints go to `storage_path`: a local directory, or a path inside `storage_filesystem` (a pyarrow
    filesystem wrapping the store's, so remote stores keep their endpoint and credentials)."""
    # Ray Train's controller polls its workers every 2 s by default, and a router fit is often seconds long: each
    # fit waited up to 2 s for its workers to be seen started and again to be seen finished. A user's setting wins
    # (Ray Train passes the driver's value on to its controller).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    local = cfg.num_workers == 0
    loop = {"router": cfg, "experts": experts, "labels_fingerprint": labels_fp, "local": local,
            "train": ray.put(train), "val": ray.put(val)}  # the references keep the rows alive until fit returns
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name="train", storage_path=storage_path, storage_filesystem=storage_filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    threads = torch.get_num_threads()
    try:
        result = trainer.fit()
    finally:
        torch.set_num_threads(threads)  # local mode's loop set this process's own
    # The history is rank 0's return value: `result.metrics` are those of the latest checkpoint, i.e. of the best
    # epoch, and would drop the epochs after it.
    out = result.return_value
    if local:
        return out["best"], out["history"], out["nodes"]
    with result.checkpoint.as_directory() as d:
        payload = load_checkpoint(Path(d) / "checkpoint.pt")
    return payload, out["history"], out["nodes"]


def load_checkpoint(path: Path) -> dict:
    """A Ray Train checkpoint read back from the store, without pickle: `weights_only=True` unpickles tensors,
    containers and plain values only (what `train_loop` saves: state dicts, epoch, config as JSON, names), so
    whoever can write the store during a fit cannot run code in the driver. Anything else is an ArtifactError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ArtifactError(f"{path}: not a router checkpoint this code wrote (it holds more than tensors and "
                            f"plain values; not loaded: {first[:200]})") from None
