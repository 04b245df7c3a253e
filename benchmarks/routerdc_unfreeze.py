"""The router with its encoder's top layers trained too (issue 16's "partly unfrozen encoder layers"), against the
frozen-encoder head of examples/routerdc.yaml, on the same seeds, validation slices and targets.

A full fine-tune of multilingual-e5-small on 2 CPU cores would cost ~30 min an epoch (estimated from the 11 min
forward pass over the 15,343 queries); this trains only the top `--layers` transformer layers: every query's hidden
states below them are computed once (frozen, cached under .zooter/cache; the frozen top layers on them must give
the embed step's features, checked) and each epoch runs the trainable layers, mean pooling and the standardised
MLP head on them. By default (`--init frozen`, linear-probe-then-fine-tune) the head starts as the seed's
frozen-encoder router from `make routerdc`, which is also epoch 0 of the selection, so the result can only move
off that router where validation loss says so; `--init fresh` starts a new head. Everything else is train_router's:
the seed's 15 % validation slice, the targets' tag prior from the fitted rows, the KL loss, warm-up and linear
decay, the best epoch by validation loss. A diagnostic (nothing is chosen on the test split); results in
benchmarks/results/routerdc_unfreeze.json, paired with routerdc_seeds.json's routers seed by seed.

    python benchmarks/routerdc_unfreeze.py [--layers 1] [--epochs 3] [--encoder-lr 2e-5 ...] [--init frozen|fresh]
                                           [--head-lr LR] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load

from cluster import models
from cluster.router import RouterHead, load_encoder, loss_fn, pool
from schemas.artifacts import ROUTER_WEIGHTS, router_file
from tasks.evaluate import validate

sys.path.insert(0, str(Path(__file__).parent))
from routerdc_cv import labels, seed_split  # noqa: E402
from routerdc_seeds import ROOT, ms, setup  # noqa: E402

OUT = ROOT / "benchmarks/results/routerdc_unfreeze.json"


def below(enc, tok, texts: list[str], cfg, layers: int, batch: int = 64) -> list[torch.Tensor]:
    """Each text's hidden states (its own length, float16) at the input of the encoder's top `layers` layers."""
    ids = tok([cfg.prefix + t for t in texts], truncation=True, max_length=cfg.max_length)["input_ids"]
    order = np.argsort([len(i) for i in ids])
    out: list[torch.Tensor | None] = [None] * len(ids)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(order), batch):
            idx = order[b:b + batch]
            enc_in = tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
            h = enc(**enc_in, output_hidden_states=True).hidden_states[-(layers + 1)]
            for j, i in enumerate(idx):
                out[i] = h[j, :len(ids[i])].to(torch.float16).clone()
            if b // batch % 20 == 0:
                print(f"  cached {b + len(idx)}/{len(ids)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out  # type: ignore[return-value]


class Top(torch.nn.Module):
    """The encoder's top layers (trainable copies) -> mean pooling -> the standardised head."""

    def __init__(self, enc, layers: int, head: RouterHead):
        super().__init__()
        self.config = enc.config
        self.layers = torch.nn.ModuleList(copy.deepcopy(enc.encoder.layer[-layers:]))
        self.head = head

    def features(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        m = create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=mask)
        for layer in self.layers:
            h = layer(h, m)
        return pool(h, mask, "mean")

    def forward(self, h: torch.Tensor, mask: torch.Tensor, members: bool = False) -> torch.Tensor:
        return self.head(self.features(h, mask), members=members)


def batches(states: list[torch.Tensor], idx: np.ndarray, size: int, rng: np.random.Generator | None):
    """(row indices, padded float32 states, mask): length-sorted buckets (little padding), in random order when
    training."""
    idx = idx[np.argsort([len(states[i]) for i in idx], kind="stable")]
    chunks = [idx[b:b + size] for b in range(0, len(idx), size)]
    if rng is not None:
        rng.shuffle(chunks)
    for c in chunks:
        n = max(len(states[i]) for i in c)
        h = torch.zeros(len(c), n, states[c[0]].shape[1])
        mask = torch.zeros(len(c), n, dtype=torch.long)
        for j, i in enumerate(c):
            h[j, :len(states[i])] = states[i].float()
            mask[j, :len(states[i])] = 1
        yield c, h, mask


def probs(model: Top, states, idx: np.ndarray, n_experts: int) -> np.ndarray:
    model.eval()
    out = np.zeros((len(idx), n_experts))
    pos = {int(i): k for k, i in enumerate(idx)}
    with torch.no_grad():
        for c, h, mask in batches(states, idx, 256, None):
            out[[pos[int(i)] for i in c]] = torch.softmax(model(h, mask), -1).numpy()
    return out


