"""route_file on a tiny fake router: every record comes back as written, in JSONL, CSV and Parquet, with `expert`
and `probs`; the output location is checked before the router runs; errors, signals and permissions leave nothing
half-written; the champion."""

import csv
import datetime as dt
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.artifacts import CHAMPION_PATH, ROUTER_JSON, report_path, router_file
from schemas.errors import ArtifactError, ConfigError, InputError
from schemas.evaluation import EvalReport
from schemas.store import Store
from tasks.route import Fallback, RoutingPolicy, champion, choose, route_file

ROOT = Path(__file__).resolve().parents[2]


class FakeRouter:
    """Sends texts that mention "math" to `calc`, the rest to `bard` (probability 0.8)."""

    experts = ["bard", "calc"]

    def __init__(self):
        self.batches: list[int] = []

    def probs(self, texts: list[str]) -> np.ndarray:
        self.batches.append(len(texts))
        return np.array([[0.2, 0.8] if "math" in t else [0.8, 0.2] for t in texts])


RECORDS = [{"id": i, "q": t} for i, t in enumerate(["math: 2+2?", "a poem", "more math", "a story", "math again"])]


def write(path: Path, records=RECORDS) -> Path:
    """JSONL as JSON, CSV as text (csv module, header = the union of keys), Parquet via pyarrow."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".csv":
        names = list(dict.fromkeys(k for r in records for k in r))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, names, lineterminator="\n")
            w.writeheader()
            w.writerows(records)
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


def read(path: Path) -> list[dict]:
    """The records exactly as stored: JSON values, CSV text, Parquet values."""
    if path.suffix == ".jsonl":
        return [json.loads(ln) for ln in path.read_text().splitlines()]
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return pq.read_table(path).to_pylist()


def probs_of(rec: dict) -> dict:
    return json.loads(rec["probs"]) if isinstance(rec["probs"], str) else rec["probs"]  # CSV: a JSON string


@pytest.mark.parametrize("src_ext", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("dst_ext", [".jsonl", ".csv", ".parquet"])
def test_every_record_comes_back_with_its_expert_and_probs(tmp_path, src_ext, dst_ext):
    router = FakeRouter()
    src, dst = write(tmp_path / f"in{src_ext}"), tmp_path / "out" / f"routed{dst_ext}"
    assert route_file(router, src, "q", dst, batch_size=2) == 5
    assert router.batches == [2, 2, 1]
    out = read(dst)
    text_ids = ".csv" in (src_ext, dst_ext)  # CSV holds text: ids read from or written to it are text
    assert [(r["id"], r["q"]) for r in out] == [(str(r["id"]) if text_ids else r["id"], r["q"]) for r in RECORDS]
    assert [r["expert"] for r in out] == ["calc", "bard", "calc", "bard", "calc"]
    assert probs_of(out[0]) == {"bard": pytest.approx(0.2), "calc": pytest.approx(0.8)}
    assert list(out[0]) == ["id", "q", "expert", "probs"]
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name]  # the temp file was renamed into place


@pytest.mark.parametrize("dst_ext", [".jsonl", ".csv", ".parquet"])
def test_a_field_only_later_records_carry_survives(tmp_path, dst_ext):
    records = [*RECORDS[:4], {"id": 4, "q": "last", "note": "only here"}]
    dst = tmp_path / f"out{dst_ext}"
    route_file(FakeRouter(), write(tmp_path / "in.jsonl", records), "q", dst, batch_size=2)
    out = read(dst)
    assert out[4]["note"] == "only here"
    if dst_ext == ".jsonl":  # JSON keeps each record's own fields
        assert "note" not in out[0]
    else:  # a table has one set of columns: earlier rows get an empty cell
        assert out[0]["note"] == ("" if dst_ext == ".csv" else None) and list(out[0])[:3] == ["id", "q", "note"]


@pytest.mark.parametrize("dst_ext", [".jsonl", ".csv", ".parquet"])
def test_csv_cells_stay_text_as_written(tmp_path, dst_ext):
    src = tmp_path / "in.csv"
    src.write_text('zip,q,price\n02134,"math, line one\nline two",1.50\n007,a poem,\n')
    dst = tmp_path / f"out{dst_ext}"
    route_file(FakeRouter(), src, "q", dst)
    out = read(dst)
    assert [(r["zip"], r["q"], r["price"]) for r in out] == [("02134", "math, line one\nline two", "1.50"),
                                                             ("007", "a poem", "")]


def test_parquet_types_are_kept(tmp_path):
    table = pa.table({"q": ["math", "poem"], "day": [dt.date(2024, 1, 2), None], "x": pa.array([1, 2], pa.int8()),
                      "tags": [["a"], []], "meta": [{"k": 1.5}, {"k": None}]})
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, src)
    route_file(FakeRouter(), src, "q", dst)
    back = pq.read_table(dst)
    assert back.schema.names == [*table.schema.names, "expert", "probs"]
    assert back.select(table.schema.names).equals(table)
    assert back.schema.field("probs").type == pa.struct([("bard", pa.float64()), ("calc", pa.float64())])


def test_mixed_json_types_stay_in_jsonl_and_are_an_error_for_parquet(tmp_path):
    src = write(tmp_path / "in.jsonl", [{"q": "a", "v": 1}, {"q": "b", "v": 2.5}, {"q": "c", "v": "x"}])
    route_file(FakeRouter(), src, "q", tmp_path / "out.jsonl")
    assert [r["v"] for r in read(tmp_path / "out.jsonl")] == [1, 2.5, "x"]
    router = FakeRouter()
    with pytest.raises(InputError, match=r"in.jsonl:3: field 'v' does not fit one Parquet column .*\.jsonl output"):
        route_file(router, src, "q", tmp_path / "out.parquet", batch_size=2)
    assert router.batches == [] and not (tmp_path / "out.parquet").exists()
    src = write(tmp_path / "ok.jsonl", [{"q": "a", "v": 1}, {"q": "b", "v": 2.5}, {"q": "c"}])
    route_file(FakeRouter(), src, "q", tmp_path / "ok.parquet", batch_size=1)  # int and float: one double column
    assert [r["v"] for r in read(tmp_path / "ok.parquet")] == [1.0, 2.5, None]


@pytest.mark.parametrize("src_ext", [".jsonl", ".csv", ".parquet"])
def test_an_existing_expert_field_is_an_error_unless_overwrite(tmp_path, src_ext):
    src = write(tmp_path / f"in{src_ext}", [{"q": "a poem", "expert": "mine"}, {"q": "math", "expert": "mine"}])
    dst = tmp_path / f"out{src_ext}"
    router = FakeRouter()
    where = "in.jsonl:1" if src_ext == ".jsonl" else f"in{src_ext}"
    with pytest.raises(InputError, match=f"{where}: field 'expert' already exists; .*--overwrite"):
        route_file(router, src, "q", dst)
    assert router.batches == [] and not dst.exists()
    route_file(router, src, "q", dst, overwrite=True)
    assert [r["expert"] for r in read(dst)] == ["bard", "calc"]


def test_the_output_location_is_checked_before_the_router_runs(tmp_path):
    src = write(tmp_path / "in.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "file").write_text("x")
    router = FakeRouter()
    for dst, match in [(src, "in.jsonl: the output is the input file"),
                       (tmp_path / "dir.jsonl", "dir.jsonl: output file is a directory, not a regular file"),
                       (tmp_path / "file" / "out.jsonl",
                        r"out.jsonl: cannot write the output \(.*file is a file, not a folder\)"),
                       (tmp_path / "out.xlsx", r"out.xlsx: unsupported output file type '.xlsx'")]:
        with pytest.raises(InputError, match=match):
            route_file(router, src, "q", dst)
    (tmp_path / "link.jsonl").symlink_to(src)  # the same file under another name
    with pytest.raises(InputError, match="link.jsonl: the output is the input file"):
        route_file(router, src, "q", tmp_path / "link.jsonl")
    assert router.batches == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.jsonl", "file", "in.jsonl", "link.jsonl"]
    assert src.read_text() == "".join(json.dumps(r) + "\n" for r in RECORDS)


def test_a_router_loader_is_called_only_after_the_files_pass_their_checks(tmp_path):
    # what `zooter route` passes: loading the champion (torch) must not delay a bad file's one-line error
    loads: list[int] = []

    def load() -> FakeRouter:
        loads.append(1)
        return FakeRouter()

    src = write(tmp_path / "in.jsonl", [{"q": "a poem", "expert": "mine"}])
    with pytest.raises(InputError, match="field 'expert' already exists"):
        route_file(load, src, "q", tmp_path / "out.jsonl")
    assert loads == []
    assert route_file(load, write(tmp_path / "ok.jsonl"), "q", tmp_path / "out.jsonl") == len(RECORDS)
    assert loads == [1] and [r["expert"] for r in read(tmp_path / "out.jsonl")][0] == "calc"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_fails_before_routing(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    router = FakeRouter()
    with pytest.raises(InputError, match=r"ro/out.jsonl: cannot write the output \(.*Permission denied"):
        route_file(router, write(tmp_path / "in.jsonl"), "q", ro / "out.jsonl")
    assert router.batches == []


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_an_empty_input_gives_a_valid_empty_file(tmp_path, ext):
    src = tmp_path / f"in{ext}"
    {".jsonl": lambda: src.write_text("\n"), ".csv": lambda: src.write_text("id,q\n"),
     ".parquet": lambda: pq.write_table(pa.table({"id": pa.array([], pa.int64()), "q": pa.array([], pa.string())}),
                                        src)}[ext]()
    dst = tmp_path / f"out{ext}"
    assert route_file(FakeRouter(), src, "q", dst) == 0
    if ext == ".parquet":
        back = pq.read_table(dst)
        assert back.num_rows == 0 and back.schema.names == ["id", "q", "expert", "probs"]
    else:
        assert dst.read_bytes() == (b"" if ext == ".jsonl" else b"id,q,expert,probs\r\n")


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    src = write(tmp_path / "in.jsonl")
    old = os.umask(0o027)
    try:
        route_file(FakeRouter(), src, "q", tmp_path / "new.jsonl")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.jsonl").stat().st_mode) == 0o640
    kept = tmp_path / "kept.parquet"
    kept.write_text("old")
    kept.chmod(0o604)
    route_file(FakeRouter(), src, "q", kept)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and pq.read_table(kept).num_rows == 5


SLOW_ROUTE = """
import faulthandler, signal, sys, time
# As a shell starts it: nothing blocked, SIGINT not ignored. Both are inherited across exec, and late in a full run a
# pytest-xdist worker twice started this process with SIGINT lost (it routed on; SIGTERM still worked).
signal.pthread_sigmask(signal.SIG_SETMASK, set())
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
faulthandler.register(signal.SIGUSR1)  # the test asks for every thread's stack when the process outlives a signal
from tasks.route import route_file

