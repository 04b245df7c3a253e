"""import_scores: bring-your-own per-(query, expert) scores into the store as the generate/score steps would.

Many users already have a score table (a benchmark run, a human rating pass). Importing it writes exactly the
artifacts that aggregate -> train_router -> evaluate read: query shards (with `split` and the task as a tag) and
one score cell per (expert, shard) under a reward model named after the import; then an import record
(`schemas.artifacts.import_path`) that says which experts and score source the training flow should use.

Formats:
- `routerdc`: RouterDC's score tables, a folder of `<task>_{train,test}.json` (or `<task>-train.json`) files,
  each a JSON list of `{"question": str, "scores": {model: float}}`. The score written is the routed model's
  *credit* under the dataset's metric (binary tasks: 1 if s > 0 else 0; others: s), so the mean reward of a
  routing is its accuracy.
- `long`: a CSV / Parquet / JSONL table with columns `query`, `expert`, `score` and optionally `query_id`,
  `tags` (a string or list of strings; `task` is accepted as a single tag) and `split` (train/test).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from schemas.artifacts import QUERIES, SCORES, fingerprint, import_path, queries_path, score_path
from schemas.config import NAME_RE, SCORE_LIMIT
from schemas.errors import InputError
from schemas.plan import Expert
from schemas.store import Store
from tasks.ingest import store_shards, text_id, write_shards

CODE_VERSION = 1
FORMATS = ("routerdc", "long")
# RouterDC's metric per task (its README): these tasks credit any positive score as a correct answer.
ROUTERDC_BINARY = {"mmlu", "cmmlu", "arc_challenge"}
_ROUTERDC_FILE = re.compile(r"^(?P<task>.+?)[_-](?P<split>train|test)\.json$")


class ImportRecord(BaseModel):
    """`imports/<name>.json`: what one `zooter import-scores` wrote (a `zooter train` config's `source`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="The import's name; also its reward model's name in score paths.")
    rm_fingerprint: str = Field(description="The imported scores' fingerprint (a hash of the scores).")
    experts: list[Expert] = Field(description="The imported experts (name, fingerprint), in column order.")
    shards: list[int] = Field(description="The query shards the scores cover.")
    rows: int = Field(description="Scores imported.")
    queries: int = Field(description="Queries imported.")

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def read_routerdc(folder: str | Path) -> pl.DataFrame:
    """The folder's tables as one long frame: query_id, text, tags, split, expert, score (credit)."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.json") if _ROUTERDC_FILE.fullmatch(p.name)) if folder.is_dir() else []
    if not files:
        raise InputError(f"{folder}: no RouterDC tables (<task>_train.json / <task>_test.json) found")
    parts = []
    for p in files:
        m = _ROUTERDC_FILE.fullmatch(p.name)
        task, split = m["task"], m["split"]
        binary = task in ROUTERDC_BINARY
        try:
            rows = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{p}: not a JSON file ({e})") from None
        if not isinstance(rows, list):
            raise InputError(f"{p}: expected a JSON list of {{question, scores}} objects")
        ids, texts, experts, scores = [], [], [], []
        for i, r in enumerate(rows):
            if not (isinstance(r, dict) and isinstance(r.get("question"), str) and r["question"].strip()
                    and isinstance(r.get("scores"), dict) and r["scores"]):
                raise InputError(f"{p}: item {i}: needs a non-empty 'question' string and a 'scores' object")
            for expert, s in r["scores"].items():
                if not isinstance(s, int | float) or isinstance(s, bool):
                    raise InputError(f"{p}: item {i}: score of {expert!r} is not a number")
                # binary tasks: a correct answer is any positive score; the others' score is the credit itself
                if not (abs(s) <= SCORE_LIMIT if binary else 0 <= s <= 1):  # NaN fails both
                    raise InputError(f"{p}: item {i}: score of {expert!r} is {s!r}, outside "
                                     + (f"[-{SCORE_LIMIT:g}, {SCORE_LIMIT:g}]" if binary else
                                        f"[0, 1] (a {task!r} score is the credit of the answer)"))
                ids.append(f"{task}/{split}/{i:05d}")  # by position: duplicate questions stay separate rows
                texts.append(r["question"])
                experts.append(expert)
                scores.append(float(s))
        credit = (pl.col("score") > 0).cast(pl.Float64) if binary else pl.col("score")
        parts.append(pl.DataFrame({"query_id": ids, "text": texts, "expert": experts, "score": scores})
                     .with_columns(credit.alias("score"), pl.lit(split).alias("split"),
                                   pl.lit([task], dtype=pl.List(pl.String)).alias("tags")))
    long = pl.concat(parts)
    if long.height == 0:
        raise InputError(f"{folder}: the RouterDC tables hold no scores, nothing to import")
    return long


def read_long(path: str | Path) -> pl.DataFrame:
    """A long score table (CSV / Parquet / JSONL) -> the same long frame as `read_routerdc`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: score table not found")
    readers = {".csv": lambda p: pl.read_csv(p, infer_schema=False),  # text as written: ids like 007 stay
               ".parquet": pl.read_parquet, ".jsonl": pl.read_ndjson}
    if path.suffix not in readers:
        raise InputError(f"{path}: unsupported score table type {path.suffix!r} (use .csv, .parquet or .jsonl)")
    try:
        df = readers[path.suffix](path)
    except Exception as e:  # noqa: BLE001 - polars raises many types; the message is what matters
        raise InputError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    missing = [c for c in ("query", "expert", "score") if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; need query, expert, score "
                         "(optional: query_id, tags or task, split)")
    if df.height == 0:
        raise InputError(f"{path}: no rows, nothing to import (need one row per scored (query, expert))")
    if "query_id" in df.columns and not (df.schema["query_id"] == pl.String or df.schema["query_id"].is_integer()):
        raise InputError(f"{path}: column 'query_id' is {df.schema['query_id']}; ids must be strings or integers")
    row = lambda i: i + (2 if path.suffix == ".csv" else 1)  # noqa: E731 - csv line 1 is the header
    bad = df.with_row_index().filter(pl.col("query").is_null() | (pl.col("query").cast(pl.String).str.strip_chars()
                                                                  == "") | pl.col("expert").is_null())
    if bad.height:
        raise InputError(f"{path}:{row(bad['index'][0])}: empty query or expert")
    try:
        df = df.with_columns(pl.col("score").cast(pl.Float64, strict=True))
    except Exception:  # noqa: BLE001
        raise InputError(f"{path}: column 'score' must be numeric") from None
    big = df.with_row_index().filter(pl.col("score").is_finite() & (pl.col("score").abs() > SCORE_LIMIT))
    if big.height:  # NaN/inf are kept as flagged nulls; a huge finite score would overflow the combined reward
        raise InputError(f"{path}:{row(big['index'][0])}: score {big['score'][0]!r} of expert "
                         f"{big['expert'][0]!r} is outside [-{SCORE_LIMIT:g}, {SCORE_LIMIT:g}]")
    if "tags" in df.columns:
        tags = pl.col("tags") if df.schema["tags"] == pl.List(pl.String) else pl.concat_list(
            pl.col("tags").cast(pl.String))
    elif "task" in df.columns:
        tags = pl.concat_list(pl.col("task").cast(pl.String))
    else:
        tags = pl.lit([], dtype=pl.List(pl.String))
    split = pl.col("split").cast(pl.String) if "split" in df.columns else pl.lit(None, pl.String)
    if "split" in df.columns:
        odd = df.with_row_index().filter(pl.col("split").is_not_null() & ~pl.col("split").is_in(["train", "test"]))
        if odd.height:
            raise InputError(f"{path}:{row(odd['index'][0])}: split must be 'train' or 'test', "
                             f"got {odd['split'][0]!r}")
    qid = (pl.col("query_id").cast(pl.String) if "query_id" in df.columns
           else pl.col("query").map_elements(text_id, return_dtype=pl.String))
    out = df.select(qid.alias("query_id"), pl.col("query").cast(pl.String).alias("text"),
                    pl.col("expert").cast(pl.String), "score", split.alias("split"),
                    tags.list.drop_nulls().alias("tags"))
    dup = out.group_by("query_id", "expert").len().filter(pl.col("len") > 1)
    if dup.height:
        raise InputError(f"{path}: query {dup['query_id'][0]!r} has {dup['len'][0]} scores for expert "
                         f"{dup['expert'][0]!r}; expected one per (query, expert)")
    return out


def read_scores(fmt: str, source: str | Path) -> pl.DataFrame:
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    return read_routerdc(source) if fmt == "routerdc" else read_long(source)


def check_import_name(name: str) -> None:
    """The import's name is a store path component (the reward model's name in score paths)."""
    if not NAME_RE.fullmatch(name):
        raise InputError(f"--name {name[:80]!r}{'...' if len(name) > 80 else ''}: use letters, digits, '.', '_' "
                         f"and '-' only, at most 64 characters, starting with a letter or digit ({NAME_RE.pattern})")


def import_scores(store: Store, long: pl.DataFrame, name: str = "imported", shard_size: int = 1000) -> ImportRecord:
    """Write queries (new ones as new shards), one score cell per (expert, shard) and the import record.

    Cells are content-addressed: the reward model's fingerprint is a hash of the scores themselves, so importing
    the same table again writes nothing, and a changed table gets new cells instead of overwriting old ones."""
    check_import_name(name)
    for e in long["expert"].unique().sort().to_list():  # expert names become store paths: check before writing
        if not all(NAME_RE.fullmatch(part) for part in e.split("/")):  # "org/model" (HF ids) is fine, "../x" is not
            raise InputError(f"expert {e!r}: each '/'-separated part must match {NAME_RE.pattern} "
                             "(expert names become store paths)")
    queries = long.unique("query_id", keep="first", maintain_order=True)
    clash = long.join(queries.select("query_id", pl.col("text").alias("_t")), on="query_id").filter(
        pl.col("text") != pl.col("_t"))
    if clash.height:
        raise InputError(f"query id {clash['query_id'][0]!r} appears with two different texts")
    q = queries.select("query_id", "text", pl.col("tags").alias("input_tags"), "split").with_row_index(
        "source_line", offset=1).with_columns(pl.col("source_line").cast(pl.Int64), pl.lit(None, pl.String)
                                              .alias("reference"))
    write_shards(store, q, shard_size)
    shards = sorted(store_shards(store))
    experts = sorted(long["expert"].unique().to_list())
    rm_fp = fingerprint({"import": name, "code": CODE_VERSION,
                         "scores": long.sort("query_id", "expert").hash_rows(seed=0).to_list()})
    efps = [(e, fingerprint({"imported_expert": e})) for e in experts]
    for s in shards:
        ids = pl.from_arrow(store.read_table(queries_path(s), QUERIES).select(["query_id"]))
        here = long.join(ids, on="query_id")
        for e, efp in efps:
            rel = score_path(name, rm_fp, e, efp, s)
            if store.valid_cell(rel, SCORES, rm_fp):
                continue
            cell = ids.join(here.filter(pl.col("expert") == e).select("query_id", "score"), on="query_id",
                            how="left", maintain_order="left")
            bad = pl.col("score").is_not_null() & ~pl.col("score").is_finite()  # NaN/inf: kept, null, flagged
            cell = cell.select("query_id", pl.when(bad).then(None).otherwise(pl.col("score")).alias("score"),
                               pl.when(bad).then(pl.lit("nonfinite")).alias("flag"))
            store.write_table(rel, cell.to_arrow(), SCORES,
                              {"stage": "scores", "fingerprint": rm_fp, "rm": name, "expert": e,
                               "expert_fingerprint": efp, "shard": s, "imported": True})
    rec = ImportRecord(name=name, rm_fingerprint=rm_fp, experts=efps, shards=shards, rows=long.height,
                       queries=queries.height)
    store.write_json(import_path(name), rec.to_json())
    return rec


def read_import(store: Store, name: str) -> ImportRecord:
    rel = import_path(name)
    if not store.exists(rel):
        raise InputError(f"{store.uri(rel)}: no import named {name!r}; run `zooter import-scores` first")
    return store.read_model(rel, ImportRecord, "corrupted import record ({why}); run `zooter import-scores` again")
