r"""GPU check: the hf backend's generator and both scorers, `GPU_STEP_TOKENS` and a router fit, on random weights.

Run it on a lent device (one `run` call of the device tool; CUDA, torch and transformers are all it needs: no Ray,
no vLLM, no network, no model download), with SHA the commit of the tree it carries (the copy has no .git):

    python3 benchmarks/gpu_check.py --device cuda --shapes 0.5b,7b --budget-s 420 \
      --commit SHA --output $OUT/gpu_check.json

(`make gpu-check` runs the same with this checkout's commit and writes benchmarks/results/gpu_check.json.) It stays
within `--budget-s` (420 s leaves a margin inside an 8-minute call): a part that would start after the budget is
spent is skipped with a note, and the JSON is rewritten after every part, so a killed run still leaves its numbers.
Put them in the benchmark page with the card they ran on. `--device cpu --shapes tiny` is the CPU test's run
(tests/test_gpu_check.py, a few seconds).

What it measures, per shape (models built from configs with random weights, directly on the device in bf16, so
the 7B never materialises on the host):
- `HFGenerator.generate`, `HFLoglikScorer.mean_logp` and `HFClassifierScorer.score` from cluster/hf.py, as
  shipped (length batching included): only the checkpoint load (`cluster.hf._load`) is replaced, by the random
  model and a word-level tokenizer whose words are token ids (prompts are random ids of varied lengths). Where a
  project module cluster/hf.py reaches only for names it does not use here cannot be imported (schemas.config and
  schemas.plan need pydantic, which a bare torch + transformers machine may lack), placeholders stand in for it;
  the JSON says which (`backend_code`). cluster/hf.py and cluster/backends.py always run as they are.
  Generation: prefill tokens/s (a 1-token generate, in the batches of the full one), decode tokens/s (the rest),
  end to end; EOS is off so every row decodes `max_new_tokens`.
- `GPU_STEP_TOKENS` (cluster/hf.py, a guess so far), as its comment defines a forward pass's fixed cost: the time
  of a 1-token forward in units of the per-token cost of long forwards (the slope of time against padded tokens
  over the sweep's longest forwards). The sweep varies rows x length; the decode step of a generation is given in
  the same units (`decode_step_tokens`), since `length_batches` charges a generation max_new_tokens such steps.
- Peak GPU memory (torch.cuda.max_memory_allocated) of each part; the host's peak RSS on CPU.
Then the router: a MiniLM-shaped encoder (all-minilm-l6-v2, the default) with the router head, trained in-process
for a few steps as cluster/train.py's loop does (AdamW, warm-up then linear decay, KL loss, fp32), loss before and
after on the same rows. cluster/router.py imports pyarrow (schemas.artifacts) and cluster/train.py Ray, so where
they cannot be imported a minimal copy of RouterModel (mean pooling -> linear head) and of the KL loss is used
(`router_code` says which).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import importlib
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.utils import logging as hf_logging  # noqa: E402

# Qwen2.5-0.5B / -7B as their config.json describe them; `tiny` for the CPU test.
SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=2048, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
# all-minilm-l6-v2 (the router's default encoder); a small one for the CPU test.
ENCODERS = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522, max_position_embeddings=512),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=1024,
                 max_position_embeddings=128),
}
# Work per part. cuda: the hf backend's default batch (8) and a GPU-sized one; the sweep's longest forwards are 32k
# tokens (a small model's fixed cost on a GPU is thousands of tokens: the slope needs forwards well past it).
WORK = {
    "cuda": dict(gen_rows=32, gen_len=(16, 512), gen_new=64, gen_batches=(8, 32), score_rows=64,
                 query_len=(16, 384), answer_len=(16, 128), score_batches=(8, 32), max_length=512,
                 sweep=[(1, 1), (1, 16), (1, 128), (4, 128), (16, 128), (64, 128), (256, 128), (1, 512), (4, 512),
                        (16, 512), (64, 512)], long_from=8192, reps=3,
                 encoder="minilm", router_rows=256, router_len=128, router_batch=16, router_epochs=2),
    "cpu": dict(gen_rows=8, gen_len=(4, 48), gen_new=8, gen_batches=(4,), score_rows=8, query_len=(4, 40),
                answer_len=(4, 16), score_batches=(4,), max_length=128,
                sweep=[(1, 1), (1, 16), (4, 16), (16, 16), (1, 64), (4, 64), (16, 64), (32, 64)], long_from=256,
                reps=3, encoder="tiny", router_rows=32, router_len=32, router_batch=8, router_epochs=3),
}
SPECIALS = ["<unk>", "<pad>", "<eos>"]  # token ids 0, 1, 2; prompts use the ids above them
N_EXPERTS = 10


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def spent(self, need: float = 0.0) -> bool:
        return self.left() <= need


# --- the project's code, imported where its imports allow -----------------------------------------------------------

class _StandIn(types.ModuleType):
    """A project module that cannot be imported here: every name imported from it is a placeholder class."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


