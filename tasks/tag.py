"""tag: give every query a set of tags T(q), one cell per shard.

The paper tags with an open-vocabulary LLM tagger (InsTag). A tagger here is anything with a `fingerprint`
and a `tag(queries) -> list[list[str]]`, and optionally a `prepare(store, shards, leases)` that `run_tag` calls
first (fit, run a model; the fingerprint is final after it):
- `column` copies the tags that came with the input, `none` gives none (then s* = s);
- `cluster`: k-means over the router encoder's pooled features (the embed step's cells, reused) of the training
  queries; a query's tag is its nearest centroid (`c07`), so test queries never shape the clusters;
- `llm`: one expert of the pool proposes open tags per query as JSON (prompt in tasks/prompts/); tags are
  normalised and merged, tags on fewer than `min_count` training queries dropped; unreadable answers are counted
  (`parse_failure` in the cells' metadata and the stage result) and tag nothing.
"""

from __future__ import annotations

import json
import re
import time
from functools import partial
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from cluster import models
from cluster.backends import generator_builder
from cluster.stage import Stage, StageResult, run_stage
from schemas.artifacts import QUERIES, TAGS, fingerprint, queries_path, tags_path
from schemas.config import ExpertSpec, FlowConfig, RouterConfig, TaggerConfig, TrainConfig
from schemas.errors import ConfigError
from schemas.leases import Leases
from schemas.plan import PlannedExpert, RunPlan
from schemas.store import Store
from tasks.aggregate import hash_split
from tasks.embed import embed_fingerprint, run_embed, scan_embeddings
from tasks.generate import planned, template_text

CODE_VERSION = 1


class Tagger(Protocol):
    fingerprint: str

    def tag(self, queries: pl.DataFrame) -> list[list[str]]: ...


class ColumnTagger:
    def __init__(self) -> None:
        self.fingerprint = "column-" + fingerprint({"tagger": "column", "v": 1}, 8)

    def tag(self, queries: pl.DataFrame) -> list[list[str]]:
        return queries["input_tags"].to_list()


class NoTagger:
    def __init__(self) -> None:
        self.fingerprint = "none-" + fingerprint({"tagger": "none", "v": 1}, 8)

    def tag(self, queries: pl.DataFrame) -> list[list[str]]:
        return [[] for _ in range(queries.height)]


def splits(store: Store, shards: list[int], test_fraction: float) -> pl.DataFrame:
    """(query_id, split) of the shards' queries: the input's split, else by a hash of the id (as aggregate does)."""
    q = store.scan([queries_path(s) for s in shards]).select("query_id", "split").collect()
    return q.with_columns(pl.col("split").fill_null(pl.Series(hash_split(q["query_id"].to_list(), test_fraction))))


def train_set_fingerprint(split: pl.DataFrame) -> str:
    """Names the training queries a tagger was fitted on (new shards or another split: other tags)."""
    return fingerprint(sorted(split.filter(pl.col("split") == "train")["query_id"].to_list()))


# --- cluster ---------------------------------------------------------------------------------------------------

