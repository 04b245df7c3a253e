"""export: the labeled data as one tidy table, for people and other tools (pandas, DuckDB, Hugging Face datasets).

One row per labeled query: `query_id`, `text`, `tags`, `split`, then for each expert in the labels' expert order
(the router's output order): `response:<expert>` (left out for imported scores: nothing was generated),
`score:<rm>:<expert>` for each reward model, `soft:<expert>` (s(q)), `target:<expert>` (s*(q), what the router
learns) and `reward:<expert>` (the combined reward). Built with Polars from the store's cells: the labels, and
the generation and score cells of the run that made them (its manifest names the shards and fingerprints).

Formats: `parquet` (one file), `jsonl` (one JSON object per line) and `hf`: a folder laid out like a Hugging Face
dataset repository, `data/<split>-00000-of-00001.parquet` per split plus a README.md whose YAML header declares
the splits, so `datasets.load_dataset(folder)` gives a DatasetDict (train, test) and `load_dataset("parquet",
data_files=...)` reads the files; writing it needs no `datasets` package. The output is checked before the table
is built, as `route` checks its own (tasks/outputs.py: an existing file or export needs `overwrite`, an unknown
suffix is refused, not inside the store, writable), and written beside its target under a temporary name, renamed
into place when complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import polars as pl
import pyarrow as pa

from schemas.artifacts import (
    GENERATIONS,
    LABELS,
    SCORES,
    generation_path,
    labels_path,
    run_manifest_path,
    score_path,
)
from schemas.errors import ArtifactError, InputError
from schemas.evaluation import read_champion
from schemas.manifest import RunManifest
from schemas.store import Store
from tasks.aggregate import ScoreSource, scan_scores
from tasks.inspect import read_manifest, runs
from tasks.outputs import check_output, local_root, output_kind, write_file, write_folder

Format = Literal["parquet", "jsonl", "hf"]
FORMATS: tuple[str, ...] = get_args(Format)
SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl"}
FINGERPRINT_RE = re.compile(r"[0-9a-f]{6,64}")


@dataclass(frozen=True)
class Exported:
    """What `export` wrote."""

    path: str
    format: str
    labels: str  # labels fingerprint
    run_id: str  # the run that made the labels
    experts: list[str]  # in column (router output) order
    rows: int
    columns: list[str]


def source_run(store: Store, labels_fp: str | None = None) -> RunManifest:
    """The run whose labels are exported: the one that made `labels_fp` (its latest completed run, else its
    latest run), by default the latest completed run with labels, else the champion's."""
    summaries = runs(store)  # oldest first
    if labels_fp is None:
        done = [r["labels"] for r in summaries if r["status"] == "completed" and r["labels"]]
        champion = None if done else read_champion(store)
        if not done and champion is None:
            raise ArtifactError(f"{store.url}: no labels to export (no completed run, no champion); run `zooter run` "
                                "or `zooter train` first")
        labels_fp = done[-1] if done else champion.labels
    elif not FINGERPRINT_RE.fullmatch(labels_fp):
        raise InputError(f"--labels {labels_fp!r}: not a labels fingerprint (hex, as `zooter inspect` shows)")
    made = [r for r in summaries if r["labels"] == labels_fp]
    if not made:
        raise ArtifactError(f"labels {labels_fp}: no run in {store.url} made them (no {run_manifest_path('*')} "
                            "names them)")
    return read_manifest(store, ([r for r in made if r["status"] == "completed"] or made)[-1]["run_id"])


def _require(store: Store, cells: list[str], schema: pa.Schema, fp: str) -> None:
    """Every cell is there and valid: a missing or foreign one is one clear error, before Polars reads any."""
    for rel in cells:
        why = store.check_cell(rel, schema, fp)
        if why is not None:
            raise ArtifactError(f"{store.uri(rel)}: {why}; rerun the flow that made these labels")


def labeled_table(store: Store, manifest: RunManifest) -> pl.DataFrame:
    """The tidy table of the run's labels (see the module docstring for its columns)."""
    rel = labels_path(manifest.labels)
    meta = store.read_meta(rel)
    experts = [(e, meta["expert_fingerprints"][e]) for e in meta["experts"]]
    sources = [ScoreSource(**s) for s in meta["scores"]]
    shards = manifest.shards
    for src in sources:
        for e, efp in experts:
            _require(store, [score_path(src.rm, src.rm_fp, e, efp, s) for s in shards], SCORES, src.rm_fp)
    generated = {g.name for g in manifest.generate}
    with_responses = all(e in generated for e, _ in experts)  # imported scores: nothing was generated
    df = pl.from_arrow(store.read_table(rel, LABELS)).lazy().with_columns(
        *[pl.col(k).list.get(i).alias(f"{prefix}:{e}") for i, (e, _) in enumerate(experts)
          for k, prefix in (("soft", "soft"), ("target", "target"), ("rewards", "reward"))])
    scores = (scan_scores(store, experts, sources, shards)
              .select("query_id", pl.format("score:{}:{}", "rm", "expert").alias("column"), "score").collect()
              .pivot(on="column", index="query_id", values="score"))
    df = df.join(scores.lazy(), on="query_id", how="left")
    if with_responses:
        for e, fp in experts:
            cells = [generation_path(e, fp, s) for s in shards]
            _require(store, cells, GENERATIONS, fp)
            df = df.join(store.scan(cells).select("query_id", pl.col("response").alias(f"response:{e}")),
                         on="query_id", how="left")
    per_expert = [c for e, _ in experts for c in (*([f"response:{e}"] if with_responses else []),
                                                   *[f"score:{s.rm}:{e}" for s in sources],
                                                   f"soft:{e}", f"target:{e}", f"reward:{e}")]
    return df.select("query_id", "text", "tags", "split", *per_expert).sort("query_id").collect()