def _failing_project_module(e: BaseException) -> str | None:
    """The project module (outside benchmarks/) deepest in the traceback: the one whose import failed."""
    name, tb = None, e.__traceback__
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename).resolve()
        if path.is_relative_to(ROOT) and path.parts[len(ROOT.parts)] != "benchmarks":
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        tb = tb.tb_next
    return name


def import_hf() -> tuple[types.ModuleType | None, str]:
    """cluster.hf as shipped. On a bare device (torch + transformers) the config and plan modules it reaches
    through cluster.backends need pydantic, which its code here never uses: such a project module (never
    cluster.hf or cluster.backends themselves, whose code runs) is stood in by placeholders, one at a time."""
    stood: list[str] = []
    for _ in range(10):
        try:
            hf = importlib.import_module("cluster.hf")
            return hf, "cluster.hf" + (f" (stood in: {', '.join(stood)})" if stood else "")
        except ModuleNotFoundError as e:
            mod = _failing_project_module(e)
            if mod is None or mod in ("cluster.hf", "cluster.backends") or mod in stood:
                return None, f"unavailable: {mod or 'cluster.hf'} needs {e.name}"
            stood.append(f"{mod} ({e.name} missing)")
            sys.modules[mod] = _StandIn(mod)
    return None, "unavailable: too many modules to stand in"


class _MiniRouter(nn.Module):
    """The part of cluster.router.RouterModel a default router uses (mean pooling -> linear head), for machines
    where cluster.router cannot be imported (it imports pyarrow through schemas.artifacts)."""

    def __init__(self, encoder: nn.Module, n_experts: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.config.hidden_size, n_experts)

    def forward(self, input_ids, attention_mask, members: bool = False):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        z = self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))
        return z.unsqueeze(0) if members else z


def _kl(logits, target, kind="kl"):
    if logits.dim() == 3:
        return torch.stack([_kl(z, target) for z in logits]).mean()
    return F.kl_div(F.log_softmax(logits.float(), -1), target, reduction="batchmean")


def import_router():
    try:
        from cluster.router import RouterModel, loss_fn

        return RouterModel, loss_fn, "cluster.router"
    except ImportError as e:
        return _MiniRouter, _kl, f"minimal copy of RouterModel + KL loss (cluster.router: {e.name or e} missing)"


# --- measurement helpers ------------------------------------------------------------------------------------------

def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn) -> tuple[float, object]:
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t, out


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak(dev: torch.device) -> dict:
    if dev.type == "cuda":
        return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # KiB on Linux


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def id_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose words are the token ids ("17 4031 9"): random prompts go through the backend's
    own tokenize/pad/decode calls and come out as exactly those ids."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    words = {w: i for i, w in enumerate(SPECIALS)} | {str(i): i for i in range(len(SPECIALS), vocab)}
    t = Tokenizer(WordLevel(words, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                  model_max_length=1 << 20)
    tok.padding_side, tok.truncation_side = "left", "left"  # as cluster.hf._load sets them
    return tok


def texts(rng: random.Random, n: int, lo_hi: tuple[int, int], vocab: int) -> list[str]:
    return [" ".join(str(rng.randrange(len(SPECIALS), vocab)) for _ in range(rng.randint(*lo_hi))) for _ in range(n)]


def build(auto_cls, shape: str, dev: torch.device, dtype: torch.dtype, **extra):
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      bos_token_id=None, eos_token_id=2, pad_token_id=1, **extra)
    with torch.device(dev):
        model = auto_cls.from_config(cfg, dtype=dtype)
    return model.eval()