def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centroid (squared Euclidean)."""
    d = (x * x).sum(1)[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None]
    return d.argmin(1)


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 100, restarts: int = 4) -> np.ndarray:
    """(k, d) centroids: Lloyd's iterations from k-means++ seeds, the best of `restarts` by inertia. Float64 and
    a seeded generator: the same rows and seed give the same centroids."""
    x = np.asarray(x, dtype=np.float64)
    k = min(k, len(x))
    rng = np.random.default_rng(seed)
    best, best_inertia = x[:k], np.inf
    for _ in range(restarts):
        seeds = [x[rng.integers(len(x))]]
        d = ((x - seeds[0]) ** 2).sum(1)
        for _ in range(1, k):  # k-means++: each next seed drawn in proportion to its squared distance
            seeds.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else seeds[-1])
            d = np.minimum(d, ((x - seeds[-1]) ** 2).sum(1))
        c = np.stack(seeds)
        for _ in range(iters):
            a = nearest(x, c)
            onehot = np.zeros((len(x), k))
            onehot[np.arange(len(x)), a] = 1.0
            counts = onehot.sum(0)
            new = np.where(counts[:, None] > 0, (onehot.T @ x) / np.maximum(counts, 1)[:, None], c)  # empty: keep
            if np.array_equal(new, c):
                break
            c = new
        inertia = ((x - c[nearest(x, c)]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    return best


def cluster_name(j: int, k: int) -> str:
    return f"c{j:0{max(2, len(str(k - 1)))}d}"


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1: clusters by direction (cosine), as sentence encoders are compared."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ClusterTagger:
    """k-means over the router encoder's features of the training queries; every query's tag is its nearest
    centroid. The fingerprint covers the encoder (the embed fingerprint), k, the seed and the training query set."""

    def __init__(self, cfg: TaggerConfig, router: RouterConfig, test_fraction: float,
                 encoder_identity: str | None = None):
        self.cfg, self.router, self.test_fraction = cfg, router, test_fraction
        self.encoder_identity = encoder_identity or models.identity(router.encoder)  # the plan's, in a run
        self.fingerprint = ""  # known once `prepare` has read which queries are training queries
        self.centroids: np.ndarray | None = None
        self._x: np.ndarray | None = None
        self._row: dict[str, int] = {}

    def prepare(self, store: Store, shards: list[int], leases: Leases | None = None) -> None:
        split = splits(store, shards, self.test_fraction)
        self.fingerprint = self.fit_fingerprint(split)
        if all(store.valid_cell(tags_path(self.fingerprint, s), TAGS, self.fingerprint) for s in shards):
            return  # nothing to tag: no embedding, no fit
        embed_fp = run_embed(store, self.router, shards, leases,  # the router's cells, computed once
                             self.encoder_identity).fingerprint
        e = scan_embeddings(store, embed_fp, shards).collect().join(split, on="query_id")
        self._x = unit_rows(np.array(e["vector"].to_list(), dtype=np.float32))
        self._row = {q: i for i, q in enumerate(e["query_id"].to_list())}
        train = (e["split"] == "train").to_numpy()
        if not train.any():
            raise ConfigError("tagger.kind cluster: no training queries to fit the clusters on")
        self.centroids = kmeans(self._x[train], self.cfg.k, self.cfg.seed)

    def fit_fingerprint(self, split: pl.DataFrame) -> str:
        """The tags' fingerprint for these queries (`splits`): encoder features, k, seed, training query set."""
        return "cluster-" + fingerprint({
            "tagger": "cluster", "embed": embed_fingerprint(self.router, self.encoder_identity), "k": self.cfg.k,
            "seed": self.cfg.seed,
            "train": train_set_fingerprint(split), "code": CODE_VERSION}, 8)

    def tag(self, queries: pl.DataFrame) -> list[list[str]]:
        if self.centroids is None or self._x is None:
            raise RuntimeError("ClusterTagger.tag before prepare (run_tag calls it)")
        a = nearest(self._x[[self._row[q] for q in queries["query_id"].to_list()]], self.centroids)
        return [[cluster_name(int(j), self.cfg.k)] for j in a]


# --- llm (InsTag-style) ----------------------------------------------------------------------------------------

PREFILL = '["'  # the tagger's answer starts as a JSON list of strings: tiny models then rarely wander off
_NON_WORD = re.compile(r"[\W_]+")
_LIST = re.compile(r"\[.*?\]", re.S)
MAX_TAG_CHARS, MAX_TAG_WORDS = 40, 4  # longer is a sentence, not a tag


def normalise_tag(tag: str) -> str:
    """Lowercase; punctuation, underscores and whitespace runs become one space; stripped. "Math-Problem!" and
    " math problem" are one tag."""
    return _NON_WORD.sub(" ", tag.lower()).strip()


def parse_tags(text: str, max_tags: int) -> list[str] | None:
    """The tags in a tagger's answer, normalised, deduplicated in order, at most `max_tags`; None (a parse
    failure) when no JSON list with a usable tag (1 to 4 words, at most 40 characters) can be read. Accepted:
    ["a", "b"], [{"tag": "a", ...}], {"tags": [...]}, also cut off before its closing bracket (the stop string)."""
    s = text.strip()
    found: Any = None
    for cand in (s, s + "]", s + '"]', *_LIST.findall(s)):
        try:
            found = json.loads(cand)
        except ValueError:
            continue
        if isinstance(found, dict):
            found = found.get("tags")
        if isinstance(found, list):
            break
        found = None
    if found is None:
        return None
    out: list[str] = []
    for item in found:
        raw = item.get("tag") if isinstance(item, dict) else item
        t = normalise_tag(raw) if isinstance(raw, str) else ""
        if t and len(t) <= MAX_TAG_CHARS and len(t.split()) <= MAX_TAG_WORDS and t not in out:
            out.append(t)
    return out[:max_tags] or None


