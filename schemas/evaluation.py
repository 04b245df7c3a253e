"""Typed evaluation artifacts: the evaluation report and the store's champion record.

Readers validate them here, so a field is read by name with a type, never by a string key into a dict, and a
corrupted or foreign file is one clear error naming the object.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.artifacts import CHAMPION_PATH, EVALUATIONS_DIR, ROUTERS_DIR, report_path


def fmt(v: object) -> str:
    """A report value as text, the same in the Markdown report and the terminal's tables: 4 decimals, `-` for none."""
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrategyRow(_Model):
    """One routing strategy measured on the held-out split."""

    strategy: str = Field(description="router, best_single (<expert>), rm_ranking, expert:<name>, random, oracle.")
    reward: float | None = Field(description="Mean combined reward of the chosen answers (None: nothing scored).")
    rm: dict[str, float | None] = Field(default_factory=dict, description="Mean score of the chosen answers "
                                        "under each reward model alone, by reward model name.")
    expert_calls: int = Field(description="Generations needed per query.")
    rm_calls: int = Field(description="Reward-model scorings needed per query.")
    mtr: float | None = Field(None, description="Mean rank over tag subsets (1 = best), the paper's MTR.")
    first: float | None = Field(None, description="Share of tag subsets where this strategy ranks first.")

    @model_validator(mode="before")
    @classmethod
    def _from_v1(cls, v: object) -> object:
        """Reports of evaluation code 1 held each reward model's mean as an `rm:<name>` key."""
        if isinstance(v, dict) and any(k.startswith("rm:") for k in v):
            rm = {k.removeprefix("rm:"): x for k, x in v.items() if k.startswith("rm:")}
            v = {k: x for k, x in v.items() if not k.startswith("rm:")} | {"rm": rm}
        return v


class PerTag(_Model):
    """Mean reward of each strategy on each tag's test queries, plus the plain mean over tags (`tag_average`)."""

    tags: list[str] = Field(default_factory=list, description="Tags present on test queries, sorted.")
    n: list[int] = Field(default_factory=list, description="Test queries per tag, in `tags` order.")
    strategies: dict[str, dict[str, float | None]] = Field(
        default_factory=dict, description="strategy -> tag (and 'tag_average') -> mean reward.")


class CurvePoint(_Model):
    """One point of a quality-cost curve: mean cost of the chosen calls and mean reward of their answers."""

    cost: float = Field(description="Mean cost per query of the chosen experts (the experts' `cost` unit).")
    reward: float = Field(description="Mean combined reward of the chosen answers.")
    lam: float | None = Field(None, description="The routing lambda of a router point (None: not a router point).")
    share: dict[str, float] = Field(default_factory=dict, description="Router points: share of queries sent to "
                                    "each expert.")


class CostCurve(_Model):
    """Quality against cost on the test split (RouterBench's view): the router over a lambda grid, every single
    expert, and random mixes of experts (the upper convex hull of the single experts' points: what mixing them at
    random, without looking at the query, reaches)."""

    costs: dict[str, float] = Field(description="Cost of one call per expert (from the config).")
    router: list[CurvePoint] = Field(description="The router at each lambda of the grid, lambda ascending.")
    experts: dict[str, CurvePoint] = Field(description="Each expert alone: its cost and mean reward.")
    random_mix: list[CurvePoint] = Field(description="Vertices of the non-decreasing upper convex hull of the "
                                         "single experts' points, cost ascending.")
    aiq: dict[str, float] = Field(description="Average improvement in quality (RouterBench): the area under the "
                                  "strategy's non-decreasing convex hull over the experts' cost range, divided by "
                                  "that range; keys `router` and `random_mix`.")
    target: float = Field(description="95 % of the best single expert's reward: best - 0.05 * |best|.")
    cost_to_target: dict[str, float | None] = Field(description="Least mean cost at which the strategy's hull "
                                                    "reaches `target` (None: never); keys `router`, `random_mix` "
                                                    "and `best_single` (its own cost).")
    operating: CurvePoint = Field(description="The router at the config's routing lambda.")


class Validation(_Model):
    """The router on its validation slice: training queries held out from its training by a hash of the id and
    its seed (tasks.aggregate.train_val). Promotion decides on these numbers; the test split only reports."""

    queries: int = Field(description="Validation queries (0: the training split is too small to hold any out).")
    seed: int = Field(description="router.seed, which drew the slice.")
    reward: float | None = Field(description="The router's mean combined reward on them (None: no queries).")
    tag_average: float | None = Field(None, description="Mean over tags of the router's per-tag mean reward (None: "
                                      "untagged queries).")
    best_single: float | None = Field(None, description="The best single expert's (by train reward) mean reward.")


