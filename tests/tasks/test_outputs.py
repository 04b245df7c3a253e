"""outputs: the one output check route, export and inspect --plot share, and whole-or-nothing writes."""

import os
from pathlib import Path

import pytest

from schemas.errors import InputError
from tasks.outputs import check_output, output_kind, write_file, write_folder


def test_kind_by_suffix_and_an_unknown_suffix_is_refused(tmp_path):
    assert output_kind(tmp_path / "a.parquet", (".parquet",)) == "file"
    assert output_kind(tmp_path / "out", (".parquet",), folder=True) == "folder"
    with pytest.raises(InputError, match=r"z\.csv: unsupported output file type '\.csv' \(use \.parquet or a folder"):
        output_kind(tmp_path / "z.csv", (".parquet",), folder=True)  # not a folder named z.csv
    (tmp_path / "d.v2").mkdir()
    assert output_kind(tmp_path / "d.v2", (".parquet",), folder=True) == "folder"  # an existing folder is one


def test_checks_before_any_work(tmp_path):
    (tmp_path / "old.png").write_bytes(b"x")
    (tmp_path / "store").mkdir()
    with pytest.raises(InputError, match=r"old\.png: exists; pass --overwrite to replace it"):
        check_output(tmp_path / "old.png", "file")
    check_output(tmp_path / "old.png", "file", overwrite=True)
    with pytest.raises(InputError, match=r"is inside the store"):
        check_output(tmp_path / "store" / "sub" / "x.png", "file", store_root=tmp_path / "store")
    with pytest.raises(InputError, match=r"/dev/null: output file is a device, not a regular file"):
        check_output(Path("/dev/null"), "file", overwrite=True)
    with pytest.raises(InputError, match=r"cannot write the output \(.*old\.png is a file, not a folder\)"):
        check_output(tmp_path / "old.png" / "x.png", "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png", "store"]


def test_new_files_and_folders_follow_the_umask_replaced_ones_keep_their_mode(tmp_path):
    old = os.umask(0o027)
    try:
        new = write_file(tmp_path / "a" / "new.txt", lambda p: p.write_text("1"))
        folder = write_folder(tmp_path / "hf", lambda p: (p / "README.md").write_text("x"), lambda p: True)
    finally:
        os.umask(old)
    assert new.stat().st_mode & 0o777 == 0o640 and folder.stat().st_mode & 0o777 == 0o750  # not 0600 / 0700
    new.chmod(0o604)
    write_file(new, lambda p: p.write_text("2"))
    assert new.read_text() == "2" and new.stat().st_mode & 0o777 == 0o604


def test_a_failed_write_leaves_nothing(tmp_path):
    def boom(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file(tmp_path / "x" / "y" / "out.txt", boom)
    assert list(tmp_path.iterdir()) == []  # no temp file, no folder made for it
