"""``mailtower init``: write a twin pair's inventories and secrets from options (asked for when
missing and stdin is a terminal)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from mailtower.controller.errors import InitError

# (option, answers key, prompt); towers' options come once per tower, prefixed --a- / --b-.
_TOWER_OPTIONS = (
    ("name", "name", "tower name (e.g. tower-a)"),
    ("site", "site", "site"),
    ("mx", "mx", "relay's public name (MX target, e.g. mx.tower-a.example.net)"),
    ("relay", "relay", "relay address"),
    ("monitor", "monitor", "monitor address"),
    ("sql", "sql", "SQL addresses, primary then standby (A,B)"),
    ("scanners", "scanners", "scanner addresses (A-B range or list)"),
)
_PAIR_OPTIONS = (
    ("pair", "pair", "pair name (inventory/pair_<name>.py)"),
    ("goc", "goc", "GOC address"),
    ("goc-backup", "goc_backup", "GOC backup repository host's address"),
    ("dns-server", "dns_server", "the pair's authoritative DNS server's address"),
    ("dns-name", "dns_name", "that server's NS name (e.g. ns1.example.net)"),
)
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "init",
        help="write a twin pair's inventories, GOC inventory, pair file and secrets",
        description=(
            "Write both towers' inventories, the GOC's and the pair file (--inventory-dir), "
            "and outside the repository the secrets (--secrets-dir, default "
            "~/.config/mailtower/<pair>/: one file per tower and one for the GOC, 0600), the "
            "bundle signing keys (GOC side) and a DNS update key. Missing options are asked "
            "for when stdin is a terminal. A second run with the same answers changes nothing. "
            "Exit 0: written or unchanged; 1: refused (bad input, or a file it will not "
            "overwrite; nothing written); 2: usage. See docs/first-real-pair.md."
        ),
    )
    p.add_argument("--answers", type=Path, help="a JSON file of answers (options override it)")
    for opt, _, prompt in _PAIR_OPTIONS:
        p.add_argument(f"--{opt}", help=prompt)
    for tower in ("a", "b"):
        for opt, _, prompt in _TOWER_OPTIONS:
            p.add_argument(f"--{tower}-{opt}", help=f"tower {tower.upper()}: {prompt}")
    p.add_argument(
        "--customer",
        action="append",
        default=[],
        metavar="DOMAIN=SERVER",
        help="a first customer: its domain and its mail server (repeat)",
    )
    p.add_argument("--zone", action="append", default=[], help="a zone the pair's records go in")
    p.add_argument(
        "--operator-network", action="append", default=[], help="CIDR operators work from"
    )
    p.add_argument("--ssh-user", help="SSH user (default root)")
    p.add_argument("--ssh-key", help="SSH private key (default: the SSH agent)")
    p.add_argument("--ssh-known-hosts", help="known_hosts file (default: the user's)")
    p.add_argument("--sizing", choices=("production", "lab"), help="the preflight's table")
    p.add_argument("--tsig-file", type=Path, help="the DNS server's update key (BIND syntax)")
    p.add_argument("--inventory-dir", type=Path, default=Path("inventory"))
    p.add_argument("--secrets-dir", type=Path, help="default ~/.config/mailtower/<pair>")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace inventories that differ; secrets are still kept (missing ones added)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_init)


def gather(args: argparse.Namespace, ask: Callable[[str], str] | None) -> dict[str, object]:
    """The answers from --answers, the options, and ``ask`` for each still missing (None: a
    missing one is an InitError naming its option)."""
    data: dict = json.loads(args.answers.read_text()) if args.answers else {}
    if not isinstance(data, dict):
        raise InitError(f"--answers {args.answers}: not a JSON object; nothing was written")
    missing: list[str] = []

    def value(option: str, current: object, prompt: str) -> object:
        given = getattr(args, option.replace("-", "_"))
        if given not in (None, []):
            return given
        if current not in (None, "", []):
            return current
        if ask is None:
            missing.append(f"--{option}")
            return None
        return ask(prompt)

    for opt, key, prompt in _PAIR_OPTIONS:
        data[key] = value(opt, data.get(key), prompt)
    towers = data.get("towers") or []
    if (
        not isinstance(towers, list)
        or len(towers) > 2
        or not all(isinstance(t, dict) for t in towers)
    ):
        raise InitError(
            f"--answers {args.answers}: towers must be a list of at most two objects (tower A,"
            " then tower B); nothing was written"
        )
    towers = [*towers, *({} for _ in range(2 - len(towers)))]  # a missing one: its options
    for i, tower in enumerate(("a", "b")):
        for opt, key, prompt in _TOWER_OPTIONS:
            prompt = f"tower {tower.upper()}: {prompt}"
            towers[i][key] = value(f"{tower}-{opt}", towers[i].get(key), prompt)
    data["towers"] = towers
    if args.customer:
        data["customers"] = _customers(args.customer)
    elif not data.get("customers"):
        if ask is None:
            missing.append("--customer DOMAIN=SERVER")
        else:
            items = ask("first customers, DOMAIN=SERVER separated by spaces").split()
            data["customers"] = _customers(items)
    for opt, key in (("zone", "zones"), ("operator_network", "operator_networks")):
        if getattr(args, opt):
            data[key] = getattr(args, opt)
    for key in ("ssh_user", "ssh_key", "ssh_known_hosts", "sizing"):
        if getattr(args, key):
            data[key] = getattr(args, key)
    if missing:
        raise InitError(
            f"missing {', '.join(missing)} (stdin is not a terminal, so nothing is asked); "
            "nothing was written"
        )
    return data


def _customers(items: list[str]) -> list[dict[str, str]]:
    from mailtower.controller.firstpair.answers import customers_from

    try:
        return customers_from(items)
    except ValueError as exc:
        raise InitError(f"--customer: {exc}; nothing was written") from exc


def _init(args: argparse.Namespace) -> int:
    from mailtower.controller.firstpair import answers, write

    ask = (lambda prompt: input(f"{prompt}: ").strip()) if sys.stdin.isatty() else None
    try:
        data = gather(args, ask)
        a = answers.from_data(data)
        outcome = write.run(
            a, args.inventory_dir, args.secrets_dir, force=args.force, tsig_file=args.tsig_file
        )
    except (InitError, OSError, ValueError) as exc:
        print(f"mailtower init: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        print(
            json.dumps(
                {
                    "changed": outcome.changed,
                    "files": [{"path": str(s.path), "action": s.action} for s in outcome.steps],
                }
            )
        )
        return EXIT_OK
    print("\n".join(outcome.lines()))
    if not outcome.changed:
        print("unchanged: every file is as these answers make it")
    elif args.force:
        print("--force: existing secrets were kept; only missing ones were added")
    return EXIT_OK