class EvalReport(_Model):
    """What the evaluate step writes as the report's JSON (its Markdown and PNG are rendered from it)."""

    evaluation: str = Field(description="This evaluation's fingerprint (its directory under evaluations/).")
    labels: str = Field(description="Fingerprint of the labels whose test split was used.")
    router: str = Field(description="Fingerprint of the router evaluated.")
    experts: list[str] = Field(description="Experts in the router's output order.")
    test_queries: int = Field(description="Held-out queries evaluated.")
    left_out: int = Field(0, description="Queries the labels left out, any split: a row of theirs failed alone "
                          "(docs/failures.md#row-failures); the next run retries them.")
    best_single: str = Field(description="The expert with the best training reward (tag average when tagged).")
    rows: list[StrategyRow] = Field(description="One row per strategy.")
    router_share: dict[str, float] = Field(description="Share of test queries the router sends to each expert.")
    per_tag: PerTag = Field(default_factory=PerTag, description="Per-tag mean rewards and the tag average.")
    costs: dict[str, float] | None = Field(None, description="Cost of one call per expert from the config; None: "
                                           "no costs given (then no curve).")
    lam: float = Field(0.0, description="The config's routing lambda (`routing.lambda`): `zooter route` and the "
                       "gateway route with it unless told otherwise.")
    curve: CostCurve | None = Field(None, description="The quality-cost curve; None when there are no costs or "
                                    "every expert costs the same (`curve_note` says which).")
    curve_note: str | None = Field(None, description="Why there is no curve.")
    fallback_below: float = Field(0.0, description="The config's `routing.fallback_below`: queries whose top "
                                  "router probability is below it go to `best_single` (0 = off); `zooter route` and "
                                  "the gateway route with it.")
    diagnostics: Diagnostics | None = Field(None, description="Reward-entropy and calibration diagnostics of the "
                                            "router on the test split (None: reports made before them).")
    validation: Validation | None = Field(None, description="The router on its validation slice, what publish "
                                          "decides on (None: a report from before evaluation code 3).")

    @model_validator(mode="before")
    @classmethod
    def _from_v1(cls, v: object) -> object:
        """Reports of evaluation code 1 also had `by_tag`, the same means `per_tag` holds."""
        return {k: x for k, x in v.items() if k != "by_tag"} if isinstance(v, dict) else v

    def row(self, strategy: str) -> StrategyRow:
        for r in self.rows:
            if r.strategy == strategy:
                return r
        raise KeyError(f"evaluation {self.evaluation}: no strategy {strategy!r}")

    @property
    def router_reward(self) -> float | None:
        """On the test split: reported, never used to choose."""
        return self.row("router").reward

    @property
    def val_reward(self) -> float | None:
        """On the validation slice: what champion/challenger decides on."""
        return self.validation.reward if self.validation else None

    def table(self) -> list[dict[str, str | float | int | None]]:
        """The strategy table as flat rows, the way the CLI, report.md and the Prefect artifact show it: strategy,
        reward, `rm:<name>` per reward model, expert_calls, rm_calls, and mtr/first where tags were ranked."""
        rms = list(self.rows[0].rm) if self.rows else []
        ranked = any(r.mtr is not None for r in self.rows)
        return [{"strategy": r.strategy, "reward": r.reward, **{f"rm:{k}": r.rm.get(k) for k in rms},
                 "expert_calls": r.expert_calls, "rm_calls": r.rm_calls,
                 **({"mtr": r.mtr, "first": r.first} if ranked else {})} for r in self.rows]


class Calibration(_Model):
    """What `zooter calibrate` found: the smallest lambda (by bisection) whose routing of the validation queries
    meets every constraint, and what routing at it gives."""

    router: str = Field(description="Fingerprint of the champion router calibrated.")
    queries: int = Field(description="Validation queries routed (the labels' train split's validation slice).")
    max_share: dict[str, float] = Field(default_factory=dict, description="Constraint: expert -> largest share.")
    budget: float | None = Field(None, description="Constraint: largest mean cost per query.")
    lam: float = Field(description="The lambda found (0: the plain argmax already meets the constraints).")
    point: CurvePoint = Field(description="Shares, mean cost and mean reward on the validation queries at `lam`.")
    baseline: CurvePoint = Field(description="The same at lambda 0 (plain argmax).")