def one_seed(data, states, cfg, agg, seed: int, layers: int, epochs: int, encoder_lr: float, enc,
             init: bytes | None, head_lr: float) -> dict:
    rows, by_task, experts = data
    rows, masks = seed_split(rows, seed, agg)
    fit_i, val_i, test_i = (np.flatnonzero(m.to_numpy()) for m in masks)
    fit_t, val_t, test_t = (by_task.filter(m) for m in masks)
    torch.manual_seed(seed)
    x = torch.tensor(np.array(rows["vector"].to_list(), dtype=np.float32)[fit_i])
    head = RouterHead(x.shape[1], len(experts), cfg.head_hidden, cfg.dropout, standardize=True)
    head.feat_mean.copy_(x.mean(0))
    head.feat_std.copy_(x.std(0).clamp(min=1e-6))
    if init is not None:  # the frozen-encoder router of this seed: its head, then both trained on (LP-FT)
        head.load_state_dict(load(init))
    model = Top(enc, layers, head)
    target = torch.tensor(np.array(rows["target"].to_list(), dtype=np.float32))
    opt = torch.optim.AdamW([{"params": model.layers.parameters(), "lr": encoder_lr},
                             {"params": model.head.parameters(), "lr": head_lr}], weight_decay=cfg.weight_decay)
    steps = epochs * -(-len(fit_i) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * max(0.0, (steps - s) / steps))
    rng = np.random.default_rng(seed)
    best, history, kept = float("inf"), [], None
    t0 = time.perf_counter()
    for epoch in range(0 if init is not None else 1, epochs + 1):  # epoch 0: the frozen router as it was
        model.train()
        for c, h, mask in (batches(states, fit_i, cfg.batch_size, rng) if epoch else ()):
            loss = loss_fn(model(h, mask, members=True), target[c], "kl")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        pv = probs(model, states, val_i, len(experts))
        val_loss = float(loss_fn(torch.log(torch.tensor(pv)).unsqueeze(0).float(), target[val_i], "kl"))
        history.append({"epoch": epoch, "val_loss": val_loss,
                        "val_avg": 100 * validate(val_t, fit_t, pv, seed).tag_average,
                        "seconds": round(time.perf_counter() - t0)})
        print(json.dumps({"seed": seed, **history[-1]}), file=sys.stderr, flush=True)
        if val_loss < best:
            best, kept = val_loss, (epoch, history[-1]["val_avg"], probs(model, states, test_i, len(experts)))
    epoch, val_avg, pt = kept
    return {"seed": seed, "epoch": epoch, "history": history, "val_avg": val_avg,
            "test_avg": 100 * validate(test_t, fit_t, pt, seed).tag_average}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="top encoder layers trained")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--encoder-lr", type=float, nargs="+", default=[2e-5],
                    help="the trained layers' learning rate; several: each in turn (the states are loaded once)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--init", choices=["fresh", "frozen"], default="frozen",
                    help="the head: freshly initialised, or the seed's frozen-encoder router (make routerdc)")
    ap.add_argument("--head-lr", type=float, help="the head's learning rate (default: the config's with --init "
                    "fresh, a tenth of it with --init frozen)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    s = setup()
    cfg, agg = s.cfg.router, s.cfg.aggregate
    data = labels(s, agg)
    path = models.resolve(cfg.encoder)
    from transformers import AutoTokenizer

    enc, tok = load_encoder(path).eval(), AutoTokenizer.from_pretrained(path)
    cache = Path(os.environ.get("ZOOTER_CACHE", ROOT / ".zooter/cache")) / f"routerdc_below_{args.layers}.pt"
    if cache.exists():
        states = torch.load(cache)
    else:
        states = below(enc, tok, data[0]["text"].to_list(), cfg, args.layers)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(states, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").rename(cache)
    # the cached states, through the frozen top layers, must give the embed step's own features
    top = Top(enc, args.layers, RouterHead(enc.config.hidden_size, 1)).eval()
    with torch.no_grad():
        c, h, mask = next(batches(states, np.arange(64), 64, None))
        got = top.features(h, mask).numpy()
    want = np.array(data[0]["vector"].to_list(), dtype=np.float32)[c]
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    if cos.min() < 0.999:
        raise SystemExit(f"cached states do not reproduce the embed step's features (min cosine {cos.min():.4f})")
    frozen = {r["seed"]: r for r in json.loads((ROOT / "benchmarks/results/routerdc_seeds.json").read_text())["runs"]}
    head_lr = args.head_lr or (cfg.lr if args.init == "fresh" else cfg.lr / 10)
    init = lambda seed: (None if args.init == "fresh" else  # noqa: E731
                         s.store.read_bytes(router_file(frozen[seed]["router"], ROUTER_WEIGHTS)))
    for encoder_lr in args.encoder_lr:
        runs = [one_seed(data, states, cfg, agg, seed, args.layers, args.epochs, encoder_lr, enc, init(seed),
                         head_lr) for seed in range(args.seeds)]
        result = {"layers": args.layers, "epochs": args.epochs, "encoder_lr": encoder_lr, "init": args.init,
                  "head_lr": head_lr,
                  "val_avg": ms([r["val_avg"] for r in runs]), "test_avg": ms([r["test_avg"] for r in runs]),
                  # paired with the frozen-encoder router of the same seed (`make routerdc`'s routerdc_seeds.json)
                  "val_vs_frozen": ms([r["val_avg"] - frozen[r["seed"]]["val_avg"] for r in runs]),
                  "test_vs_frozen": ms([r["test_avg"] - frozen[r["seed"]]["test_avg"] for r in runs]), "runs": runs}
        old = json.loads(OUT.read_text()) if OUT.exists() else {}
        key = f"{args.init} head, layers {args.layers}, lr {encoder_lr}/{head_lr}, epochs {args.epochs}"
        OUT.write_text(json.dumps(old | {key: result}, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
