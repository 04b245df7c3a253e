"""inspect: what a store holds, from manifests, Parquet footers and the labels table (no model, no Ray).

Runs and their manifests, the cell matrix of the chosen run (expert x shard for generations, and the same for
every reward model: done / missing), flagged score rows (empty answers, NaN/inf rewards), the run's tags (vocabulary,
most frequent tags, an llm tagger's parse failures), per-expert mean reward and win rate, a tag x expert table of
mean target probability, and the champion router with its evaluation.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from schemas.artifacts import (
    GENERATIONS,
    LABELS,
    RUNS_DIR,
    SCORES,
    TAGS,
    generation_path,
    labels_path,
    run_manifest_path,
    score_path,
    tags_path,
)
from schemas.errors import ArtifactError, ConfigError
from schemas.evaluation import read_champion, read_report
from schemas.manifest import RunManifest
from schemas.store import Store


def read_manifest(store: Store, run_id: str) -> RunManifest:
    """A run's manifest, validated: a corrupted one is one ArtifactError naming it and how to repair it."""
    return store.read_model(run_manifest_path(run_id), RunManifest, f"corrupted run manifest ({{why}}); it is the "
                            f"run's record only (its cells stay valid): delete the folder {RUNS_DIR}/{run_id}")


def runs(store: Store) -> list[dict]:
    """One summary per run manifest in the store, oldest first."""
    out = []
    for run_id in store.ls(RUNS_DIR):
        if store.exists(run_manifest_path(run_id)):
            m = read_manifest(store, run_id)
            stages = m.generate + m.score
            out.append({"run_id": run_id, "status": m.status, "error": m.error,
                        "started": m.started, "queries": m.queries,
                        "cells_computed": m.cells_computed, "cells_reused": sum(s.cells_reused for s in stages),
                        "cells_repaired": sum(s.cells_repaired for s in stages),
                        "flagged": sum(sum(s.flags.values()) for s in m.score),
                        "failed": sum(s.failed for s in stages),
                        "labels": m.labels, "router": m.router, "seconds": m.timings.get("total_s")})
    return sorted(out, key=lambda r: r["started"])


def cell_matrix(store: Store, manifest: dict) -> dict:
    """For the run's experts and reward models: per shard, is the cell there and valid?"""
    shards = manifest["shards"]
    gens = {g["name"]: g["fingerprint"] for g in manifest["generate"]}
    matrix = {"shards": shards, "generations": {}, "scores": {}}
    # rows that failed alone, per stage and model, from the cells' footers (docs/failures.md#row-failures)
    matrix["failed"] = []

    def failed(stage: str, name: str, metas: list[dict], **more: str) -> None:
        errors = [e for m in metas for e in m.get("errors", [])]
        if errors:
            matrix["failed"].append({"stage": stage, "name": name, **more, "rows": len(errors),
                                     "first_error": f"query {errors[0][0]}: {errors[0][1]}"})

    for e, fp in gens.items():
        cells = [store.cell(generation_path(e, fp, s), GENERATIONS, fp) for s in shards]  # one footer read each
        matrix["generations"][e] = [why is None for why, _ in cells]
        failed("generate", e, [meta for _, meta in cells])
    matrix["flags"] = []  # flagged rows per (reward model, expert), summed over the valid cells' footers
    for r in manifest["score"]:
        per: dict[str, list[bool]] = {}
        for e, efp in gens.items():
            cells = [store.cell(score_path(r["name"], r["fingerprint"], e, efp, s), SCORES, r["fingerprint"])
                     for s in shards]  # one footer read per cell: validity and flag counts
            per[e] = [why is None for why, _ in cells]
            failed("score", r["name"], [meta for _, meta in cells], expert=e)
            counts: dict[str, int] = {}
            for _, meta in cells:
                for k, n in meta.get("flags", {}).items():
                    counts[k] = counts.get(k, 0) + n
            if any(counts.values()):
                matrix["flags"].append({"reward_model": r["name"], "expert": e, **counts})
        matrix["scores"][r["name"]] = per
    return matrix


