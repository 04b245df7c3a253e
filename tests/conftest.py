"""Shared fixtures: offline env, one Ray session and one Prefect harness per test run (per xdist worker), tiny
random models; and which tests share an xdist worker."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("ZOOTER_CACHE", str(Path(__file__).resolve().parents[1] / ".zooter" / "cache"))

import pytest  # noqa: E402
import yaml  # noqa: E402

# `make test` runs the suite on two pytest-xdist workers (`-n 2`): most tests wait on one busy core (a tiny model in
# one actor, a subprocess starting), so two at a time use the machine's second core. A work unit is a test file,
# except that the files sharing an expensive session fixture go to one worker together, so that it is built once:
# the session's labelled store (`labeled`) and the packaged SmolLM2's vLLM run (`smol_vllm`). The biggest units
# are scheduled first (longest first keeps the two workers' ends close); the rest follow in collection order.
# (xdist's own `--dist loadgroup` marks do not group under pytest 9, whose node ids xdist cannot rename.)
GROUPS = {"labeled-store": [*(f"tests/flows/test_{n}.py" for n in ("deploy", "faults", "label_flow", "pipeline",
                                                                    "pool_change", "relabel", "s3")),
                            "tests/tasks/test_export.py"],
          # vLLM's engine in-process walks sys.modules: it must not share a worker with moto's Flask proxies
          "vllm": ["tests/cluster/test_vllm.py", "tests/cluster/test_openai_backend.py",
                   "tests/tasks/test_row_failures.py"]}
SHARED = {"labeled": "labeled-store", "smol_vllm": "vllm"}  # the session fixture each group shares
FIRST = ["labeled-store", "vllm", "tests/flows/test_cluster_job.py", "tests/flows/test_cluster.py"]


def work_unit(nodeid: str) -> str:
    """The work unit of a test: its group, else its file."""
    path = nodeid.split("::")[0]
    return next((g for g, files in GROUPS.items() if path in files), path)


def pytest_collection_modifyitems(config, items):
    for item in items:  # a new user of a shared fixture joins its group, or that fixture is built twice
        for fixture, group in SHARED.items():
            if fixture in item.fixturenames and work_unit(item.nodeid) != group:
                raise pytest.UsageError(f"{item.nodeid} uses `{fixture}`: add its file to GROUPS[{group!r}] in "
                                        "tests/conftest.py")
    rank = {g: i for i, g in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(FIRST)))  # stable: collection order within


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole work units (above) to each worker, in the order collected."""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep FIRST's order, not "most tests first"
    return ByGroup(config, log)


# --- what a run cost: the machine's busy core-seconds beside the wall time ------------------------------------
# Whether a run was slow because the suite needs more CPU or because the cores were idle (waiting), or shared.
_START = pytest.StashKey[tuple[float, float | None]]()


def _busy_core_s() -> float | None:
    """Seconds the machine's CPUs have been busy since boot, summed over cores (Linux /proc/stat), or None."""
    try:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def pytest_sessionstart(session):
    session.config.stash[_START] = (time.monotonic(), _busy_core_s())


def pytest_terminal_summary(terminalreporter, config):
    t0, busy0 = config.stash.get(_START, (None, None))
    busy1 = _busy_core_s()
    if t0 is None or busy0 is None or busy1 is None:
        return
    wall, busy, cores = time.monotonic() - t0, busy1 - busy0, os.cpu_count() or 1
    terminalreporter.write_line(
        f"machine: {busy:,.0f} busy core-seconds in {wall:.0f} s ({busy / (wall * cores):.0%} of {cores} cores)")


def minilm_dir() -> Path:
    from cluster.packaged import PACKAGED

    return PACKAGED["all-minilm-l6-v2"].files()[0].parent


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random HF models built from a config (fully offline), with the packaged MiniLM tokenizer.

    head_dim 32 keeps them usable by vLLM's CPU attention too."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.eos_token = "[SEP]"
    out = {}
    for name, seed in (("lm_a", 1), ("lm_b", 2)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                          eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                          pad_token_id=tok.pad_token_id)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_labels=1, max_position_embeddings=512)
    BertForSequenceClassification(cfg).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    out["rm"] = root / "rm"
    # a decoder reward model, the shape real RMs (Skywork-Reward, QwenRM) have
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                      eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(root / "rm_llama")
    tok.save_pretrained(root / "rm_llama")
    out["rm_llama"] = root / "rm_llama"
    # a router encoder for tests whose router is not what they check: its compute and checkpoints are a fraction
    # of MiniLM's (~12 MB, not ~270 MB per checkpoint; a fit's wall time is still mostly Ray Train's start-up)
    torch.manual_seed(4)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128)).save_pretrained(root / "enc")
    tok.save_pretrained(root / "enc")
    out["enc"] = root / "enc"
    return out


