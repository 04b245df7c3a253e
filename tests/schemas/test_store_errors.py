"""Store problems are one line naming the store or the object and how to repair it, never a traceback (issue 15):
a store that is a file, one the OS refuses to write (read-only filesystem, no permission), `s3://` without a
bucket, a corrupted champion record, run manifest or evaluation report. At the Store boundary, and through the CLI
(`run`, `validate`, `inspect`, `evaluate`, `route`, `import-scores`, `export`)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from schemas.artifacts import CHAMPION_PATH, report_path, run_manifest_path
from schemas.errors import ArtifactError, ConfigError, StoreRejected
from schemas.evaluation import Champion
from schemas.manifest import RunManifest
from schemas.store import Store

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(args: list[str], code: int = 2) -> str:
    """Run the CLI; it must exit with `code` and print exactly one `error:` line, no traceback. Returns the line."""
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, AssertionError)
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


# --- the Store boundary -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("url,match", [
    ("", r"store '': must not be empty"),
    ("s3://", r"store 's3://': 's3://' names no bucket \(use s3://bucket/prefix\)"),
    ("s3:///prefix", r"names no bucket"),
    ("gs://", r"'gs://' names no bucket \(use gs://bucket/prefix\)"),
])
def test_urls_without_a_place_are_refused(url, match):
    with pytest.raises(ConfigError, match=match):
        Store(url)


def test_file_urls_and_plain_paths_are_fine(tmp_path):
    assert Store(f"file://{tmp_path}").local and Store(str(tmp_path / "new")).local


def test_a_file_where_the_store_belongs(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreRejected, match=rf"store {tmp_path}/f: a file, not a directory; give a directory"):
        Store(str(tmp_path / "f"))
    with pytest.raises(StoreRejected, match=rf"store {tmp_path}/f/a/b: a file, not a directory \({tmp_path}/f is "
                                            "in the way\\)"):
        Store(str(tmp_path / "f" / "a" / "b"))


@pytest.mark.parametrize("code,fix", [(errno.EACCES, "make it writable for this user"),
                                      (errno.EROFS, "read-only filesystem"), (errno.ENOSPC, "the disk is full")])
def test_the_os_refusing_a_write_is_one_line_and_still_an_oserror(tmp_path, monkeypatch, code, fix):
    """As root, permissions do not stop writes: the refusal is injected where the Store meets the OS."""
    def refuse(target, *_a):
        raise OSError(code, os.strerror(code), target)

    store = Store(str(tmp_path))
    monkeypatch.setattr(Store, "_put_local", staticmethod(refuse))
    with pytest.raises(StoreRejected) as e:
        store.write_json("runs/r1/manifest.json", {})
    msg = str(e.value)
    assert msg.startswith(f"store {tmp_path}: cannot write runs/r1/manifest.json ({os.strerror(code)}: ")
    assert fix in msg and "\n" not in msg
    assert isinstance(e.value, OSError)  # lease heartbeats tolerate a failing store call


def test_not_found_and_already_exists_keep_their_meaning(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nothing.json")
    store.create("once", b"1")
    with pytest.raises(FileExistsError):  # leases and shard appends rely on it
        store.create("once", b"2")


def test_corrupted_parquet_stays_an_artifact_error(tmp_path):
    (tmp_path / "c.parquet").write_bytes(b"PAR1 garbage PAR1")
    with pytest.raises(ArtifactError, match="unreadable Parquet"):
        Store(str(tmp_path)).read_schema("c.parquet")


def test_check_writable_names_the_store(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "new" / "store"))
    store.check_writable()  # nearest existing folder (tmp_path) is writable
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) != str(tmp_path))
    with pytest.raises(StoreRejected, match=rf"store {tmp_path}/new/store: {tmp_path} is not writable \(Permission "
                                            r"denied\); make it writable for this user or choose another store"):
        store.check_writable()


def test_read_model_names_the_object(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("c.json", b"{oops")
    with pytest.raises(ArtifactError, match=r"c\.json: broken \(Invalid JSON: .*\), fix it$"):
        store.read_model("c.json", Champion, "broken ({why}), fix it")
    store.write_bytes("c.json", b"\xff\xfe")
    with pytest.raises(ArtifactError, match=r"c\.json: broken"):
        store.read_model("c.json", Champion, "broken ({why}), fix it")
    with pytest.raises(ArtifactError, match=r"other\.json: missing$"):
        store.read_model("other.json", Champion, "broken ({why})")


# --- through the CLI --------------------------------------------------------------------------------------------

def _champion(store: Store) -> None:
    store.write_json(CHAMPION_PATH, Champion(router="routers/r1", evaluation="evaluations/e1", labels="l1",
                                             experts=["a", "b"], reward=0.5, run_id="run-1",
                                             published="2026-01-01T00:00:00+00:00").model_dump(mode="json"))


def _manifest(store: Store, run_id: str = "run-1") -> None:
    store.write_json(run_manifest_path(run_id), RunManifest(run_id=run_id, flow="label", status="completed",
                                                            config={}).model_dump(mode="json"))


@pytest.fixture
def queries_file(tmp_path) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"text": "What is 2 + 3?"}) + "\n")
    return path


@pytest.mark.parametrize("command", [
    ["inspect", "--store", "{file}"], ["evaluate", "--store", "{file}"], ["export", "--store", "{file}", "--output",
                                                                          "{tmp}/out.parquet"],
    ["route", "--store", "{file}", "--input", "{queries}", "--output", "{tmp}/out.jsonl"],
    ["import-scores", "{tmp}/scores.jsonl", "--store", "{file}"],
])
def test_a_store_that_is_a_file(tmp_path, queries_file, command):
    (tmp_path / "store").write_text("a file\n")
    (tmp_path / "scores.jsonl").write_text(json.dumps({"query": "Hi?", "expert": "a", "score": 1.0}) + "\n")
    args = [a.format(file=tmp_path / "store", tmp=tmp_path, queries=queries_file) for a in command]
    line = one_error(args)
    assert f"store {tmp_path}/store: a file, not a directory" in line
    assert (tmp_path / "store").read_text() == "a file\n" and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", [["inspect", "--store", "s3://"], ["evaluate", "--store", "s3:///x"],
                                     ["import-scores", "{tmp}/scores.jsonl", "--store", "s3://"]])
def test_s3_without_a_bucket(tmp_path, command):
    (tmp_path / "scores.jsonl").write_text(json.dumps({"query": "Hi?", "expert": "a", "score": 1.0}) + "\n")
    line = one_error([a.format(tmp=tmp_path) for a in command])
    assert "names no bucket (use s3://bucket/prefix)" in line


@pytest.mark.parametrize("raw", [b"", b"{not json", b'{"router": 3}', b"\xff\xfe\x00", b"[]"])
@pytest.mark.parametrize("command", [["evaluate"], ["inspect"], ["route", "--input", "{queries}", "--output",
                                                                 "{tmp}/out.jsonl"]])
def test_corrupted_champion_record(tmp_path, queries_file, raw, command):
    store = Store(str(tmp_path / "store"))
    _manifest(store)
    store.write_bytes(CHAMPION_PATH, raw)
    before = snapshot(tmp_path / "store")
    line = one_error([*[a.format(tmp=tmp_path, queries=queries_file) for a in command], "--store", store.url])
    assert f"{store.url}/champion.json: corrupted champion record (" in line
    assert "delete it and rerun `zooter train`/`zooter run`, or restore it from a run manifest" in line
    assert snapshot(tmp_path / "store") == before and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("raw", [b"{not json", b'{"run_id": "run-2"}', b"\x00\x01"])
@pytest.mark.parametrize("command", [["inspect"], ["export", "--output", "{tmp}/out.parquet"]])
def test_corrupted_run_manifest(tmp_path, raw, command):
    store = Store(str(tmp_path / "store"))
    _manifest(store)
    store.write_bytes(run_manifest_path("run-2"), raw)
    line = one_error([*[a.format(tmp=tmp_path) for a in command], "--store", store.url])
    assert f"{store.url}/runs/run-2/manifest.json: corrupted run manifest (" in line
    assert "delete the folder runs/run-2" in line and not (tmp_path / "out.parquet").exists()


def test_corrupted_evaluation_report(tmp_path):
    store = Store(str(tmp_path / "store"))
    _champion(store)
    store.write_bytes(report_path("e1"), b'{"rows": 3')
    line = one_error(["evaluate", "--store", store.url])
    assert f"{store.url}/evaluations/e1/report.json: not an evaluation report (Invalid JSON" in line
    assert "delete the folder evaluations/e1 to recompute it" in line


def test_run_and_validate_refuse_an_unwritable_store_before_any_model(tiny_config, monkeypatch):
    """`validate` rejects what `run` would: a store this process cannot write (injected: root writes anywhere)."""
    path = tiny_config()
    store = path.parent / "store"
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) != str(path.parent) and real(p, mode, **kw))
    for command in ("validate", "run"):
        line = one_error([command, str(path)])
        assert line == (f"error: store {store}: {path.parent} is not writable (Permission denied); make it writable "
                        "for this user or choose another store")
    assert not store.exists()


def test_import_scores_into_a_store_the_os_refuses(tmp_path, monkeypatch):
    table = tmp_path / "scores.jsonl"
    table.write_text(json.dumps({"query": "Hi?", "expert": "a", "score": 1.0}) + "\n")

    def refuse(target, *_a):
        raise PermissionError(errno.EACCES, "Permission denied", target)

    monkeypatch.setattr(Store, "_put_local", staticmethod(refuse))
    line = one_error(["import-scores", str(table), "--store", str(tmp_path / "store")])
    assert line.startswith(f"error: store {tmp_path}/store: cannot create queries/shard-00000.parquet (Permission "
                           "denied: ")


def _read_only_mounts() -> bool:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind / /mnt && umount /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _read_only_mounts(), reason="needs `unshare -m` and bind mounts (a private mount namespace)")
def test_a_real_read_only_store(tmp_path, queries_file):
    """A store on a read-only bind mount, in a private mount namespace (so it works as root and leaks nothing):
    `validate` and `import-scores` refuse it up front (before reading the scores); the store is left as it was."""
    from tests.tasks.test_preflight import config

    cfg = config(tmp_path)  # fake model dirs: validate reads their config.json only
    store = Path(cfg.store.url)
    _manifest(Store(str(store)))
    before = snapshot(store)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    (tmp_path / "scores.jsonl").write_text(json.dumps({"query": "Hi?", "expert": "a", "score": 1.0}) + "\n")
    cli = f"{sys.executable} -m flows.cli"
    script = (f"mount --bind {store} {store} && mount -o remount,bind,ro {store} && "
              f"{{ {cli} validate {tmp_path}/c.yaml; echo rc=$?; "
              f"{cli} import-scores {tmp_path}/scores.jsonl --store {store}; echo rc=$?; "
              f"{cli} inspect --store {store} --json > /dev/null; echo rc=$?; }}")
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"HF_HUB_OFFLINE": "1"})
    codes = [line for line in res.stdout.splitlines() if line.startswith("rc=")]
    assert codes == ["rc=2", "rc=2", "rc=0"], res.stdout + res.stderr  # reading a read-only store is fine
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: store {store}: {store} is not writable (Read-only file system); it is on a read-only filesystem: "
        "choose another store"] * 2, res.stderr
    assert "Traceback" not in res.stderr and snapshot(store) == before


def test_a_file_where_a_store_folder_belongs(tmp_path):
    """Not mistaken for "the cell exists" (what FileExistsError means to `create` and the leases)."""
    store = Store(str(tmp_path))
    (tmp_path / "queries").write_text("x")
    for write in (store.write_bytes, store.create):
        with pytest.raises(StoreRejected, match=rf"store {tmp_path}: cannot (write|create) queries/shard-00000"
                                                rf"\.parquet \(Not a directory: {tmp_path}/queries\); a file is in "
                                                "the way"):
            write("queries/shard-00000.parquet", b"x")
