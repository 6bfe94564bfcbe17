"""Writes that survive a kill: files and folders flushed to disk before a rename publishes them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk (a rename must never publish data still in the page cache)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename `tmp` onto `path`; a `path` already there is moved aside first and deleted after."""
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Write a folder atomically: yields a temporary sibling, renamed onto `path` only on success.

    An interrupted or failing write leaves any previous `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, path)


def replace_file(path: Path, text: str) -> None:
    """Replace the file `path` by one holding `text`, atomically: written to a hidden sibling, flushed
    to disk, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_synced(tmp, text)
    os.replace(tmp, path)


def _delete_dir(path: Path) -> None:
    """Delete a checkpoint folder: renamed to a hidden name first, so an interrupted deletion never
    leaves a half-deleted folder under its step-NNNNNN name."""
    hidden = path.with_name(f".{path.name}.deleting{os.getpid()}")
    try:
        path.rename(hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden, ignore_errors=True)
