"""The run plan: a config resolved once, at the start of a run (`tasks.plan.plan_run`), into what every step needs.

Every expert and reward model carries its fingerprint and model identity, computed exactly once (an `s3://` source
costs a LIST, a local directory a read of its weight files' ends); the embed fingerprint, score sources, costs and
routing inputs sit beside them. The flow passes the plan's parts to its steps, which never fingerprint a spec again;
the plan is written as `runs/<run_id>/plan.json` (store options redacted) and is a run's lineage together with its
manifest. `Expert` and `ScoreSource` are how the labels name their columns and rewards.

The steps after aggregation hand each other refs (`LabelsRef`, `RouterRef`, `EvalRef`): what the step wrote, typed,
with the labels' rows kept in memory where the run just computed them, so that training, evaluation and publishing
do not read back what the run wrote a moment ago.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_serializer

from schemas.artifacts import LABELS, labels_path
from schemas.config import AggregateConfig, ExpertSpec, FlowConfig, RewardSpec, RoutingConfig, TrainConfig
from schemas.evaluation import EvalReport
from schemas.store import Store


class Expert(NamedTuple):
    """An expert as labels, routers and evaluations name it: its name and the fingerprint of its answers."""

    name: str
    fingerprint: str


@dataclass(frozen=True)
class ScoreSource:
    """One reward in the combined reward: a reward model's (or an import's) scores and their weight."""

    rm: str
    rm_fp: str
    weight: float


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlannedExpert(_Frozen):
    """An expert of the run with what identifies its answers."""

    spec: ExpertSpec = Field(description="The expert as configured.")
    fingerprint: str = Field(description="What its generation cells are named by (tasks/generate.py).")
    identity: str | None = Field(description="Its weights' identity (cluster/models.py `identity`); None for an "
                                 "endpoint or a synthetic expert, which have no weights here.")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ref(self) -> Expert:
        return Expert(self.spec.name, self.fingerprint)


class PlannedRM(_Frozen):
    """A reward model of the run with what identifies its scores."""

    spec: RewardSpec = Field(description="The reward model as configured.")
    fingerprint: str = Field(description="What its score cells are named by (tasks/score.py).")
    identity: str | None = Field(description="Its weights' identity; None without a model (verifiable, synthetic).")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def source(self) -> ScoreSource:
        return ScoreSource(self.spec.name, self.fingerprint, self.spec.weight)


class RunPlan(_Frozen):
    """`runs/<run_id>/plan.json`: one run's config resolved once. `inputs` (what preflight checked: the label
    flow's query frame, the train flow's import record) travel with the plan in process and are never written."""

    flow: Literal["label", "relabel", "train"] = Field(description="Which flow the plan is for.")
    config: FlowConfig | TrainConfig = Field(description="The validated config (written with store options "
                                             "redacted).")
    experts: list[PlannedExpert] = Field(default_factory=list, description="The label flow's experts, in the "
                                         "router's output order.")
    reward_models: list[PlannedRM] = Field(default_factory=list, description="The label flow's reward models.")
    expert_refs: list[Expert] = Field(description="Every expert as the labels name it, in the router's output "
                                      "order (imported experts for the train flow).")
    sources: list[ScoreSource] = Field(description="The rewards the labels combine.")
    encoder_identity: str = Field(description="The router encoder's identity.")
    embed_fingerprint: str | None = Field(description="The embed step's fingerprint where it runs (a frozen "
                                          "encoder, or the cluster tagger's features); else None.")
    test_fraction: float = Field(description="Held-out share for queries without a split.")
    costs: dict[str, float] | None = Field(description="Cost of one call per expert; None: no costs.")
    routing: RoutingConfig = Field(description="How the router is used when it serves (lambda, fallback).")
    shards: list[int] = Field(default_factory=list, description="The train flow's shards (the import's); the "
                              "label flow's come from ingest.")
    _inputs: object = PrivateAttr(default=None)

    @field_serializer("config")
    def _redacted(self, cfg: FlowConfig | TrainConfig) -> dict:
        d = cfg.model_dump(mode="json")
        d["store"]["options"] = {k: "***" for k in d["store"]["options"]}
        return d

    @property
    def inputs(self):  # the label flow's query frame (polars), the train flow's ImportRecord
        return self._inputs

    def with_inputs(self, inputs: object) -> RunPlan:
        self._inputs = inputs  # private: frozen covers the fields only
        return self

    def expert(self, name: str) -> PlannedExpert:
        return next(e for e in self.experts if e.name == name)


class LabelsRef(_Frozen):
    """The labels artifact a run aggregated (or found): its fingerprint and what it was made with."""

    fingerprint: str = Field(description="The labels' fingerprint (labels/<fp>.parquet).")
    rows: int = Field(description="Labelled queries.")
    experts: list[str] = Field(description="Expert names in the labels' (and the router's) column order.")
    aggregate: AggregateConfig = Field(description="How rewards became soft labels.")
    test_fraction: float = Field(description="Held-out share for queries without a split.")
    left_out: int = Field(0, description="Queries left out because a row of theirs failed alone (an expert's "
                          "generation or a reward model's score, docs/failures.md#row-failures).")
    left_out_key: str | None = Field(None, description="Fingerprint of the left-out query ids (None: none).")
    _frame: object = PrivateAttr(default=None)

    @property
    def content_key(self) -> str:
        """What a router or an evaluation of these labels is keyed on: the fingerprint, and the left-out queries'
        when some are (the retry that answers them rewrites the labels under the same fingerprint)."""
        return self.fingerprint if not self.left_out else f"{self.fingerprint}-{self.left_out_key}"

    @classmethod
    def read(cls, store: Store, fingerprint: str) -> LabelsRef:
        """The ref of labels already in the store (their footer: experts, aggregation, rows); the rows are read
        when first needed (`frame`)."""
        meta = store.read_meta(labels_path(fingerprint))
        agg = AggregateConfig.model_validate({k: meta[k] for k in AggregateConfig.model_fields if k in meta})
        return cls(fingerprint=fingerprint, rows=meta["rows"], experts=meta["experts"], aggregate=agg,
                   test_fraction=meta.get("test_fraction", 0.25), left_out=meta.get("left_out", 0),
                   left_out_key=meta.get("left_out_key"))

    def with_frame(self, frame: pl.DataFrame) -> LabelsRef:
        self._frame = frame  # private: frozen covers the fields only
        return self

    def frame(self, store: Store) -> pl.DataFrame:
        """The label rows: as the run computed them, else read once from the store."""
        if self._frame is None:
            self._frame = pl.from_arrow(store.read_table(labels_path(self.fingerprint), LABELS))
        return self._frame


class RouterRef(_Frozen):
    """A trained router: its fingerprint and its metadata file (routers/<fp>/router.json)."""

    fingerprint: str = Field(description="The router's fingerprint.")
    meta: dict = Field(description="Its router.json: labels, experts, encoder, best epoch, history, nodes.")

    @property
    def nodes(self) -> list[str]:
        return self.meta.get("nodes", [])


class EvalRef(_Frozen):
    """An evaluation: its fingerprint and its report."""

    fingerprint: str = Field(description="The evaluation's fingerprint (evaluations/<fp>/).")
    report: EvalReport = Field(description="The report.")
