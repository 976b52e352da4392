"""``mailtower``: operator commands (quarantine, signatures, scan, rule bundles, ClamAV's
databases, the GOC's sync, customers and portal, dns)."""

# Each area registers its own commands (``add_parser``) in its own package; this module only
# composes them, in the order ``mailtower --help`` lists them.

from __future__ import annotations

import argparse
import sys

from mailtower.bundles import cli as bundles_cli
from mailtower.clamavdb import cli as clamavdb_cli
from mailtower.goc import customers as customers_cli
from mailtower.goc.portal import cli as portal_cli
from mailtower.goc.sync import cli as sync_cli
from mailtower.scand import cli as scand_cli
from mailtower.scanning import cli as scanning_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailtower", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    scand_cli.add_parser(commands)  # quarantine
    scanning_cli.add_parser(commands)  # signatures, scan
    bundles_cli.add_parser(commands)  # bundle
    clamavdb_cli.add_parser(commands)  # clamavdb
    sync_cli.add_parser(commands)  # sync
    customers_cli.add_parser(commands)  # customer (at the GOC)
    portal_cli.add_parser(commands)  # portal (at the GOC)
    _add_controller_parsers(commands)  # dns, init, where the controller is installed
    return parser


def _add_controller_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The controller's commands (``dns``, ``init``), where the controller's code is installed.

    The hosts' wheel leaves ``mailtower.controller`` out (pyproject), so on a tower host
    ``mailtower dns`` is an unknown command rather than an import error at start-up.
    """
    try:
        from mailtower.controller.dns import cli as dns_cli
        from mailtower.controller.firstpair import cli as init_cli
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("mailtower.controller"):
            raise  # a missing dependency of the controller's code is a real error
        return
    dns_cli.add_parser(commands)
    init_cli.add_parser(commands)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2 with a message
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
