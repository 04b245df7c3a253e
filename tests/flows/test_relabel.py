"""Champion/challenger at publish, and the relabel flow after `zooter experts remove`.

Two real routers on the same labels: A (the session's labelled run trained it) and B (untrained: a tiny random
encoder, lr ~ 0). Champion/challenger decides on the routers' validation slice (same seed: the same slice), never on
the test split: running A, then B, then A again, each decision follows "promoted when the challenger is not worse on
validation", whichever is better. Only B and the router after the pool change are fitted here, both on the tiny
encoder: what is checked is the decisions, not the routers' quality.
"""

import json

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.label import label_flow
from flows.relabel import relabel_flow
from schemas.artifacts import CHAMPION_PATH, router_dir
from schemas.store import Store
from tests.conftest import copy_labeled, json_doc, tiny_router

pytestmark = pytest.mark.slow


def _reward(report: dict, strategy: str) -> float:
    return next(r for r in report["rows"] if r["strategy"] == strategy)["reward"]


def _val(report: dict) -> float:
    return report["validation"]["reward"]


def _computed(m: dict) -> int:
    return sum(s["cells_computed"] for s in m["generate"] + m["score"])


def _set_router(path, router: dict) -> None:
    cfg = yaml.safe_load(path.read_text())
    cfg["router"] = router
    path.write_text(yaml.safe_dump(cfg))


def test_champion_challenger_and_relabel(tmp_path, tiny_models, labeled):
    # the session's labelled store (every cell, the labels, router A), before any router was published there
    router_a = yaml.safe_load(labeled.config.read_text())["router"]
    router_b = tiny_router(tiny_models, epochs=1, lr=1e-12)
    path = copy_labeled(labeled, tmp_path, tiny_models, router=router_a)
    store = Store(str(tmp_path / "store"))
    store.delete(CHAMPION_PATH)

    first = label_flow(str(path)).model_dump(mode="json")
    m1 = first["manifest"]
    assert _computed(m1) == 0 and m1["labels"] == labeled.outcome.manifest.labels
    assert m1["router"] == labeled.outcome.manifest.router  # A is reused, not fitted again
    assert m1["champion"]["decision"] == "promoted" and m1["champion"]["champion"] is None
    assert m1["champion"]["split"] == "validation"
    assert m1["champion"]["challenger_reward"] == pytest.approx(_val(first["report"]))
    assert m1["champion"]["challenger_test_reward"] == pytest.approx(_reward(first["report"], "router"))
    assert store.read_json(CHAMPION_PATH)["router"] == router_dir(m1["router"])
    r_a = _val(first["report"])
    png = tmp_path / "labels.png"
    res = CliRunner().invoke(app, ["inspect", store.url, "--plot", str(png)])
    assert res.exit_code == 0 and f"plot: {png}" in " ".join(res.output.split()), res.output
    assert png.read_bytes()[:4] == b"\x89PNG"

    _set_router(path, router_b)
    second = relabel_flow(str(path)).model_dump(mode="json")
    m2 = second["manifest"]
    r_b = _val(second["report"])
    assert m2["flow"] == "relabel" and _computed(m2) == 0 and m2["labels"] == m1["labels"]
    assert m2["router"] != m1["router"]
    c2 = m2["champion"]
    assert (c2["challenger_reward"], c2["champion_reward"]) == pytest.approx((r_b, r_a))
    assert c2["decision"] == ("promoted" if r_b >= r_a else "kept")  # a tie promotes
    champ2 = m2["router"] if r_b >= r_a else m1["router"]
    assert store.read_json(CHAMPION_PATH)["router"] == router_dir(champ2)

    _set_router(path, router_a)  # back to A, through the CLI this time
    res = CliRunner().invoke(app, ["relabel", str(path), "--json"])
    assert res.exit_code == 0, res.output
    # the JSON document is one line; a shared Ray session may print actor logs around it
    m3 = json_doc(res.output)["manifest"]
    assert m3["router"] == m1["router"] and _computed(m3) == 0
    c3 = m3["champion"]
    if champ2 == m2["router"]:  # B is the champion: A challenges it on the same validation slice
        assert (c3["challenger_reward"], c3["champion_reward"]) == pytest.approx((r_a, r_b))
        assert c3["decision"] == ("promoted" if r_a >= r_b else "kept")
        champ3 = m1["router"] if r_a >= r_b else m2["router"]
    else:  # A is the champion already: the same router again is no challenger
        assert (c3["decision"], c3["champion"]) == ("kept", m1["router"])
        champ3 = m1["router"]
    assert store.read_json(CHAMPION_PATH)["router"] == router_dir(champ3)

    # remove expert b through the CLI, relabel: nothing computed; the champion is measured on the new labels,
    # restricted to the experts that are left (only a), so both routers always pick a: a tie on the validation
    # slice (expert a's reward there), which promotes. Any router ties, so the challenger is B's cheap kind.
    _set_router(path, router_b)
    res = CliRunner().invoke(app, ["experts", "remove", str(path), "--name", "b"])
    assert res.exit_code == 0, res.output
    assert [e["name"] for e in yaml.safe_load(path.read_text())["experts"]] == ["a"]
    fourth = relabel_flow(str(path)).model_dump(mode="json")
    m4 = fourth["manifest"]
    assert _computed(m4) == 0 and m4["labels"] != m1["labels"]
    c4 = m4["champion"]
    r_only_a = _val(fourth["report"])
    assert (c4["challenger_reward"], c4["champion_reward"]) == pytest.approx((r_only_a, r_only_a))
    assert (c4["decision"], c4["champion"], c4["compared_on"], c4["split"]) == ("promoted", champ3, m4["labels"],
                                                                               "validation")
    assert store.read_json(CHAMPION_PATH)["router"] == router_dir(m4["router"])
    saved = json.loads((tmp_path / "store" / "runs" / m4["run_id"] / "manifest.json").read_text())
    assert saved["champion"] == c4 and saved["flow"] == "relabel"
