"""``mailtower dns``: plan, apply and check a tower pair's records; write its zone files.

dnspython is imported only when a ``dns`` action runs: the ``mailtower`` command also runs on
tower hosts, which do not have it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailtower.controller.dns.exceptions import DnsError, InvalidPair

if TYPE_CHECKING:
    from mailtower.controller.dns.model import TowerPair
    from mailtower.controller.dns.server import AuthServer


def _pair(path: Path) -> TowerPair:
    from mailtower.controller.dns.model import load_pair

    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidPair(f"{path}: cannot read the tower pair: {exc.strerror}") from exc
    except ValueError as exc:
        raise InvalidPair(f"{path}: not JSON: {exc}") from exc
    try:
        return load_pair(data)
    except InvalidPair as exc:
        raise InvalidPair(f"{path}: {exc}") from exc


def _server(args: argparse.Namespace) -> AuthServer:
    from mailtower.controller.dns.server import AuthServer, TsigKey

    key = TsigKey.from_file(args.key) if getattr(args, "key", None) else None
    return AuthServer.parse(args.server, key=key, timeout_s=args.timeout)


def _print(args: argparse.Namespace, text: str, data: Any) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _plan(args: argparse.Namespace) -> int:
    from mailtower.controller.dns.diff import plan

    pair, server = _pair(args.pair), _server(args)
    change_plan = plan(pair, server, prune=args.prune)
    _print(args, change_plan.to_text(), change_plan.as_json())
    return 0


def _apply(args: argparse.Namespace) -> int:
    from mailtower.controller.dns.diff import plan
    from mailtower.controller.dns.update import apply
    from mailtower.controller.dns.verify import check_published

    pair, server = _pair(args.pair), _server(args)
    change_plan = plan(pair, server, prune=args.prune)
    if args.dry_run or change_plan.empty:
        _print(args, change_plan.to_text(), change_plan.as_json())
        return 0
    apply(change_plan, server)
    problems = check_published(pair, server)
    text = change_plan.to_text() + "\napplied" + "".join(f"\nPROBLEM {p}" for p in problems)
    _print(args, text, {**change_plan.as_json(), "applied": True, "problems": problems})
    return 1 if problems else 0


def _check(args: argparse.Namespace) -> int:
    from mailtower.controller.dns.verify import check_published

    pair, server = _pair(args.pair), _server(args)
    problems = check_published(pair, server)
    text = "\n".join(problems) or f"{server}: every record of the pair is published"
    _print(args, text, {"server": str(server), "problems": problems})
    return 1 if problems else 0


def _zonefiles(args: argparse.Namespace) -> int:
    from mailtower.controller.dns.zonefile import write_zone_files

    paths = write_zone_files(_pair(args.pair), args.out, with_records=not args.empty)
    _print(
        args,
        "\n".join(f"{zone} {path}" for zone, path in paths.items()),
        {zone: str(path) for zone, path in paths.items()},
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.dns_func(args))
    except DnsError as exc:
        print(f"mailtower dns: {exc}", file=sys.stderr)
        return 1


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``dns`` and its actions to the ``mailtower`` command."""
    dns_cmd = commands.add_parser(
        "dns",
        help="MX records of a tower pair: plan, apply (RFC 2136 + TSIG), check, zone files",
        description="The pair is a JSON file of mailtower.controller.dns.TowerPair. "
        "Exit status: 0 done "
        "(apply/check: and everything published), 1 error or problems found, 2 usage.",
    )
    actions = dns_cmd.add_subparsers(dest="dns_action", metavar="ACTION", required=True)
    plan_cmd = actions.add_parser("plan", help="show what apply would change (sends nothing)")
    apply_cmd = actions.add_parser("apply", help="apply the changes, then check the result")
    apply_cmd.add_argument("--dry-run", action="store_true", help="show the changes only")
    check_cmd = actions.add_parser("check", help="list problems with what the server serves")
    zone_cmd = actions.add_parser("zonefiles", help="write the pair's zone files")
    zone_cmd.add_argument("--out", type=Path, required=True, help="directory to write into")
    zone_cmd.add_argument("--empty", action="store_true", help="SOA and NS only, no records")
    for sub, func in ((plan_cmd, _plan), (apply_cmd, _apply), (check_cmd, _check)):
        sub.add_argument(
            "--server", required=True, help="authoritative server: ADDRESS[:PORT] (port 53)"
        )
        sub.add_argument("--timeout", type=float, default=5.0, help="seconds per query")
        sub.set_defaults(dns_func=func)
    for sub in (plan_cmd, apply_cmd):
        sub.add_argument(
            "--key", type=Path, help="TSIG key file (tsig-keygen output): signs updates, AXFR"
        )
        sub.add_argument(
            "--prune",
            action="store_true",
            help="also delete MX/PTR records naming the pair's hosts that it no longer "
            "publishes (transfers every zone: the key must be allowed AXFR)",
        )
    zone_cmd.set_defaults(dns_func=_zonefiles)
    for sub in (plan_cmd, apply_cmd, check_cmd, zone_cmd):
        sub.add_argument("pair", type=Path, metavar="PAIR.json")
        sub.add_argument("--json", action="store_true", help="JSON for programs")
    dns_cmd.set_defaults(func=_run)