class Champion(_Model):
    """The champion record: the router that `zooter route` and the gateway use, and how it got there."""

    router: str = Field(description="Store path of the router directory (routers/<fp>).")
    evaluation: str = Field(description="Store path of its evaluation (evaluations/<fp>).")
    labels: str = Field(description="Fingerprint of the labels it was trained and measured on.")
    experts: list[str] = Field(description="Experts it routes to, in output order.")
    reward: float | None = Field(description="Its router reward on the test split of `labels` (reported only).")
    val_reward: float | None = Field(None, description="Its router reward on its validation slice of `labels`, "
                                     "the number promotion compared (None: a record from before validation-only "
                                     "promotion; it is re-measured).")
    val_seed: int | None = Field(None, description="router.seed, which drew that validation slice.")
    val_unseen: bool = Field(False, description="Its router's targets took their tag prior from the rows it fitted "
                             "(train_router since its CODE_VERSION 3), so no validation query's reward reached it. "
                             "False (records from before): the prior averaged over its labels' whole training split, "
                             "so a re-measurement counts every query there as seen.")
    run_id: str = Field(description="The run that promoted it.")
    published: str = Field(description="When it was promoted (UTC, ISO 8601).")
    replaced: str | None = Field(None, description="Fingerprint of the router it replaced.")

    @property
    def router_fp(self) -> str:
        return self.router.removeprefix(f"{ROUTERS_DIR}/")

    @property
    def evaluation_fp(self) -> str:
        return self.evaluation.removeprefix(f"{EVALUATIONS_DIR}/")


def read_champion(store) -> Champion | None:
    """The store's champion, None when there is none; a corrupted record is an ArtifactError that names the
    object and how to repair it. (`store` is a schemas.store.Store.)"""
    if not store.exists(CHAMPION_PATH):
        return None
    return store.read_model(CHAMPION_PATH, Champion, "corrupted champion record ({why}); delete it and rerun "
                            "`zooter train`/`zooter run`, or restore it from a run manifest")


def read_report(store, evaluation: str) -> EvalReport:
    """An evaluation's report, validated. `evaluation` is its fingerprint or its directory (`evaluations/<fp>`,
    as the champion record holds it)."""
    fp = evaluation.removeprefix(f"{EVALUATIONS_DIR}/")
    return store.read_model(report_path(fp), EvalReport, f"not an evaluation report ({{why}}); delete the folder "
                            f"{EVALUATIONS_DIR}/{fp} to recompute it (rerun the flow)")


class EntropyBin(_Model):
    """Test queries whose reward entropy (normalised entropy of s(q) over experts) falls in [lo, hi)."""

    lo: float = Field(description="Lower edge of the bin (normalised entropy, 0 = one expert takes all of s(q)).")
    hi: float = Field(description="Upper edge (the last bin includes 1 = s(q) uniform over the experts).")
    n: int = Field(description="Test queries in the bin.")
    entropy: float | None = Field(description="Their mean normalised entropy (None: empty bin).")
    router: float | None = Field(description="Mean reward of the expert the router chose.")
    best_single: float | None = Field(description="Mean reward of the best single expert (by training reward).")
    oracle: float | None = Field(description="Mean reward of the best expert per query.")


class ReliabilityBin(_Model):
    """Test queries whose router confidence (top probability) falls in [lo, hi)."""

    lo: float = Field(description="Lower edge of the confidence bin.")
    hi: float = Field(description="Upper edge (the last bin includes 1).")
    n: int = Field(description="Test queries in the bin.")
    confidence: float | None = Field(description="Their mean top probability (None: empty bin).")
    accuracy: float | None = Field(description="Share of them whose pick had the best reward available (ties "
                                   "count: any expert with the query's top reward is a best pick).")


class Diagnostics(_Model):
    """The paper's Figure 3 (router reward against the entropy of s(q)) and the router's calibration."""

    entropy_bins: list[EntropyBin] = Field(description="Equal-width bins of normalised reward entropy "
                                           "H(s(q)) / log(experts), low to high.")
    reliability: list[ReliabilityBin] = Field(description="Equal-width bins of router confidence over [0, 1].")
    ece: float = Field(description="Expected calibration error: sum over bins of n_bin / n * |accuracy - "
                       "confidence|.")
    confidence: float = Field(description="Mean top probability over the test queries.")
    accuracy: float = Field(description="Share of test queries whose pick had the best reward available.")


EvalReport.model_rebuild()  # `diagnostics` names a class defined after it