@contextlib.contextmanager
def loaded(hf, tok, model):
    """cluster.hf's classes built as shipped, their checkpoint load replaced by (tok, model)."""
    real = hf._load
    hf._load = lambda *a, **k: (tok, model)
    try:
        yield
    finally:
        hf._load = real


# --- the parts ------------------------------------------------------------------------------------------------------

def step_sweep(model, dev, work, budget: Budget) -> dict:
    """Forward time against padded tokens (rows x length); the fixed cost of a forward in tokens of long ones."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    points = []
    with torch.inference_mode():
        model(input_ids=torch.randint(3, vocab, (4, 64), generator=g).to(dev), logits_to_keep=1)  # warm-up
        for rows, length in work["sweep"]:
            if budget.spent(5):
                break
            ids = torch.randint(3, vocab, (rows, length), generator=g).to(dev)
            mask = torch.ones_like(ids)

            def forward(ids=ids, mask=mask):
                return model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

            times = [timed(dev, forward)[0] for _ in range(work["reps"])]
            points.append({"rows": rows, "length": length, "tokens": rows * length, "s": min(times)})
    out: dict = {"points": points}
    one = [p["s"] for p in points if p["tokens"] == 1]
    long = [p for p in points if p["tokens"] >= work["long_from"]]
    if not one or len({p["tokens"] for p in long}) < 2:
        return out | {"note": "too few points for an estimate (budget)"}
    n, sx, sy = len(long), sum(p["tokens"] for p in long), sum(p["s"] for p in long)
    sxx, sxy = sum(p["tokens"] ** 2 for p in long), sum(p["tokens"] * p["s"] for p in long)
    slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    biggest = max(long, key=lambda p: p["tokens"])
    mean_cost = biggest["s"] / biggest["tokens"]  # per token, the fixed cost included (the fallback)
    per_token = slope if slope > 0 else mean_cost
    return out | {"one_token_forward_s": one[0], "per_token_s": per_token, "per_token_s_mean": mean_cost,
                  "slope_positive": slope > 0, "step_tokens": one[0] / per_token,
                  "step_tokens_mean": one[0] / mean_cost}


def generation(hf, tok, model, dev, work, budget: Budget, rng: random.Random) -> dict:
    model.generation_config.eos_token_id = None  # random weights: no row stops early, every row decodes max_new
    with loaded(hf, tok, model):
        gen = hf.HFGenerator("random", dtype="bfloat16")  # __init__ warms generate up, as it does in an actor
    prompts = texts(rng, work["gen_rows"], work["gen_len"], model.config.vocab_size)
    new = work["gen_new"]
    out = {"rows": len(prompts), "max_new_tokens": new, "step_tokens_used": hf._step_tokens(dev), "runs": []}
    for bs in work["gen_batches"]:
        if budget.spent(10):
            out["runs"].append({"batch_size": bs, "skipped": "out of budget"})
            continue
        reset_peak(dev)
        real = hf._step_tokens  # the 1-token run (prefill) cut into the batches the full run will use
        hf._step_tokens = lambda d, real=real: new * real(d)
        try:
            t1, _ = timed(dev, lambda: gen.generate(prompts, max_new_tokens=1, batch_size=bs))  # noqa: B023
        finally:
            hf._step_tokens = real
        tn, res = timed(dev, lambda: gen.generate(prompts, max_new_tokens=new, batch_size=bs))  # noqa: B023
        prompt_tokens = sum(g.prompt_tokens for g in res)
        batches = hf.length_batches([g.prompt_tokens for g in res], bs, new * hf._step_tokens(dev))
        decode = len(prompts) * (new - 1)
        out["runs"].append({
            "batch_size": bs, "batches": len(batches), "prompt_tokens": prompt_tokens, "new_tokens": len(prompts) * new,
            "rows_answered": len(res),
            "prefill_s": t1, "total_s": tn, "prefill_tok_s": prompt_tokens / t1,
            "decode_tok_s": decode / max(tn - t1, 1e-9), "new_tok_s": len(prompts) * new / tn,
            "decode_step_s": max(tn - t1, 0.0) / (len(batches) * (new - 1)), **peak(dev)})
    return out


def scorer(kind: str, hf, tok, model, dev, work, budget: Budget, rng: random.Random) -> dict:
    vocab = model.config.vocab_size
    queries = texts(rng, work["score_rows"], work["query_len"], vocab)
    answers = texts(rng, work["score_rows"], work["answer_len"], vocab)
    with loaded(hf, tok, model):
        if kind == "loglik":
            sc = hf.HFLoglikScorer("random", max_length=work["max_length"])
            fn = sc.mean_logp
            lengths = [min(work["max_length"], len(tok(hf.render_chat(tok, q), add_special_tokens=False)["input_ids"])
                           + len(a.split())) for q, a in zip(queries, answers, strict=True)]
        else:
            sc = hf.HFClassifierScorer("random", max_length=work["max_length"])
            fn = sc.score
            lengths = [len(tok(hf.render_chat(tok, q, a), truncation=True, max_length=work["max_length"])["input_ids"])
                       for q, a in zip(queries, answers, strict=True)]
    fn(queries[:2], answers[:2])  # warm-up
    out = {"rows": len(queries), "tokens": sum(lengths), "max_length": work["max_length"], "runs": []}
    for bs in work["score_batches"]:
        if budget.spent(5):
            out["runs"].append({"batch_size": bs, "skipped": "out of budget"})
            continue
        reset_peak(dev)
        t, scores = timed(dev, lambda bs=bs: fn(queries, answers, batch_size=bs))
        out["runs"].append({
            "batch_size": bs, "batches": len(hf.length_batches(lengths, bs, hf._step_tokens(dev))), "s": t,
            "tok_s": sum(lengths) / t, "rows_s": len(queries) / t,
            "finite": sum(1 for s in scores if s is not None and math.isfinite(s)), **peak(dev)})
    return out


def router(dev, work, budget: Budget, rng: random.Random) -> dict:
    """A router fit in-process, as cluster/train.py's loop runs it for a default config (unfrozen encoder)."""
    RouterModel, loss_fn, code = import_router()
    torch.manual_seed(0)
    enc_cfg = BertConfig(**ENCODERS[work["encoder"]])
    with torch.device(dev):
        model = RouterModel(BertModel(enc_cfg, add_pooling_layer=False), N_EXPERTS)
    n, length = work["router_rows"], work["router_len"]
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):  # padded to max_length, as train.py's tokenizer call does
        k = rng.randint(8, length)
        ids[i, :k] = torch.randint(5, enc_cfg.vocab_size, (k,))
        mask[i, :k] = 1
    target = torch.softmax(torch.randn(n, N_EXPERTS) * 2, -1)
    ids, mask, target = ids.to(dev), mask.to(dev), target.to(dev)

    def full_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(loss_fn(model(ids, mask, members=True), target, "kl"))

    lr = 1e-3  # the config's default 5e-5 moves a random encoder too little in a handful of steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-7)
    bs = work["router_batch"]
    steps = work["router_epochs"] * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * max(0.0, (steps - s) / steps))
    before = full_loss()
    reset_peak(dev)
    losses, done = [], 0
    sync(dev)
    t = time.perf_counter()
    for _ in range(work["router_epochs"]):
        if budget.spent(2):
            break
        model.train()
        for b in torch.randperm(n, device=dev).split(bs):
            loss = loss_fn(model(ids[b], mask[b], members=True), target[b], "kl")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            done += 1
    sync(dev)
    s = time.perf_counter() - t
    return {"router_code": code, "encoder": work["encoder"], "experts": N_EXPERTS, "rows": n, "max_length": length,
            "batch_size": bs, "lr": lr, "steps": done, "s": s, "steps_s": done / s, "queries_s": done * bs / s,
            "loss_before": before, "loss_after": full_loss(), "losses": losses, **peak(dev)}


