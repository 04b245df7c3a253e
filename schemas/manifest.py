"""The run manifest: `runs/<run_id>/manifest.json`, the lineage a user inspects.

Config (with store options redacted), every fingerprint, the cells each stage computed or reused, row counts,
timings and package versions.
"""

from __future__ import annotations

import platform
import uuid
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from pydantic import BaseModel, ConfigDict, Field

PACKAGES = ("zooter-flow", "torch", "transformers", "ray", "prefect", "polars", "pyarrow", "s3fs")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


class StageRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    fingerprint: str
    cells_computed: int = 0
    cells_reused: int = 0
    cells_repaired: int = Field(0, description="Broken files found where a cell belongs (truncated, foreign "
                                "schema), logged and computed over; included in cells_computed.")
    rows: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    nodes: list[str] = Field(default_factory=list, description="Ray node ids the stage's actors ran on.")
    flags: dict[str, int] = Field(default_factory=dict, description="Rows flagged in the cells computed, by "
                                  "flag: empty_response, nonfinite (see tasks/score.py).")


class ChampionDecision(BaseModel):
    """Champion/challenger at publish: the run's router replaces the champion only if it is not worse."""

    model_config = ConfigDict(extra="forbid")
    decision: str  # "promoted" | "kept"
    reason: str
    challenger: str  # router fingerprint of this run
    challenger_reward: float | None
    champion: str | None = None  # router fingerprint of the champion before this run (None: there was none)
    champion_reward: float | None = None  # the champion's reward on this run's held-out split
    compared_on: str | None = None  # labels fingerprint whose test split both rewards are measured on


class RunManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: str
    flow: str
    status: str = "running"
    started: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    finished: str | None = None
    config: dict
    versions: dict[str, str] = Field(default_factory=package_versions)
    shards: list[int] = Field(default_factory=list)
    queries: int = 0
    new_queries: int = 0
    tagger: str | None = None
    generate: list[StageRecord] = Field(default_factory=list)
    score: list[StageRecord] = Field(default_factory=list)
    embed: StageRecord | None = None  # query embeddings for a frozen-encoder router
    labels: str | None = None
    label_rows: int = 0
    router: str | None = None
    evaluation: str | None = None
    champion: ChampionDecision | None = None
    timings: dict[str, float] = Field(default_factory=dict)

    @property
    def cells_computed(self) -> int:
        return sum(s.cells_computed for s in self.generate + self.score)