def output_path(output: Path, fmt: Format | None, labels_fp: str) -> tuple[Format, Path]:
    """(format, target): `--format` defaults to the output's suffix (.parquet, .jsonl), else parquet; a parquet
    or jsonl output without a suffix (or an existing folder) is a folder that gets `labels-<fp>.<format>`; any
    other suffix is refused (`--output z.csv` is not a folder named z.csv)."""
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    by_suffix = SUFFIXES.get(output.suffix)
    if fmt == "hf":
        if by_suffix is not None:
            raise InputError(f"--output {output}: a {output.suffix} file, but --format hf (a folder)")
        return fmt, output
    kind = output_kind(output, tuple(SUFFIXES), folder=True)
    if fmt is None:
        fmt = by_suffix or "parquet"
    elif by_suffix is not None and by_suffix != fmt:
        raise InputError(f"--output {output}: a {output.suffix} file, but --format {fmt}")
    return fmt, output if kind == "file" else output / f"labels-{labels_fp}.{fmt}"


def _card(manifest: RunManifest, experts: list[str], splits: list[str]) -> str:
    """README.md of an `hf` export: the YAML header `datasets` reads the splits from, and what the columns are."""
    files = "".join(f"  - split: {s}\n    path: data/{s}-*.parquet\n" for s in splits)
    columns = ("`response:<expert>` (not for imported scores), `score:<reward model>:<expert>`, `soft:<expert>` "
               "(softmax of the rewards), `target:<expert>` (the tag-enhanced label the router learns) and "
               "`reward:<expert>` (the combined reward)")
    return (f"---\nconfigs:\n- config_name: default\n  data_files:\n{files}---\n\n"
            f"# Zooter labels {manifest.labels}\n\nExported from run {manifest.run_id} by `zooter export`. One row "
            f"per query: `query_id`, `text`, `tags`, `split`, then per expert, in router output order "
            f"({', '.join(experts)}): {columns}.\n")


def _write_hf(df: pl.DataFrame, folder: Path, card: str, splits: list[str]) -> None:
    (folder / "data").mkdir()
    for s in splits:
        df.filter(pl.col("split") == s).write_parquet(folder / "data" / f"{s}-00000-of-00001.parquet")
    (folder / "README.md").write_text(card, encoding="utf-8")


def _hf_export(folder: Path) -> bool:
    """Whether a folder holds an earlier `hf` export (what an export may replace: never a folder of something else)."""
    return {p.name for p in folder.iterdir()} == {"README.md", "data"}


def check_export(store: Store, target: Path, fmt: Format, overwrite: bool) -> None:
    """The output checks (tasks/outputs.py) of an export's target, before its table is built."""
    check_output(target, "folder" if fmt == "hf" else "file", overwrite=overwrite, store_root=local_root(store))
    if fmt == "hf" and target.is_dir() and any(target.iterdir()):
        if not _hf_export(target):
            raise InputError(f"--output {target}: exists and is not an earlier hf export; choose a new folder")
        if not overwrite:
            raise InputError(f"--output {target}: holds an earlier hf export; pass --overwrite to replace it")


def export(store: Store, output: Path, fmt: Format | None = None, labels_fp: str | None = None,
           overwrite: bool = False) -> Exported:
    """Write the labeled data of `labels_fp` (default: see `source_run`) to `output`; an existing output file (or
    hf export) is replaced only with `overwrite`."""
    manifest = source_run(store, labels_fp)
    fmt, target = output_path(Path(output), fmt, manifest.labels)
    check_export(store, target, fmt, overwrite)  # before the table is built
    df = labeled_table(store, manifest)
    experts = store.read_meta(labels_path(manifest.labels))["experts"]
    if fmt == "hf":
        splits = sorted(df["split"].unique().to_list())
        write_folder(target, lambda tmp: _write_hf(df, tmp, _card(manifest, experts, splits), splits), _hf_export)
    else:
        write_file(target, df.write_parquet if fmt == "parquet" else df.write_ndjson)
    return Exported(path=str(target), format=fmt, labels=manifest.labels, run_id=manifest.run_id, experts=experts,
                    rows=df.height, columns=df.columns)