class Slow:
    experts = ["a", "b"]

    def probs(self, texts):
        print("routing", flush=True)
        time.sleep(0.5)
        return np.full((len(texts), 2), 0.5)

route_file(Slow(), sys.argv[1], "q", sys.argv[2], batch_size=1)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_routing_leaves_no_temp_file(tmp_path, sig):
    src = write(tmp_path / "in.jsonl", [{"q": f"query {i}"} for i in range(100)])
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ROUTE, str(src), str(out / "routed.parquet")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "routing\n", proc.stderr.read()
        assert [p.name for p in out.iterdir()][0].startswith(".routed.parquet.")  # the temp file is there
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            proc.kill()
            pytest.fail(f"still running 30 s after {sig.name}; its stacks and output:\n"
                        f"{proc.communicate()[1][-6000:]}")
    finally:
        proc.kill()
    assert proc.returncode in (128 + sig, -sig)  # SystemExit(128 + n), or Python's re-raised SIGINT
    assert list(out.iterdir()) == []


def test_a_bad_record_names_its_line_and_the_router_never_runs(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"q": "fine"}\n\n{"q": "\\u200b \\u2060"}\n')
    router = FakeRouter()
    with pytest.raises(InputError, match=r"in.jsonl:3: field 'q' must be a non-empty string with a visible"):
        route_file(router, src, "q", tmp_path / "out.jsonl")
    csv_src = tmp_path / "in.csv"
    csv_src.write_text('id,q\n1,"two\nlines"\n2,\n')
    with pytest.raises(InputError, match=r"in.csv:4: field 'q'"):  # line 1 is the header, the record 2-3
        route_file(router, csv_src, "q", tmp_path / "out.csv")
    with pytest.raises(InputError, match=r"in.csv: no field 'text' \(fields: id, q\) \(--text-field\)"):
        route_file(router, csv_src, "text", tmp_path / "out.csv")
    pq.write_table(pa.table({"q": [1]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"in.parquet: field 'q' is int64, not text"):
        route_file(router, tmp_path / "in.parquet", "q", tmp_path / "out.csv")
    assert router.batches == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "in.jsonl", "in.parquet"]


@pytest.mark.parametrize(("src", "match"), [
    ("in.txt", "in.txt: unsupported input file type '.txt'"),
    ("missing.jsonl", "missing.jsonl: input file not found"),
    ("fifo.jsonl", "fifo.jsonl: input file is a FIFO, not a regular file"),
])
def test_input_file_errors(tmp_path, src, match):
    (tmp_path / "in.txt").write_text('{"q": "x"}\n')
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(InputError, match=match):
        route_file(FakeRouter(), tmp_path / src, "q", tmp_path / "out.jsonl")


def test_a_store_without_a_champion_says_so(tmp_path):
    with pytest.raises(ArtifactError, match=f"{CHAMPION_PATH}: the store has no champion router"):
        champion(Store(str(tmp_path)))


# --- choose: cost-aware routing ----------------------------------------------------------------------------------

P = np.array([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2], [0.5, 0.5, 0.0]])


