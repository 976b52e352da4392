"""Pull ClamAV signature databases from the tower's mirror and reload clamd when they change.

The mirror serves ``index.json`` (``{"files": {name: sha256}}``) beside the database files.
Files are written atomically (temp file, fsync, rename), checked against the index, and a file
this tool wrote earlier that has left the index is removed. clamd is told to RELOAD only when
something changed, and never with ``--no-reload`` (a tower with the official databases: clamd
reloads only in the monitor's windows, mailtower.scand.clamav_apply, which loads these files
too). The official databases' files (.cvd, .cld) are never written or removed here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import sys
import urllib.request
from pathlib import Path

from mailtower.scand.errors import SignatureSyncError

log = logging.getLogger("mailtower.scand.sigsync")
STATE = ".mailtower-sigsync.json"  # names this tool manages in the database directory
OFFICIAL_SUFFIXES = (".cvd", ".cld", ".cud", ".cdiff")  # scand's /clamav/apply alone installs


def _fetch(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.read()
    except OSError as exc:
        raise SignatureSyncError(f"{url}: {exc}; is the monitor's mirror up?") from exc


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    tmp.chmod(0o644)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def sync(mirror: str, directory: Path, timeout: float = 10.0) -> list[str]:
    """Make ``directory`` match the mirror; return the names that changed."""
    try:
        index = json.loads(_fetch(f"{mirror}/index.json", timeout))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureSyncError(f"{mirror}/index.json is not a signature index: {exc}") from exc
    changed: list[str] = []
    for name, digest in sorted(index.items()):
        if "/" in name or name.startswith("."):
            raise SignatureSyncError(f"{mirror}/index.json names an unsafe file: {name!r}")
        if name.endswith(OFFICIAL_SUFFIXES):
            raise SignatureSyncError(
                f"{mirror}/index.json names {name!r}, an official database file: those reach "
                "clamd through the monitor's windows (POST /clamav/apply), never through sigsync"
            )
        target = directory / name
        if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == digest:
            continue
        data = _fetch(f"{mirror}/{name}", timeout)
        if hashlib.sha256(data).hexdigest() != digest:
            raise SignatureSyncError(
                f"{mirror}/{name}: content does not match index.json; not installed"
            )
        _write_atomic(target, data)
        changed.append(name)
    state_path = directory / STATE
    managed = set(json.loads(state_path.read_text())) if state_path.exists() else set()
    for name in sorted(managed - set(index)):
        if name.endswith(OFFICIAL_SUFFIXES) or "/" in name:
            continue  # never an official database's file (nor outside the directory)
        (directory / name).unlink(missing_ok=True)
        changed.append(name)
    _write_atomic(state_path, json.dumps(sorted(index)).encode())
    return changed


def reload_clamd(sock_path: str, timeout: float = 10.0) -> bool:
    """Ask clamd to reload its databases; False when clamd is not running."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(sock_path)
            sock.sendall(b"zRELOAD\0")
            return sock.recv(64).rstrip(b"\0\n") == b"RELOADING"
    except OSError:
        return False


ICAP_RELOAD = b"clamav:dbreload"  # c-icap's clamav_mod command (virus_scan has none)


def reload_icap(control: str) -> bool:
    """Ask c-icap's clamav module (libclamav, what virus_scan scans with) to reload its
    databases through c-icap's command pipe; False when c-icap is not running (no reader on
    the pipe) or has no such pipe. Proven against the lab's c-icap:
    tests/infra/test_scanner.py::test_c_icap_takes_new_signatures_without_restart."""
    try:
        # Non-blocking: a pipe nobody reads would otherwise hang the sync forever.
        fd = os.open(control, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        os.write(fd, ICAP_RELOAD)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailtower-sigsync", description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", required=True, help="base URL of the mirror's clamav folder")
    parser.add_argument("--dir", type=Path, default=Path("/var/lib/clamav"))
    parser.add_argument("--clamd", default="/run/clamav/clamd.ctl", help="clamd's local socket")
    parser.add_argument(
        "--icap-control", help="c-icap's command pipe, when c-icap scans with these signatures"
    )
    parser.add_argument(
        "--no-reload",
        action="store_true",
        help="write the files only: clamd reloads in the monitor's windows (official databases)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    try:
        changed = sync(args.mirror.rstrip("/"), args.dir)
    except SignatureSyncError as exc:
        log.error("sync failed: %s", exc)
        return 1
    if changed and args.no_reload:
        log.info("updated=%s reload=next-window", ",".join(changed))
    elif changed:
        reloaded = reload_clamd(args.clamd)
        icap = reload_icap(args.icap_control) if args.icap_control else None
        log.info(
            "updated=%s clamd_reload=%s%s",
            ",".join(changed),
            "yes" if reloaded else "not-running",
            "" if icap is None else f" icap_reload={'yes' if icap else 'not-running'}",
        )
    else:
        log.info("signatures up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
