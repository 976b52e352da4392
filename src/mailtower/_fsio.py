"""Atomic file writes: a file is either absent or complete under its name.

``write_durable`` also survives a power cut once it returned (fsync of the file and the
directory); ``write_atomic`` survives the writer being killed (the kernel has the data) but
not a power cut, and costs no disk flush.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_durable(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` via a temp file: write, fsync, rename, fsync the directory.

    With ``mode`` the file has that mode before it appears under ``path`` (mkstemp makes it
    0600): a reader never meets the new file with the wrong permissions.
    """
    _write_via_temp(path, data, mode=mode, sync=True)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` via a temp file and a rename, without waiting for the disk."""
    _write_via_temp(path, data, mode=mode, sync=False)


def _write_via_temp(path: Path, data: bytes, *, mode: int | None, sync: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