def test_choose_without_costs_or_lambda_is_argmax():
    assert choose(P, None, 0.5).tolist() == [0, 0, 0]  # ties (rows 2, 3) go to the first, as argmax
    assert choose(P, np.array([10.0, 1.0, 0.0]), 0.0).tolist() == [0, 0, 0]


def test_choose_trades_probability_for_cost():
    costs = np.array([10.0, 5.0, 0.0])  # scaled by the largest: 1.0, 0.5, 0.0
    # lam 0.2: row 1 scores 0.4, 0.2, 0.1 -> 0; row 2: 0.2, 0.3, 0.2 -> 1; row 3: 0.3, 0.4, 0.0 -> 1
    assert choose(P, costs, 0.2).tolist() == [0, 1, 1]
    assert choose(P, costs, 100.0).tolist() == [2, 2, 2]  # a large lam always takes the free expert
    assert choose(P, costs * 1000, 0.2).tolist() == [0, 1, 1]  # the cost unit does not matter


@pytest.mark.parametrize(("costs", "lam"), [(np.array([1.0, 2.0]), 0.1), (np.array([1.0, -1.0, 0.0]), 0.1),
                                            (np.array([1.0, np.nan, 0.0]), 0.1), (np.array([1.0, 2.0, 0.0]), -1.0)])