# --- the run --------------------------------------------------------------------------------------------------------

def machine(dev: torch.device) -> dict:
    m = {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
         "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        m |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
              "cuda": torch.version.cuda}
    return m


def load() -> dict:
    """os.getloadavg() under the names docs/hooks/generate.py reads (the benchmark page shows a figure with it)."""
    return dict(zip(("load_1m", "load_5m", "load_15m"), (round(x, 2) for x in os.getloadavg()), strict=True))


def current_step_tokens(hf) -> float | None:
    """cluster/hf.py's GPU_STEP_TOKENS (read from the source where the module cannot be imported)."""
    if hf is not None:
        return hf.GPU_STEP_TOKENS
    import re

    m = re.search(r"^GPU_STEP_TOKENS\s*=\s*([0-9.]+)", (ROOT / "cluster/hf.py").read_text(), re.M)
    return float(m.group(1)) if m else None


def commit(arg: str | None) -> dict:
    out: dict = {"commit": arg or os.environ.get("GPU_CHECK_COMMIT")}
    if out["commit"] is None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           check=True).stdout.strip()
    # which code ran, also where the copy has no .git
    out["sources_sha256"] = {p: hashlib.sha256((ROOT / p).read_bytes()).hexdigest()[:16]
                             for p in ("cluster/hf.py", "cluster/backends.py", "benchmarks/gpu_check.py")
                             if (ROOT / p).exists()}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="cpu: the test's run (--shapes tiny)")
    ap.add_argument("--shapes", default="0.5b,7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--budget-s", type=float, default=420.0, help="total time; parts past it are skipped")
    ap.add_argument("--output", type=Path, default=None,
                    help="JSON file (default on cuda: benchmarks/results/gpu_check.json; on cpu: stdout only)")
    ap.add_argument("--commit", default=None, help="commit of the tree (default: $GPU_CHECK_COMMIT, else git)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-router", action="store_true")
    args = ap.parse_args(argv)
    shapes = [s.strip().lower() for s in args.shapes.split(",") if s.strip()]
    if bad := [s for s in shapes if s not in SHAPES]:
        ap.error(f"unknown shapes {bad}; choose from {list(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    output = args.output or (ROOT / "benchmarks/results/gpu_check.json" if args.device == "cuda" else None)
    budget, started = Budget(args.budget_s), time.monotonic()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    work = WORK[dev.type]
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hf, backend_code = import_hf()
    res = {"benchmark": "gpu_check", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           **commit(args.commit), "machine": machine(dev), "load": load(),
           "device": dev.type, "dtype": str(dtype).removeprefix("torch."), "budget_s": args.budget_s,
           "backend_code": backend_code, "gpu_step_tokens_current": current_step_tokens(hf),
           "shapes": {}, "skipped": [], "errors": []}

    def save() -> None:
        res["wall_s"] = round(time.monotonic() - started, 1)
        res["load_end"] = load()
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(res, indent=1) + "\n")

    def part(name: str, where: dict, fn, need: float = 10.0, uses_hf: bool = False, shape: str = "") -> None:
        label = f"{shape} {name}".strip()
        if uses_hf and hf is None:
            res["skipped"].append(f"{label}: {backend_code}")
            return
        if budget.spent(need):
            res["skipped"].append(f"{label}: out of budget ({max(budget.left(), 0):.0f} s left)")
            return
        t = time.monotonic()
        try:
            where[name] = fn() | {"wall_s": round(time.monotonic() - t, 2)}
        except Exception as e:  # noqa: BLE001 - one part's failure (a shape too big for the card) must not lose the rest
            where[name] = {"error": f"{type(e).__name__}: {e}"[:500],
                           "where": traceback.format_exc(limit=-3)[-1500:]}
            res["errors"].append(f"{label}: {type(e).__name__}")
            free(dev)
        save()

    rng = random.Random(0)
    if not args.no_router:
        part("router", res, lambda: router(dev, work, budget, rng))
    for shape in shapes:
        if budget.spent(30 if shape == "7b" else 10):
            res["skipped"].append(f"{shape}: out of budget ({max(budget.left(), 0):.0f} s left)")
            continue
        s = res["shapes"][shape] = {"config": SHAPES[shape]}
        tok = id_tokenizer(SHAPES[shape]["vocab_size"])
        held: dict = {}

        def causal_lm(shape=shape, held=held):
            reset_peak(dev)
            t, m = timed(dev, lambda: build(AutoModelForCausalLM, shape, dev, dtype))
            held["model"] = m
            return {"build_s": t, "params_b": sum(p.numel() for p in m.parameters()) / 1e9,
                    "weights_gib": sum(p.numel() * p.element_size() for p in m.parameters()) / 2**30, **peak(dev)}

        part("causal_lm", s, causal_lm, shape=shape)
        if (model := held.pop("model", None)) is not None:
            part("step_tokens", s, lambda: step_sweep(model, dev, work, budget), shape=shape)  # noqa: B023
            part("generation", s, lambda: generation(hf, tok, model, dev, work, budget, rng),  # noqa: B023
                 uses_hf=True, shape=shape)
            st, gen = s.get("step_tokens", {}), s.get("generation", {})
            for r in gen.get("runs", []):
                if "decode_step_s" in r and "per_token_s" in st:
                    r["decode_step_tokens"] = r["decode_step_s"] / st["per_token_s"]
            part("loglik_scorer", s, lambda: scorer("loglik", hf, tok, model, dev, work, budget, rng),  # noqa: B023
                 uses_hf=True, shape=shape)
            del model
            free(dev)

        def classifier(shape=shape, tok=tok):
            reset_peak(dev)
            t, rm = timed(dev, lambda: build(AutoModelForSequenceClassification, shape, dev, dtype, num_labels=1))
            try:
                return {"build_s": t} | scorer("classifier", hf, tok, rm, dev, work, budget, rng)
            finally:
                del rm
                free(dev)

        part("classifier_scorer", s, classifier, uses_hf=True, shape=shape)
    est = {k: v["step_tokens"]["step_tokens"] for k, v in res["shapes"].items() if "step_tokens" in v.get(
        "step_tokens", {})}
    res["step_tokens_measured"] = est
    save()
    if output is not None:
        print(f"gpu_check: {output}", file=sys.stderr)
    print(json.dumps(summary(res), indent=1))
    return res


