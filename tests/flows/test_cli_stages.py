"""`zooter run`'s stage table: every stage of the manifest, startup as the command's time outside the flow."""

from rich.console import Console

from flows.report import stage_table, stage_times
from schemas.manifest import RunManifest, StageRecord


def _manifest() -> RunManifest:
    return RunManifest(run_id="r1", flow="label", timings={"total_s": 100.0, "aggregate_s": 2.5},
                       generate=[StageRecord(name="a", fingerprint="fa", seconds=40.0),
                                 StageRecord(name="b", fingerprint="fb", seconds=55.0)],
                       score=[StageRecord(name="judge", fingerprint="fj", seconds=30.0)],
                       embed=StageRecord(name="enc", fingerprint="fe", seconds=3.0))


def test_stage_times_lists_every_stage_and_startup():
    rows = dict(stage_times(_manifest(), wall_s=130.0))
    assert rows == {"startup (preflight, Prefect, Ray)": 30.0, "generate a": 40.0, "generate b": 55.0,
                    "score judge": 30.0, "embed": 3.0, "aggregate": 2.5, "flow total": 100.0,
                    "command total": 130.0}
    assert "startup (preflight, Prefect, Ray)" not in dict(stage_times(_manifest()))


def test_stage_table_renders_seconds():
    c = Console(record=True, width=100)
    c.print(stage_table(_manifest(), wall_s=130.0))
    text = c.export_text()
    assert "generate b" in text and "55.0" in text and "130.0" in text
