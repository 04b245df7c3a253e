"""One in-process vLLM run of the packaged SmolLM2 per test session, shared by the vllm backend's tests
(tests/cluster/test_vllm.py) and the OpenAI-server comparison (tests/cluster/test_openai_backend.py): each vLLM
engine start costs ~30-40 s on 2 cores."""

import polars as pl
import pytest

from schemas.artifacts import GENERATIONS, generation_path
from schemas.config import DataConfig, ExpertSpec
from schemas.store import Store
from tasks.generate import run_generate
from tasks.ingest import read_queries, write_shards

VLLM_RES = {"num_cpus": 1, "batch_size": 8, "threads": 1}
VLLM_SHARDS = [0, 1]  # 8 queries, 4 per shard


def generate_cells(store: Store, spec: ExpertSpec) -> pl.DataFrame:
    """`spec`'s generation cells for both shards, computed now (none may exist yet), by query id."""
    res = run_generate(store, spec, VLLM_SHARDS)
    assert len(res.computed) == len(VLLM_SHARDS)
    return pl.concat([pl.from_arrow(store.read_table(generation_path(spec.name, res.fingerprint, s), GENERATIONS))
                      for s in VLLM_SHARDS]).sort("query_id")


@pytest.fixture(scope="session")
def vllm_store(tmp_path_factory) -> Store:
    """A store with 8 of the tiny queries in 2 shards; the vLLM tests write their experts' cells into it."""
    from tests.conftest import QUERIES, write_jsonl

    tmp = tmp_path_factory.mktemp("vllm")
    s = Store(str(tmp / "store"))
    data = DataConfig(path=str(write_jsonl(tmp / "q.jsonl", QUERIES)), id_field="id", limit=8)
    write_shards(s, read_queries(data), shard_size=4)
    return s


@pytest.fixture(scope="session")
def smol_vllm(vllm_store, ray_session) -> tuple[ExpertSpec, pl.DataFrame]:
    """The packaged SmolLM2 through the vllm backend's actor pool, greedy, 16 new tokens: its spec and cells."""
    spec = ExpertSpec(name="smol-vllm", model="packaged:smollm2-135m-instruct", backend="vllm", dtype="float32",
                      max_model_len=512, sampling={"max_new_tokens": 16}, resources=VLLM_RES)
    return spec, generate_cells(vllm_store, spec)
