"""``mailtower clamavdb publish|pull|status``: ClamAV's official databases, verified into a
served directory (the GOC's from cvdupdate, a monitor's from the GOC)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mailtower import clamavdb

EXIT_REFUSED = 1  # usage errors: 2 (argparse)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``clamavdb`` and its actions to the ``mailtower`` command."""
    top = commands.add_parser(
        "clamavdb",
        help="ClamAV's official databases: verify and publish, pull a mirror, status",
        description="Exit status: 0 done, 1 a database refused or a step failed (the reason "
        "is printed; the refused database keeps its served files), 2 usage error.",
    )
    actions = top.add_subparsers(dest="ccommand", metavar="ACTION", required=True)

    publish = actions.add_parser(
        "publish", help="verify cvdupdate's files and serve them (at the GOC)"
    )
    publish.add_argument("--source", type=Path, required=True, metavar="DIR",
                         help="cvdupdate's db directory")  # fmt: skip
    publish.add_argument("--dest", type=Path, required=True, metavar="DIR",
                         help="the served directory (e.g. /srv/mailtower/clamav)")  # fmt: skip
    publish.add_argument("--databases", type=_names, required=True, metavar="A,B,…")
    publish.add_argument(
        "--cvdupdate-state",
        type=Path,
        metavar="FILE",
        help="cvdupdate's state.json (its cool-down per database: 'retry after')",
    )
    publish.add_argument(
        "--cvdupdate-rc",
        type=int,
        metavar="N",
        help="exit status of the cvdupdate run just before (0: the upstream check succeeded)",
    )
    publish.add_argument(
        "--feeds",
        type=_feed_names,
        metavar="A,B,…",
        help="the enabled third-party feeds (Fangfrisch's sections; '' for none): serve "
        "their files from --feeds-dir/<feed>/; without it the served feeds stay as they are",
    )
    publish.add_argument("--feeds-dir", type=Path, metavar="DIR",
                         help="Fangfrisch's local directories' parent")  # fmt: skip
    publish.add_argument(
        "--fangfrisch-rc",
        type=int,
        metavar="N",
        help="exit status of the `fangfrisch refresh` just before",
    )
    publish.add_argument(
        "--fangfrisch-log",
        type=Path,
        metavar="FILE",
        help="its output (log level WARNING: any line is a failed feed download or check)",
    )
    publish.set_defaults(func=_publish)

    pull = actions.add_parser("pull", help="mirror a served directory (on a monitor)")
    pull.add_argument("--from", dest="url", required=True, metavar="URL",
                      help="e.g. http://GOC:PORT/clamav")  # fmt: skip
    pull.add_argument("--dest", type=Path, required=True, metavar="DIR")
    pull.add_argument("--databases", type=_names, required=True, metavar="A,B,…")
    pull.add_argument("--timeout", type=float, default=30.0, metavar="S")
    pull.set_defaults(func=_pull)

    status = actions.add_parser("status", help="a served directory's index and files (JSON)")
    status.add_argument("dir", type=Path, metavar="DIR")
    status.set_defaults(func=_status)


def upstream_state(
    databases: list[str], state_file: Path | None, rc: int | None, now: float
) -> dict[str, Any]:
    """index.json's ``upstream`` from cvdupdate's run: its exit status and state file."""
    upstream: dict[str, Any] = {"last_check": now}
    errors = []
    if rc is not None:
        if rc == 0:
            upstream["last_ok"] = now
        else:
            errors.append(
                f"cvdupdate exited with status {rc} (its log: `journalctl -u "
                "mailtower-cvdupdate` and /var/lib/mailtower/cvdupdate/logs on the GOC)"
            )
    if state_file is not None:
        try:
            dbs = json.loads(state_file.read_text())["dbs"]
            retry = [float(dbs.get(f"{db}.cvd", {}).get("retry after", 0)) for db in databases]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            errors.append(f"{state_file}: cvdupdate's state is unreadable ({exc})")
        else:
            upstream["cooldown_until"] = max([0.0, *retry])
            if upstream["cooldown_until"] > now:
                until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(max(retry)))
                errors.append(f"ClamAV's CDN asked to wait until {until} (HTTP 429)")
    upstream["last_error"] = "; ".join(errors)
    return upstream


def fangfrisch_error(rc: int | None, log_file: Path | None) -> str:
    """What went wrong in the ``fangfrisch refresh`` before publish ("" when nothing)."""
    if rc is None and log_file is None:
        return ""
    lines: list[str] = []
    if log_file is not None:
        try:
            text = log_file.read_text(errors="replace")
        except OSError as exc:
            lines.append(f"{log_file}: unreadable ({exc})")
        else:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if rc:
        lines.append(f"exit status {rc}")
    if not lines:
        return ""
    return "fangfrisch refresh: " + " | ".join(lines[-3:])[-1000:]


def _feed_names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def _names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one database name")
    return names


def _publish(args: argparse.Namespace) -> int:
    upstream = upstream_state(args.databases, args.cvdupdate_state, args.cvdupdate_rc, time.time())
    feeds_error = fangfrisch_error(args.fangfrisch_rc, args.fangfrisch_log)
    if feeds_error:  # recorded like cvdupdate's failures; publish still serves what it has
        upstream["last_error"] = "; ".join(e for e in (upstream["last_error"], feeds_error) if e)
    if upstream["last_error"]:
        print(f"mailtower clamavdb publish: upstream: {upstream['last_error']}", file=sys.stderr)
    if args.feeds is not None and args.feeds_dir is None:
        print("mailtower clamavdb publish: --feeds needs --feeds-dir", file=sys.stderr)
        return 2
    try:
        versions = clamavdb.publish(
            args.source, args.dest, args.databases, upstream, args.feeds_dir, args.feeds
        )
    except clamavdb.DatabaseError as exc:
        return _refused(args, exc)
    _print_versions(args.dest, versions)
    return 0


def _pull(args: argparse.Namespace) -> int:
    try:
        versions = clamavdb.pull(args.url, args.dest, args.databases, timeout_s=args.timeout)
    except clamavdb.DatabaseError as exc:
        return _refused(args, exc)
    _print_versions(args.dest, versions)
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        index = clamavdb.read_index(args.dir)
        live = clamavdb.live_versions(args.dir)
    except clamavdb.DatabaseError as exc:
        return _refused(args, exc)
    print(json.dumps({"dir": str(args.dir), "live": live, **index}, indent=1))
    return 0


def _print_versions(dest: Path, versions: dict[str, int]) -> None:
    served = ", ".join(f"{db} {version}" for db, version in versions.items())
    print(f"{dest}: serving {served}")


def _refused(args: argparse.Namespace, exc: Exception) -> int:
    print(f"mailtower clamavdb {args.ccommand}: refused: {exc}", file=sys.stderr)
    return EXIT_REFUSED