def cli() -> int:
    """Exit status 1 when a part failed (its error is in the JSON), 0 otherwise."""
    return 1 if main()["errors"] else 0


def summary(res: dict) -> dict:
    """The headline numbers (the JSON file has every point)."""
    out: dict = {"device": res["machine"].get("gpu", res["device"]), "wall_s": res["wall_s"],
                 "gpu_step_tokens_current": res["gpu_step_tokens_current"],
                 "step_tokens_measured": res["step_tokens_measured"], "skipped": res["skipped"],
                 "errors": res["errors"]}
    for k, s in res["shapes"].items():
        row = {}
        for r in s.get("generation", {}).get("runs", []):
            if "decode_tok_s" in r:
                row[f"gen_b{r['batch_size']}"] = {x: round(r[x], 1) for x in ("prefill_tok_s", "decode_tok_s")}
        for name in ("loglik_scorer", "classifier_scorer"):
            for r in s.get(name, {}).get("runs", []):
                if "tok_s" in r:
                    row[f"{name}_b{r['batch_size']}_tok_s"] = round(r["tok_s"], 1)
        out[k] = row
    if "router" in res:
        r = res["router"]
        out["router"] = {x: r.get(x) for x in ("router_code", "steps_s", "loss_before", "loss_after", "error")}
    return out


if __name__ == "__main__":
    sys.exit(cli())