def test_choose_refuses_bad_costs_and_lambda(costs, lam):
    with pytest.raises(ConfigError):
        choose(P, costs, lam)


def test_route_file_with_costs_sends_unsure_queries_to_the_cheaper_expert(tmp_path):
    src, dst = write(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    costs = np.array([1.0, 4.0])  # calc costs 4x bard: at lambda 1 a 0.6 probability gap no longer pays for it
    route_file(FakeRouter(), src, "q", dst, costs=costs, lam=1.0)
    out = read(dst)
    assert [r["expert"] for r in out] == ["bard"] * 5
    assert probs_of(out[0]) == {"bard": pytest.approx(0.2), "calc": pytest.approx(0.8)}  # probs stay the router's
    route_file(FakeRouter(), src, "q", dst, costs=costs, lam=0.5)  # 0.6 - 0.5 * 0.75 > 0.2 - 0.5 * 0.25
    assert [r["expert"] for r in read(dst)] == ["calc", "bard", "calc", "bard", "calc"]


def _champion(store: Store) -> EvalReport:
    """A champion record (router r1, experts bard and calc) and its evaluation e1, without costs or a fallback;
    the router's metadata file, so that the record points at a router that exists."""
    store.write_json(router_file("r1", ROUTER_JSON), {"experts": ["bard", "calc"]})
    report = EvalReport(evaluation="e1", labels="l1", router="r1", experts=["bard", "calc"], test_queries=0,
                        best_single="calc", rows=[], router_share={})
    store.write_json(report_path("e1"), report.model_dump(mode="json"))
    store.write_json(CHAMPION_PATH, {"router": "routers/r1", "evaluation": "evaluations/e1", "labels": "l1",
                                     "experts": ["bard", "calc"], "reward": None, "run_id": "x",
                                     "published": "2026-01-01T00:00:00Z"})
    return report


def test_the_policy_reads_costs_and_lambda_from_the_champions_evaluation(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(ArtifactError, match="the store has no champion router"):
        RoutingPolicy.load(store)
    report = _champion(store)
    policy = RoutingPolicy.load(store)
    assert (policy.costs, policy.lam, policy.router_fp, policy.experts) == (None, 0.0, "r1", ["bard", "calc"])
    with pytest.raises(ConfigError, match="lambda 0.2: the champion's evaluation e1 has no expert costs"):
        RoutingPolicy.load(store, 0.2)
    report = report.model_copy(update={"costs": {"calc": 4.0, "bard": 1.0}, "lam": 0.3})
    store.write_json(report_path("e1"), report.model_dump(mode="json"))
    policy = RoutingPolicy.load(store)
    assert (policy.costs.tolist(), policy.lam) == ([1.0, 4.0], 0.3)  # in the router's expert order
    assert RoutingPolicy.load(store, 0.0).lam == 0.0  # --lambda 0 overrides the config's
    p = np.array([[0.6, 0.4], [0.3, 0.7]])
    assert policy.choose(p).tolist() == [0, 1] and policy.choose(p, lam=1.0).tolist() == [0, 0]  # 0.7 - 1 < 0.05


def test_the_policy_reads_the_champion_once_and_names_a_missing_router(tmp_path, monkeypatch):
    import tasks.route

    store = Store(str(tmp_path / "store"))
    _champion(store)
    reads: list[int] = []
    real = tasks.route.read_champion
    monkeypatch.setattr(tasks.route, "read_champion", lambda s: reads.append(1) or real(s))
    src, dst = write(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    policy = RoutingPolicy.load(store, loader=lambda s, fp: FakeRouter())
    assert route_file(policy, src, "q", dst) == len(RECORDS) and reads == [1]  # what `zooter route` does
    with pytest.raises(InputError, match=r"store/out\.jsonl: is inside the store .*/store; write the output outside"):
        route_file(policy, src, "q", tmp_path / "store" / "out.jsonl")  # foreign files in the store: refused
    assert not (tmp_path / "store" / "out.jsonl").exists()
    (tmp_path / "store" / router_file("r1", ROUTER_JSON)).unlink()  # the champion's router folder deleted
    with pytest.raises(ArtifactError, match="names router r1, which is not in the store"):
        RoutingPolicy.load(store)


# --- fallback: unsure queries go to the best single expert -------------------------------------------------------


def test_choose_falls_back_when_the_top_probability_is_below_the_threshold():
    # top probabilities 0.6, 0.4, 0.5: below 0.5 only row 2; below 0.55 rows 2 and 3
    assert choose(P, None, 0.0, Fallback(0.5, 2)).tolist() == [0, 2, 0]
    assert choose(P, None, 0.0, Fallback(0.55, 2)).tolist() == [0, 2, 2]
    assert choose(P, None, 0.0, Fallback(0.0, 2)).tolist() == [0, 0, 0]  # 0: off
    assert choose(P, np.array([10.0, 5.0, 0.0]), 0.2, Fallback(0.45, 0)).tolist() == [0, 0, 1]  # after costs
    for bad in (Fallback(0.5, 3), Fallback(1.5, 0)):
        with pytest.raises(ConfigError, match="routing.fallback_below"):
            choose(P, None, 0.0, bad)


def test_route_file_and_the_champion_carry_the_fallback(tmp_path):
    src, dst = write(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    route_file(FakeRouter(), src, "q", dst, fallback=Fallback(0.85, 1))  # every top probability is 0.8
    assert [r["expert"] for r in read(dst)] == ["calc"] * 5
    store = Store(str(tmp_path / "store"))
    report = _champion(store)
    assert RoutingPolicy.load(store).fallback is None  # the config's default: off
    assert RoutingPolicy.load(store, fallback_below=0.3).fallback == Fallback(0.3, 1)  # to the best single expert
    store.write_json(report_path("e1"), report.model_copy(update={"fallback_below": 0.4}).model_dump(mode="json"))
    assert RoutingPolicy.load(store).fallback == Fallback(0.4, 1)
    assert RoutingPolicy.load(store, fallback_below=0.0).fallback is None
