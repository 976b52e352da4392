"""``mailtower sync tower|goc``: what the roles run on a tower's SQL hosts and at the GOC.

Exit status: 0 done (or, with ``--check``, nothing to do), 1 something to do (``--check``) or
an error, 2 usage. ``--check`` prints one line per pending action and changes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import psycopg

from mailtower.goc.sync import deployed
from mailtower.goc.sync.exceptions import SyncError

TOWER_CONFIG = Path("/etc/mailtower/sync/tower.json")
GOC_CONFIG = Path("/etc/mailtower/sync/goc.json")


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``sync`` and its sides to the ``mailtower`` command."""
    sync = commands.add_parser(
        "sync",
        help="GOC sync (logical replication): ensure this host's side, or check it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sides = sync.add_subparsers(dest="sync_side", metavar="SIDE", required=True)
    tower = sides.add_parser("tower", help="a tower's SQL host: events publication, config sub")
    tower.add_argument("--config", type=Path, default=TOWER_CONFIG)
    goc = sides.add_parser("goc", help="the GOC: schema, config publication, events subs")
    goc.add_argument("--config", type=Path, default=GOC_CONFIG)
    for side in (tower, goc):
        side.add_argument("--check", action="store_true", help="list pending actions only")
    goc.add_argument(
        "--after-restore",
        action="store_true",
        help="the GOC was restored from a backup: make every tower's events subscription and"
        " slot anew, copying the events the restored GOC lacks (docs/runbook.md)",
    )
    tower.set_defaults(func=_tower)
    goc.set_defaults(func=_goc)


def _run(label: str, action) -> int:  # type: ignore[no-untyped-def]
    logging.basicConfig(level=logging.WARNING)
    try:
        return int(action())
    except (SyncError, psycopg.Error) as exc:
        print(f"mailtower sync {label}: {str(exc).strip()}", file=sys.stderr)
        return 1


def _pending(lines: list[str]) -> int:
    for line in lines:
        print(f"pending: {line}")
    return 1 if lines else 0


def _tower(args: argparse.Namespace) -> int:
    def action() -> int:
        side = deployed.load(args.config, deployed.TowerSide)
        if args.check:
            return _pending(deployed.tower_pending(side))
        print(deployed.tower_apply(side))
        return 0

    return _run("tower", action)


def _goc(args: argparse.Namespace) -> int:
    def action() -> int:
        side = deployed.load(args.config, deployed.GocSide)
        if args.check:
            return _pending(deployed.goc_pending(side))
        report = deployed.goc_apply(side, restored=args.after_restore)
        print(report.changes)
        for tower, host in report.followed.items():
            print(f"{tower}: events followed from its primary {host}")
        for tower, why in report.skipped.items():
            print(f"{tower}: NOT subscribed now: {why}")
        return 0

    return _run("goc", action)
