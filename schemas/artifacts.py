"""The pyarrow schema of every artifact, where each lives in the store, and fingerprints.

A cell is one Parquet file per (stage, fingerprint, shard). Its path is deterministic, so "the cell exists and
validates" means "this work is done": resume and relabel compute only missing cells.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import pyarrow as pa

SCHEMA_VERSION = "2"  # 2: scores carry a per-row `flag`

QUERIES = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("input_tags", pa.list_(pa.string()), nullable=False),
    pa.field("reference", pa.string()),
    pa.field("split", pa.string()),  # "train" | "test" if the input fixes it; null = by a hash of query_id
    pa.field("source_line", pa.int64(), nullable=False),  # 1-based line/row of the input file
])

TAGS = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("tags", pa.list_(pa.string()), nullable=False),
])

GENERATIONS = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("new_tokens", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),  # "stop" | "length"
])

SCORES = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("score", pa.float64()),  # null: no score for this row (e.g. no reference answer)
    pa.field("flag", pa.string()),  # null, or why the row is suspect: "empty_response" | "nonfinite" | "error"
])
# A row that failed alone (docs/failures.md#row-failures): its finish_reason in a generation cell (response "") and
# its flag in a score cell (score null); the cell's metadata has `failed` and `errors`, and the next run redoes it.
ROW_FAILED = "error"

LABELS = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("tags", pa.list_(pa.string()), nullable=False),
    pa.field("rewards", pa.list_(pa.float64()), nullable=False),  # combined reward per expert (expert order)
    pa.field("soft", pa.list_(pa.float64()), nullable=False),  # s(q) = softmax(rewards / T)
    pa.field("target", pa.list_(pa.float64()), nullable=False),  # s*(q), tag-enhanced
])

# The test queries' scores beside the labels (aggregate reads them anyway): evaluate's per-RM columns from one
# read instead of a second pass over every score cell.
HELD_OUT_SCORES = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("expert", pa.string(), nullable=False),
    pa.field("rm", pa.string(), nullable=False),
    pa.field("score", pa.float64()),  # as in the score cell (null: no score)
])

EMBEDDINGS = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("vector", pa.list_(pa.float32()), nullable=False),  # pooled encoder output of prefix + text
])

SCHEMAS: dict[str, pa.Schema] = {
    "queries": QUERIES, "tags": TAGS, "generations": GENERATIONS, "scores": SCORES, "labels": LABELS,
    "embeddings": EMBEDDINGS, "held_out_scores": HELD_OUT_SCORES,
}


def fingerprint(obj: Any, n: int = 12) -> str:
    """Hash of a JSON-able object (canonical: sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_index(name: str) -> int:
    return int(name.removeprefix("shard-").removesuffix(".parquet"))


# Deterministic store-relative paths of every artifact.
def queries_path(shard: int) -> str:
    return f"queries/{shard_name(shard)}"


def tags_path(tagger_fp: str, shard: int) -> str:
    return f"tags/{tagger_fp}/{shard_name(shard)}"


def generation_path(expert: str, fp: str, shard: int) -> str:
    return f"generations/{expert}-{fp}/{shard_name(shard)}"


def score_path(rm: str, rm_fp: str, expert: str, expert_fp: str, shard: int) -> str:
    return f"scores/{rm}-{rm_fp}/{expert}-{expert_fp}/{shard_name(shard)}"


def embeddings_dir(embed_fp: str) -> str:
    return f"embeddings/{embed_fp}"


def embeddings_path(embed_fp: str, shard: int) -> str:
    return f"{embeddings_dir(embed_fp)}/{shard_name(shard)}"


def labels_path(labels_fp: str) -> str:
    return f"labels/{labels_fp}/labels.parquet"


def held_out_scores_path(labels_fp: str, scores_key: str) -> str:
    """The labels' test scores; `scores_key` names the score cells they come from (tasks/aggregate.py)."""
    return f"labels/{labels_fp}/test_scores-{scores_key}.parquet"


ROUTERS_DIR = "routers"
# A router directory's files, the same names locally (cluster/router.py saves and loads them) and in the store.
ROUTER_JSON = "router.json"  # written last: a router exists exactly when its router.json does
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_ENCODER = "encoder"  # encoder config + tokenizer (a folder)


def router_dir(router_fp: str) -> str:
    return f"{ROUTERS_DIR}/{router_fp}"


def router_file(router_fp: str, name: str) -> str:
    """A file inside the router directory, e.g. `router_file(fp, ROUTER_JSON)`."""
    return f"{router_dir(router_fp)}/{name}"


def router_train_dir(router_fp: str) -> str:
    """Where Ray Train keeps the router's training run and checkpoints."""
    return router_file(router_fp, "ray_train")


EVALUATIONS_DIR = "evaluations"


def evaluation_dir(eval_fp: str) -> str:
    return f"{EVALUATIONS_DIR}/{eval_fp}"


def report_path(eval_fp: str, ext: Literal["json", "md", "png"] = "json") -> str:
    """The evaluation report: report.json (the typed report), report.md and report.png (rendered from it)."""
    return f"{evaluation_dir(eval_fp)}/report.{ext}"


def curve_path(eval_fp: str) -> str:
    """The quality-cost curve's chart (only when the experts have costs)."""
    return f"{evaluation_dir(eval_fp)}/curve.png"


RUNS_DIR = "runs"


def run_manifest_path(run_id: str) -> str:
    return f"{RUNS_DIR}/{run_id}/manifest.json"


def run_plan_path(run_id: str) -> str:
    return f"{RUNS_DIR}/{run_id}/plan.json"


def import_path(name: str) -> str:
    """The record of a score import (`zooter import-scores --name`)."""
    return f"imports/{name}.json"


CHAMPION_PATH = "champion.json"