def tag_prompt(template: str, query: str, max_tags: int) -> str:
    return template.replace("{max_tags}", str(max_tags)).replace("{query}", query)


def llm_tag_cell(model: Any, shard: int, *, spec: ExpertSpec, cfg: TaggerConfig, template: str, fp: str,
                 store: Store) -> dict:
    """The expert's raw tags of one shard (parsed, normalised, nothing dropped yet); runs in the expert's actor."""
    t0 = time.perf_counter()
    q = store.read_table(queries_path(shard), QUERIES)
    prompts = [model.render(tag_prompt(template, t, cfg.max_tags)) + PREFILL for t in q["text"].to_pylist()]
    gens = model.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0, seed=0,
                          stop=["]"], batch_size=spec.resources.batch_size)
    parsed = [parse_tags(PREFILL + g.response, cfg.max_tags) for g in gens]
    failures = sum(p is None for p in parsed)
    table = pa.table({"query_id": q["query_id"], "tags": pa.array([p or [] for p in parsed], pa.list_(pa.string()))})
    flags = {"parse_failure": failures}
    store.write_table(tags_path(fp, shard), table, TAGS, {"stage": "tags", "fingerprint": fp, "shard": shard,
                                                          "tagger": "llm", "expert": spec.name, "flags": flags})
    return {"rows": table.num_rows, "new_tokens": sum(g.new_tokens for g in gens),
            "seconds": time.perf_counter() - t0, "flags": flags}


def frequent_tags(tags: pl.DataFrame, min_count: int) -> set[str]:
    """Tags carried by at least `min_count` training queries (`tags`: query_id, split, tags)."""
    per = tags.filter(pl.col("split") == "train").explode("tags").drop_nulls("tags").unique(["query_id", "tags"])
    return set(per.group_by("tags").len().filter(pl.col("len") >= min_count)["tags"].to_list())


class LLMTagger:
    """Open tags from one expert (raw cells, computed once per expert and prompt), merged by normalisation, rare
    ones dropped; the fingerprint covers the raw cells, `min_count` and the training query set."""

    def __init__(self, cfg: TaggerConfig, expert: PlannedExpert | ExpertSpec, test_fraction: float):
        self.planned = planned(expert)
        self.cfg, self.expert, self.test_fraction = cfg, self.planned.spec, test_fraction
        self.template = template_text(cfg.prompt)
        self.raw_fp = "llmraw-" + fingerprint({
            "tagger": "llm", "expert": self.planned.fingerprint, "template": self.template,
            "max_tags": cfg.max_tags, "max_new_tokens": cfg.max_new_tokens, "prefill": PREFILL,
            "code": CODE_VERSION}, 8)
        self.fingerprint = ""  # known once `prepare` has the raw tags of the training queries
        self.flags: dict[str, int] = {}
        self._raw: dict[str, list[str]] = {}
        self._keep: set[str] = set()
        self._failures: dict[int, int] = {}

    def prepare(self, store: Store, shards: list[int], leases: Leases | None = None) -> StageResult:
        if self.cfg.prompt == "chat":
            raise ConfigError("tagger.prompt: `chat` is not a tag prompt (use a template with {query})")
        res = run_stage(store, Stage(
            step="tag", name=f"llm-{self.expert.name}", fingerprint=self.raw_fp, schema=TAGS, keys=shards,
            path=partial(tags_path, self.raw_fp),
            job=partial(llm_tag_cell, spec=self.expert, cfg=self.cfg, template=self.template, fp=self.raw_fp,
                        store=store),
            build=generator_builder(self.planned), resources=self.expert.resources,
            tensor_parallel=self.expert.tensor_parallel_size, unit="shard"), leases)
        split = splits(store, shards, self.test_fraction)
        raw = store.scan([tags_path(self.raw_fp, s) for s in shards]).collect().join(split, on="query_id")
        self._raw = dict(zip(raw["query_id"].to_list(), raw["tags"].to_list(), strict=True))
        self._keep = frequent_tags(raw, self.cfg.min_count)
        self._failures = {s: store.read_meta(tags_path(self.raw_fp, s)).get("flags", {}).get("parse_failure", 0)
                          for s in shards}
        self.flags = {"parse_failure": sum(self._failures.values())}
        self.fingerprint = "llm-" + fingerprint({"raw": self.raw_fp, "min_count": self.cfg.min_count,
                                                 "train": train_set_fingerprint(split)}, 8)
        return res

    def tag(self, queries: pl.DataFrame) -> list[list[str]]:
        return [[t for t in self._raw[q] if t in self._keep] for q in queries["query_id"].to_list()]

    def cell_meta(self, shard: int) -> dict:
        """What a final tag cell adds to its metadata: where its tags came from and the shard's parse failures."""
        return {"tagger": "llm", "expert": self.expert.name, "source": self.raw_fp, "min_count": self.cfg.min_count,
                "vocabulary": len(self._keep), "flags": {"parse_failure": self._failures.get(shard, 0)}}