def tiny_router(tiny_models: dict[str, Path], **changes) -> dict:
    """A `router` section on the tiny random encoder, fitted in Ray Train's local mode (in the flow's process, no
    actor): for a test that needs a router fitted but checks only the cells, labels or decisions around it. The
    session's `labeled` run fine-tunes the real MiniLM on a Ray Train worker; tests/cluster/test_router.py checks
    that local mode is one worker's computation."""
    return {"encoder": str(tiny_models["enc"]), "epochs": 2, "batch_size": 4, "max_length": 32, "num_workers": 0,
            **changes}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run (per xdist worker), in a temp dir of its own: Ray's unix socket paths
    (at most 107 bytes) live under it, and pytest's per-worker tmp dirs are too deep for them."""
    import ray

    tmp = tempfile.mkdtemp(prefix="zray-")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, object_store_memory=256 * 1024**2,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "ZOOTER_CACHE": os.environ["ZOOTER_CACHE"]}})
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1 and a free port, with one bucket `zooter`.
    Yields the store options; the credentials are recognisable so tests can grep artifacts for them."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "AKIAZOOTERTESTKEY", "secret": "zooter-s3-secret-0042"}
    boto3.client("s3", endpoint_url=opts["endpoint_url"], aws_access_key_id=opts["key"],
                 aws_secret_access_key=opts["secret"], region_name="us-east-1").create_bucket(Bucket="zooter")
    yield opts
    server.stop()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole run (starting one costs ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


QUERIES = [
    {"id": f"q{i}", "text": t, "tags": [tag], **({"reference": ref} if ref else {})}
    for i, (t, tag, ref) in enumerate([
        ("What is 2 + 3?", "math", "5"), ("What is 10 - 4?", "math", "6"), ("What is 3 * 3?", "math", "9"),
        ("Write a line about rain.", "writing", None), ("Write a line about snow.", "writing", None),
        ("Write a line about the sea.", "writing", None), ("Name a primary colour.", "trivia", None),
        ("Name a planet.", "trivia", None), ("Name an ocean.", "trivia", None),
        ("Reverse the word cat.", "coding", None), ("Sort 3 1 2.", "coding", None),
        ("Print hello in Python.", "coding", None),
    ])
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_flow_config(tmp: Path, tiny_models: dict[str, Path], **changes) -> Path:
    """Write a complete config on tiny models (12 queries, 3 shards, 2 experts, 3 reward models)."""
    res = {"num_cpus": 1, "batch_size": 4, "threads": 1}
    cfg = {
        "name": "tiny",
        "store": str(tmp / "store"),
        "data": {"path": str(write_jsonl(tmp / "queries.jsonl", QUERIES)), "text_field": "text", "id_field": "id",
                 "tags_field": "tags", "reference_field": "reference", "shard_size": 4, "test_fraction": 0.25},
        "experts": [
            {"name": "a", "model": str(tiny_models["lm_a"]), "dtype": "float32", "prompt": "fewshot_qa",
             "sampling": {"max_new_tokens": 6, "stop": ["\n"]}, "resources": res},
            {"name": "b", "model": str(tiny_models["lm_b"]), "dtype": "float32",
             "sampling": {"max_new_tokens": 6}, "resources": res},
        ],
        "reward_models": [
            {"name": "judge", "kind": "loglik", "model": str(tiny_models["lm_a"]), "dtype": "float32",
             "resources": res},
            {"name": "rm", "kind": "classifier", "model": str(tiny_models["rm"]), "dtype": "float32",
             "weight": 0.5, "resources": res},
            {"name": "exact", "kind": "verifiable"},
        ],
        "router": {"epochs": 2, "batch_size": 4, "max_length": 32},
        **changes,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def synthetic_models(cfg: dict) -> None:
    """The tiny config's experts and model reward models on the synthetic backend (cluster/synthetic.py: answers
    and scores from a hash, nothing loaded), in place: for a test of orchestration (leases, resumption, placement)
    that counts cells and compares labels but does not check what a model computes. Their actors skip ~4 s of
    torch and transformers imports each. Where such a config is loaded, ZOOTER_ALLOW_SYNTHETIC=1 must be set."""
    for spec in cfg["experts"]:
        spec["backend"] = "synthetic"
    for spec in cfg["reward_models"]:
        if spec["kind"] != "verifiable":
            spec.update(backend="synthetic", model=None)


@dataclass(frozen=True)
class Labeled:
    """The session's labelled store: its directory, the config that labelled it, and that run's outcome."""

    root: Path
    config: Path
    outcome: Any  # schemas.manifest.Outcome (imported lazily: collecting the tests imports no flow)


@pytest.fixture(scope="session")
def labeled(tmp_path_factory, tiny_models, ray_session, prefect_harness) -> Labeled:
    """The whole label flow on the tiny config, run once per test session from an empty store: the one real
    end-to-end run that tests/flows/test_label_flow.py checks artifact by artifact. Tests about something else
    (a rerun, a pool change, relabel, deploy, S3, faults) start from a copy (`copy_labeled`) instead of
    labelling from scratch again. Never write into `root`: copy it."""
    from flows.label import label_flow

    tmp = tmp_path_factory.mktemp("labeled")
    path = tiny_flow_config(tmp, tiny_models)
    return Labeled(tmp / "store", path, label_flow(str(path)))


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def copy_labeled(labeled: Labeled, tmp: Path, tiny_models: dict[str, Path], **changes) -> Path:
    """A copy of the session's labelled store at tmp/store, and a tiny config on it (with `changes`, as
    `tiny_flow_config` takes them): a run on it reuses every cell the shared run computed.

    The files are hard links (the router's checkpoints make the store ~350 MB): the store only ever replaces or
    deletes a file, never writes into one, so the shared store stays as it was. A test that edits a file in
    place must copy that file first."""
    shutil.copytree(labeled.root, tmp / "store", copy_function=_link)
    return tiny_flow_config(tmp, tiny_models, **changes)


@pytest.fixture
def tiny_config(tmp_path, tiny_models):
    """A writer of a complete tiny config, so a test can change keys first."""
    return lambda **changes: tiny_flow_config(tmp_path, tiny_models, **changes)


def json_doc(output: str) -> dict:
    """The one JSON document in a `--json` command's output. Its stdout is exactly that document (one line), but
    CliRunner's `output` and a subprocess run with stderr=STDOUT mix stderr in: Ray actor logs around it, and a
    progress bar's last frame on the same line (no newline after a carriage return)."""
    for line in output.splitlines():
        if '{"' in line:
            try:
                return json.loads(line[line.index('{"'):])
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON document in the output:\n{output[-2000:]}")
