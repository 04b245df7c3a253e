"""outputs: a path a command writes for the user (`route`, `export`, `inspect --plot`), checked before any work and
written whole or not at all.

`check_output` is everything that can be known before anything is read or written: file or folder by the suffix
(an unknown suffix is refused, not taken for a folder name); an existing file is replaced only with `--overwrite`
(`replace=True`: the command's own rule, `route` replaces its output); a directory, FIFO or device where a file
goes is refused, as is a file where a folder goes; the output is none of the inputs and not inside a local store
(foreign files there would look like the store's own); the nearest existing folder above it is a folder and
writable. `write_file` / `write_folder` then write under a temporary name beside the target and rename it into
place: a new file gets the mode the umask gives (not mkstemp's 0600), a replaced one keeps its mode.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Literal

from schemas.errors import InputError

Kind = Literal["file", "folder"]


def local_root(store: object) -> Path | None:
    """A `schemas.store.Store`'s directory when it is local (outputs must not go inside it); None otherwise."""
    return Path(store.root) if store is not None and getattr(store, "local", False) else None


def _kind_of(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a file")


def output_kind(path: Path, suffixes: Sequence[str], folder: bool = False, flag: str = "--output",
                what: str = "output") -> Kind:
    """"file" when `path` ends in one of `suffixes`; "folder" when the command takes one (`folder`) and the path
    has no suffix or is an existing folder; else an InputError naming the suffixes."""
    if path.suffix in suffixes:
        return "file"
    if folder and (path.suffix == "" or path.is_dir()):
        return "folder"
    use = ", ".join(suffixes) + (" or a folder (no suffix)" if folder else "")
    got = f"type {path.suffix!r}" if path.suffix else "name without a suffix"
    raise InputError(f"{flag} {path}: unsupported {what} file {got} (use {use})".strip())


def check_output(path: Path, kind: Kind, *, overwrite: bool = False, replace: bool = False,
                 inputs: Sequence[Path] = (), store_root: str | Path | None = None, flag: str = "--output",
                 what: str = "output") -> None:
    """Refuse, before any work, an output the command could not (or must not) write; see the module docstring.
    `kind` as `output_kind` says; `store_root`: a local store's directory (None: a remote store, or none)."""
    where = f"{flag} {path}".strip()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:  # ENOTDIR: a file is in the way above it; EACCES: a folder above it is closed
        if e.errno == errno.ENOTDIR:
            p = _blocker(path)
            raise InputError(f"{where}: cannot write the {what} ({p} is {_kind_of(p.stat().st_mode)}, not a "
                             "folder)") from None
        raise InputError(f"{where}: cannot write the {what} ({e.strerror})") from None
    if st is not None:
        if kind == "file" and not stat.S_ISREG(st.st_mode):
            raise InputError(f"{where}: {what} file is {_kind_of(st.st_mode)}, not a regular file; give a file path")
        if kind == "folder" and not stat.S_ISDIR(st.st_mode):
            raise InputError(f"{where}: exists and is {_kind_of(st.st_mode)}, not a folder")
        if kind == "file" and not (overwrite or replace):
            raise InputError(f"{where}: exists; pass --overwrite to replace it")
        for src in inputs:
            with suppress(OSError):
                if os.path.samefile(src, path):
                    raise InputError(f"{where}: the output is the input file; write the {what} to another path")
    if store_root is not None:
        root = Path(store_root).resolve()
        target = path.resolve()
        if target == root or root in target.parents:
            raise InputError(f"{where}: is inside the store {root}; write the {what} outside it (files there would "
                             "look like the store's own)")
    _writable(path.parent, where, what)  # the temporary file or folder goes beside the target


def _blocker(path: Path) -> Path:
    """The nearest path above `path` that exists and is not a folder (or `path` itself)."""
    for p in reversed([path, *path.parents]):
        if p.exists() and not p.is_dir():
            return p
    return path


def _writable(folder: Path, where: str, what: str) -> None:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise InputError(f"{where}: cannot write the {what} ({p} is {_kind_of(p.stat().st_mode)}, not a folder)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(f"{where}: cannot write the {what} ({p} is not writable: {os.strerror(errno.EACCES)})")


def temp_beside(dst: Path) -> Path:
    """An empty file next to `dst`, with the mode a new file gets (umask) or, when `dst` exists, its mode."""
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:12]}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask, unlike mkstemp's 0600
    if dst.exists():
        os.chmod(tmp, stat.S_IMODE(dst.stat().st_mode))
    return tmp


@contextmanager
def made_folders(dst: Path) -> Iterator[None]:
    """Create `dst`'s missing parent folders; on failure remove the ones made here (nearest first)."""
    missing = [p for p in (dst.parent, *dst.parent.parents) if not p.exists()]
    try:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:  # mkdir met a file where a folder is needed
            raise InputError(f"{dst}: cannot write the output ({e.filename} is a file, not a folder)") from None
        except OSError as e:
            raise InputError(f"{dst}: cannot write the output ({e.filename}: {e.strerror})") from None
        yield
    except BaseException:
        for p in missing:
            with suppress(OSError):
                p.rmdir()
        raise


def write_file(dst: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a temporary file beside `dst`, then renamed to `dst`: the complete output or none."""
    with made_folders(dst):
        tmp = temp_beside(dst)
        try:
            write(tmp)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dst


def write_folder(dst: Path, write: Callable[[Path], None], replaceable: Callable[[Path], bool]) -> Path:
    """`write(tmp)` into a temporary folder beside `dst` (mode from the umask), then moved into place. An existing
    non-empty `dst` is replaced only when `replaceable(dst)` (e.g. an earlier export of the same kind); the caller
    has checked --overwrite."""
    with made_folders(dst):
        tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:12]}.tmp"
        tmp.mkdir()  # 0o777 & ~umask, unlike mkdtemp's 0700
        try:
            write(tmp)
            if dst.is_dir() and any(dst.iterdir()):
                if not replaceable(dst):
                    raise InputError(f"--output {dst}: exists and is not an earlier export of this kind; choose a "
                                     "new folder")
                old = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:12]}.old"
                os.replace(dst, old)
                os.replace(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dst)  # replaces an empty folder too
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
