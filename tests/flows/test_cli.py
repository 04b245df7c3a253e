"""The CLI's happy paths; bad input is in test_bad_input.py."""


import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _edit(path, fn):
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


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
