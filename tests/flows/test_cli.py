"""Bad input stops before any model loads: nonzero exit, one line naming file/line or key, store untouched."""

import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _edit(path, fn):
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


CASES = {
    "missing model path": (lambda c: c["experts"][0].update(model="/nonexistent/model"),
                           r"experts.0.model: /nonexistent/model: model directory not found"),
    "zero experts": (lambda c: c.update(experts=[]), r"experts: at least one expert is required"),
    "beta out of range": (lambda c: c.update(aggregate={"beta": -0.1}), r"aggregate.beta"),
    "unknown packaged model": (lambda c: c["experts"][0].update(model="packaged:gpt-9"),
                               r"experts.0.model: packaged:gpt-9: unknown packaged model"),
    "missing data file": (lambda c: c["data"].update(path="/nonexistent.jsonl"), r"data file not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_fails_fast(tiny_config, case):
    edit, match = CASES[case]
    path = _edit(tiny_config(), edit)
    store = yaml.safe_load(path.read_text())["store"]
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 2, res.output
    # exactly one line, starting with "error:" (a shared Ray session may print actor logs around it)
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(match, errors[0]), res.output
    assert not os.path.exists(store)  # nothing written


def test_malformed_query_line_fails_fast(tiny_config):
    path = tiny_config()
    data = yaml.safe_load(path.read_text())["data"]["path"]
    with open(data, "a") as f:
        f.write('{"id": "bad", "text": \n')
    n = len(Path(data).read_text().splitlines())
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 2
    assert f"queries.jsonl:{n}: malformed JSON" in " ".join(res.output.split())


def test_validate_ok(tiny_config):
    res = runner.invoke(app, ["validate", str(tiny_config())])
    assert res.exit_code == 0 and "12 queries" in res.output


def test_models_lists_packaged():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "packaged:qwen2.5-coder-0.5b-instruct" in res.output


def test_trust_remote_code_warns(tiny_config):
    import warnings

    from schemas.config import load_config
    from tasks.preflight import preflight

    path = _edit(tiny_config(), lambda c: c["experts"][0].update(trust_remote_code=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preflight(load_config(path))
    assert any("trust_remote_code" in str(w.message) for w in caught)
