"""What a person reads: the evaluation's tables keep to 100 columns however long the expert names are, and the
abbreviated names are listed in full."""

import io

from rich.console import Console

from flows.report import _show_cost, _show_report, short_names
from schemas.evaluation import CostCurve, CurvePoint, EvalReport, PerTag, StrategyRow

EXPERTS = ["org/qwen2.5-coder-7b-instruct", "meta-llama/Llama-3.1-70B-Instruct", "mistralai/Mistral-7B-v0.3"]


def _report() -> EvalReport:
    names = ["router", f"best_single ({EXPERTS[0]})", "rm_ranking", *[f"expert:{e}" for e in EXPERTS],
             "tag-lookup", "cluster-lookup", "knn", "random", "oracle"]
    rows = [StrategyRow(strategy=s, reward=0.5, rm={"judge": 0.4, "exact": 0.3, "rm": 0.2}, expert_calls=1,
                        rm_calls=0, mtr=1.5, first=0.5) for s in names]
    point = CurvePoint(cost=2.0, reward=0.5, lam=0.0, share={e: 1 / 3 for e in EXPERTS})
    curve = CostCurve(costs=dict(zip(EXPERTS, [7.0, 70.0, 7.0], strict=True)), router=[point],
                      experts={e: CurvePoint(cost=c, reward=0.4) for e, c in zip(EXPERTS, [7.0, 70.0, 7.0],
                                                                               strict=True)},
                      random_mix=[point], aiq={"router": 0.5, "random_mix": 0.4}, target=0.4,
                      cost_to_target={"router": 2.0, "random_mix": 5.0, "best_single": 7.0}, operating=point)
    return EvalReport(evaluation="e", labels="l", router="r", experts=EXPERTS, test_queries=10,
                      best_single=EXPERTS[0], rows=rows, router_share={e: 1 / 3 for e in EXPERTS}, curve=curve,
                      per_tag=PerTag(tags=["math", "writing", "coding"], n=[3, 3, 4], strategies={
                          f"expert:{EXPERTS[1]}": {"math": 0.1, "writing": 0.2, "coding": 0.3, "tag_average": 0.2}}))


def test_tables_fit_100_columns_with_long_expert_names():
    for width in (150, 100):  # a CI log (150, as the CLI prints there) and a 100-column terminal
        buf = io.StringIO()
        c = Console(file=buf, width=width)
        _show_report(c, _report())
        _show_cost(c, _report())
        lines = buf.getvalue().splitlines()
        tables = [ln for ln in lines if ln[:1] in "┏┃┡│└"]
        assert tables and max(len(ln) for ln in tables) <= 100
        text = buf.getvalue()
        assert "Llama-3.1-70B… = meta-llama/Llama-3.1-70B-Instruct" in " ".join(text.split())  # the legend
        assert not [ln for ln in tables if "meta-llama/" in ln or "Instruct" in ln]  # labels in the tables
        assert "Llama-3.1-70B… 33%" in text  # the router's shares, by label


def test_short_names_keep_short_names_and_never_clash():
    assert short_names(["a", "org/b"]) == {"a": "a", "org/b": "b"}
    labels = short_names(["x/averyveryverylongname-1", "y/averyveryverylongname-2"])
    assert len(set(labels.values())) == 2 and all(len(v) <= 14 for v in labels.values())