# --- registry and stage ----------------------------------------------------------------------------------------

TAGGERS: dict[str, type] = {"column": ColumnTagger, "none": NoTagger, "cluster": ClusterTagger, "llm": LLMTagger}


def make_tagger(cfg: TaggerConfig, flow: RunPlan | FlowConfig | TrainConfig | None = None) -> Tagger:
    """The configured tagger. `cluster` and `llm` need the whole run (`flow`): the router's encoder, the expert
    pool and the test fraction; a run passes its plan (identities and fingerprints resolved once), a bare config
    is resolved here."""
    if cfg.kind in ("column", "none"):
        return TAGGERS[cfg.kind]()
    if flow is None:
        raise ConfigError(f"tagger.kind {cfg.kind}: needs the flow's config (router, experts, test fraction)")
    plan = flow if isinstance(flow, RunPlan) else None
    conf = plan.config if plan else flow
    test_fraction = conf.test_fraction
    if cfg.kind == "cluster":
        return ClusterTagger(cfg, conf.router, test_fraction, plan.encoder_identity if plan else None)
    check_tagger(cfg, conf)
    experts = ({e.name: e for e in plan.experts} if plan and plan.experts
               else {e.name: e for e in getattr(conf, "experts", [])})
    return LLMTagger(cfg, experts[cfg.expert], test_fraction)


def check_tagger(cfg: TaggerConfig, flow: FlowConfig | TrainConfig) -> None:
    """What preflight checks of the tagger without building it: an llm tagger's expert is one of the pool."""
    experts = sorted(e.name for e in getattr(flow, "experts", []))
    if cfg.kind == "llm" and cfg.expert not in experts:
        raise ConfigError(f"tagger.expert: {cfg.expert!r} is not an expert of this config (experts: "
                          f"{experts or 'none: a `zooter train` config has no experts'})")


def tag_cell(model: None, shard: int, *, tagger: Tagger, store: Store) -> dict:
    """Tag one shard's queries and write its cell (the stage's job; taggers run in-process, without a model)."""
    t0 = time.perf_counter()
    q = pl.from_arrow(store.read_table(queries_path(shard), QUERIES))
    table = pa.table({"query_id": q["query_id"].to_arrow(), "tags": pa.array(tagger.tag(q), pa.list_(pa.string()))})
    extra = tagger.cell_meta(shard) if hasattr(tagger, "cell_meta") else {}
    store.write_table(tags_path(tagger.fingerprint, shard), table, TAGS,
                      {"stage": "tags", "fingerprint": tagger.fingerprint, "shard": shard, **extra})
    return {"rows": table.num_rows, "seconds": time.perf_counter() - t0}


def run_tag(store: Store, tagger: Tagger, shards: list[int], leases: Leases | None = None) -> StageResult:
    """Prepare the tagger (fit, run its model) and write the missing tag cells; `parse_failure` counts of an llm
    tagger (over all its raw cells) are in the result's flags."""
    if hasattr(tagger, "prepare"):
        tagger.prepare(store, shards, leases)
    res = run_stage(store, Stage(
        step="tag", name=type(tagger).__name__, fingerprint=tagger.fingerprint, schema=TAGS, keys=shards,
        path=partial(tags_path, tagger.fingerprint), job=partial(tag_cell, tagger=tagger, store=store),
        unit="shard"), leases)
    res.flags.update(getattr(tagger, "flags", {}))
    return res
