"""benchmarks/gpu_check.py on CPU (`--device cpu --shapes tiny`), as a lent device would run it: in a subprocess
where Ray, vLLM, Prefect, polars, pyarrow and pydantic cannot be imported (a bare torch + transformers machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ["ray", "vllm", "prefect", "polars", "pyarrow", "pydantic"]
# None in sys.modules makes `import name` (and its submodules) raise ModuleNotFoundError
RUN = (f"import runpy, sys; sys.modules.update(dict.fromkeys({ABSENT!r})); sys.argv[0] = 'gpu_check.py'; "
       "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_gpu_check_cpu_tiny(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, "-c", RUN, "--device", "cpu", "--shapes", "tiny", "--threads", "1",
                        "--budget-s", "120", "--commit", "test", "--output", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["commit"] == "test" and res["date"] and res["machine"]["cores"] >= 1  # what the docs page needs
    assert res["load"]["load_1m"] >= 0 and res["skipped"] == res["errors"] == []
    assert res["backend_code"].startswith("cluster.hf (stood in: schemas.config (pydantic missing)")  # shipped code
    assert res["gpu_step_tokens_current"] > 0

    tiny = res["shapes"]["tiny"]
    step = tiny["step_tokens"]
    assert len(step["points"]) >= 6 and all(_pos(pt["s"]) for pt in step["points"])
    assert _pos(step["step_tokens"]) and _pos(step["per_token_s"]) and _pos(step["one_token_forward_s"])
    assert res["step_tokens_measured"]["tiny"] == step["step_tokens"]

    (gen,) = tiny["generation"]["runs"]
    assert gen["rows_answered"] == tiny["generation"]["rows"] == 8
    assert gen["new_tokens"] == 8 * tiny["generation"]["max_new_tokens"] and gen["prompt_tokens"] > 0
    for k in ("prefill_tok_s", "decode_tok_s", "new_tok_s", "decode_step_tokens", "peak_rss_gib"):
        assert _pos(gen[k]), (k, gen[k])

    for name in ("loglik_scorer", "classifier_scorer"):
        (run,) = tiny[name]["runs"]
        assert _pos(run["tok_s"]) and run["finite"] == tiny[name]["rows"] == 8, (name, run)
        assert run["batches"] >= 2  # length batching: 8 rows in batches of at most 4

    r = res["router"]
    assert r["router_code"].startswith("minimal copy")  # cluster.router needs pyarrow
    assert r["steps"] == len(r["losses"]) > 0 and _pos(r["steps_s"])
    assert all(math.isfinite(x) for x in r["losses"])
    assert r["loss_after"] < r["loss_before"]  # the head learns

    assert json.loads(p.stdout)["tiny"]["gen_b4"]["decode_tok_s"] > 0  # the printed summary

