"""The scanner's engines (clamd, c-icap) restarted only in the monitor's drained windows.

A new clamd.conf or c-icap.conf, or new clamav-daemon / c-icap packages, need the engines
restarted. Restarting them where the deploy or Debian's maintainer scripts do it (every
scanner at once: pyinfra runs the hosts in parallel) empties the pool: scand answers 451.
Instead they ride on scand's own rolling upgrade (mailtower.monitor.rollout.stack):

- what the engines would start with is part of scand's installed digest (``digest()``, read
  by scand.stack at every /health): the engines' configuration files and the record
  ``mailtower-engines-upgrade`` writes after it installs packages. A change makes the scanner
  "behind", and the monitor restarts its scand in a drained window, checked by health and
  the canary, a batch at a time within the pool's capacity (rollout.plan.room);
- scand's unit runs ``python -m mailtower.scand.engines refresh`` as root before every start
  (``ExecStartPre=+``: systemd's own privilege, no sudo or polkit for the unprivileged scand).
  It restarts the engines when what they would start with differs from what they last
  started with (``APPLIED``), waits until clamd answers PING and c-icap accepts connections,
  and records it. scand then starts, and its running digest names the new engines;
- the deploy writes the engines' files on a running scanner without restarting them, and
  ``mailtower-engines-upgrade`` installs packages with Debian's restarts held back
  (policy-rc.d). A refresh that fails (clamd does not come back) fails scand's start: the
  window's health check fails and the scanner stays out with the reason (the roll stops).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mailtower.scand.errors import EnginesError

__all__ = ["APPLIED", "FILES", "EnginesError", "digest", "refresh", "wait_ready"]

log = logging.getLogger("mailtower.scand.engines")

# What the engines start with. Absent files count as absent (no local c-icap).
FILES = (
    Path("/etc/clamav/clamd.conf"),
    Path("/etc/systemd/system/clamav-daemon.service.d/mailtower.conf"),
    Path("/etc/c-icap/c-icap.conf"),
    Path("/etc/systemd/system/c-icap.service.d/mailtower.conf"),
    # written by mailtower-engines-upgrade after each install of the engines' packages
    # (their versions and their files' checksums: equal on every scanner with the same packages)
    Path("/var/lib/mailtower/engines-packages"),
)
# What the engines last started with (root's: the refresh writes it)
APPLIED = Path("/var/lib/mailtower-engines/applied")
UNITS = ("clamav-daemon.service", "c-icap.service")
# Run as root on the scanner (a PACKAGES host), never on the controller: by its full path.
SYSTEMCTL = "/usr/bin/systemctl"
# clamd loading the databases (the official ones: about a minute on a lab scanner)
READY_TIMEOUT_S = 240.0

Run = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def digest(files: Sequence[Path] | None = None) -> str:
    """What the engines would start with (``files``, default FILES), as 16 hex digits."""
    h = hashlib.sha256()
    for path in FILES if files is None else files:  # by content, not where: equal on every scanner
        try:
            data = path.read_bytes()
        except OSError:
            h.update(b"-\0")
            continue
        h.update(b"%d\0" % len(data) + data)
    return h.hexdigest()[:16]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def refresh(
    clamd: str | None,
    icap: tuple[str, int] | None,
    *,
    files: Sequence[Path] | None = None,
    applied: Path | None = None,
    run: Run = _run,
    ready: Callable[[str | None, tuple[str, int] | None, float], None] | None = None,
    timeout_s: float = READY_TIMEOUT_S,
) -> bool:
    """Restart the enabled engines if what they would start with changed since they last
    started (or that is unknown); True when it restarted them. Raises EnginesError naming
    the engine and where to look when one does not come back within ``timeout_s``."""
    wanted = digest(files)
    applied = APPLIED if applied is None else applied
    try:
        if applied.read_text().strip() == wanted:
            return False
    except OSError:
        pass
    units = [u for u in UNITS if run([SYSTEMCTL, "is-enabled", "--quiet", u]).returncode == 0]
    if units:
        done = run([SYSTEMCTL, "restart", *units])
        if done.returncode != 0:
            raise EnginesError(
                f"systemctl restart {' '.join(units)} failed: {done.stderr.strip()}; "
                f"look at journalctl -u {units[0]}"
            )
    # only what was restarted: a c-icap not enabled yet is started by the deploy afterwards
    (ready or wait_ready)(
        clamd if "clamav-daemon.service" in units else None,
        icap if "c-icap.service" in units else None,
        timeout_s,
    )
    applied.parent.mkdir(parents=True, exist_ok=True)
    tmp = applied.with_suffix(".tmp")
    tmp.write_text(wanted + "\n")
    tmp.replace(applied)
    log.warning("event=engines_restarted units=%s digest=%s", ",".join(units) or "-", wanted)
    return True


def wait_ready(clamd: str | None, icap: tuple[str, int] | None, timeout_s: float) -> None:
    """clamd answering PING and c-icap accepting connections, within ``timeout_s``."""
    from mailtower.scanning.engines.clamd import ClamdClient

    deadline = time.monotonic() + timeout_s
    last = "not tried"
    while clamd is not None:
        try:
            ClamdClient(clamd, timeout_s=5).ping()
            break
        except Exception as exc:  # not up yet: loading the databases
            last = repr(exc)
        if time.monotonic() > deadline:
            raise EnginesError(
                f"clamd ({clamd}) did not answer PING within {timeout_s:g}s of its restart "
                f"(last: {last}); look at journalctl -u clamav-daemon and /etc/clamav/clamd.conf"
            )
        time.sleep(1.0)
    while icap is not None:
        try:
            socket.create_connection(icap, timeout=5).close()
            return
        except OSError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise EnginesError(
                f"c-icap ({icap[0]}:{icap[1]}) did not accept connections within "
                f"{timeout_s:g}s of its restart (last: {last}); look at journalctl -u c-icap "
                f"and /etc/c-icap/c-icap.conf"
            )
        time.sleep(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailtower.scand.engines")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("refresh", help="restart the engines if what they start with changed")
    p.add_argument("--clamd", help="clamd's address (settings clamd_socket)")
    p.add_argument("--icap", help="the local c-icap's host:port, if any")
    p.add_argument("--timeout", type=float, default=READY_TIMEOUT_S)
    sub.add_parser("digest", help="print what the engines would start with")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "digest":
        print(digest())
        return 0
    icap = None
    if args.icap:
        host, _, port = args.icap.rpartition(":")
        icap = (host, int(port))
    try:
        refresh(args.clamd, icap, timeout_s=args.timeout)
    except (EnginesError, OSError) as exc:
        print(f"mailtower engines refresh: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