def label_summary(store: Store, labels_fp: str) -> dict:
    """Rows, per-expert mean reward and win rate, and the tag x expert mean target of a labels artifact."""
    meta = store.read_meta(labels_path(labels_fp))
    experts = meta["experts"]
    df = pl.from_arrow(store.read_table(labels_path(labels_fp), LABELS))
    wide = df.select(
        "tags",
        *[pl.col("rewards").list.get(i).alias(f"r:{e}") for i, e in enumerate(experts)],
        *[pl.col("target").list.get(i).alias(e) for i, e in enumerate(experts)],
        pl.col("rewards").list.arg_max().alias("winner"))
    per_expert = [{"expert": e, "mean_reward": wide[f"r:{e}"].mean(),
                   "win_rate": (wide["winner"] == i).mean()} for i, e in enumerate(experts)]
    by_tag = (wide.explode("tags").drop_nulls("tags").group_by("tags")
              .agg(pl.len().alias("n"), *[pl.col(e).mean() for e in experts]).sort("tags").rename({"tags": "tag"}))
    return {"rows": df.height, "left_out": meta.get("left_out", 0), "experts": per_expert,
            "tag_target": by_tag.to_dicts()}


def tag_summary(store: Store, tagger_fp: str, shards: list[int], top: int = 20) -> dict:
    """The run's tags: how many queries carry one, the vocabulary with its most frequent tags, and what the tag
    cells' footers record (an llm tagger: its expert, the raw cells, parse failures summed over the shards)."""
    cells = {rel: store.cell(rel, TAGS, tagger_fp) for rel in (tags_path(tagger_fp, s) for s in shards)}
    present = {rel: meta for rel, (why, meta) in cells.items() if why is None}  # one footer read per cell
    if not present:
        return {"fingerprint": tagger_fp, "cells": 0}
    tags = pl.from_arrow(pa.concat_tables([store.read_table(r, TAGS) for r in present]))
    counts = (tags.explode("tags").drop_nulls("tags").group_by("tags").len()
              .sort(["len", "tags"], descending=[True, False]))
    meta = list(present.values())
    out = {"fingerprint": tagger_fp, "cells": len(present), "queries": tags.height,
           "tagged": int((tags["tags"].list.len() > 0).sum()), "vocabulary": counts.height,
           "top": [{"tag": t, "n": n} for t, n in counts.head(top).iter_rows()]}
    failures = [m["flags"]["parse_failure"] for m in meta if "parse_failure" in m.get("flags", {})]
    if failures:
        out["parse_failures"] = sum(failures)
    out.update({k: meta[0][k] for k in ("tagger", "expert", "source", "min_count") if k in meta[0]})
    return out


def inspect_store(store: Store, run_id: str | None = None) -> dict:
    """Everything `zooter inspect` shows: runs, the chosen run's manifest and cell matrix, its labels summary,
    and the champion with its evaluation rows (the latest completed run unless `run_id` names one)."""
    all_runs = runs(store)
    if not all_runs:
        raise ArtifactError(f"{store.url}: no runs in this store (no {run_manifest_path('*')})")
    ids = [r["run_id"] for r in all_runs]
    if run_id is not None and run_id not in ids:
        raise ConfigError(f"--run {run_id!r}: not in {store.url}; runs are {ids}")
    chosen = run_id or next((r["run_id"] for r in reversed(all_runs) if r["status"] == "completed"), ids[-1])
    manifest = read_manifest(store, chosen).model_dump(mode="json")
    out = {"store": store.url, "runs": all_runs, "run": chosen, "manifest": manifest,
           "cells": cell_matrix(store, manifest)}
    if manifest.get("tagger"):
        out["tags"] = tag_summary(store, manifest["tagger"], manifest["shards"])
    if manifest.get("labels"):
        out["labels"] = label_summary(store, manifest["labels"])
    champ = read_champion(store)
    if champ is not None:
        try:
            rows = [r.model_dump(mode="json") for r in read_report(store, champ.evaluation_fp).rows]
        except ArtifactError:  # missing or unreadable: show the champion anyway
            rows = None
        out["champion"] = {**champ.model_dump(mode="json"), "report": rows}
    return out
