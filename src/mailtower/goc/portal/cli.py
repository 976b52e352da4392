"""``mailtower portal``: the quarantine portal's users and its objects in the GOC database.

Run it at the GOC as ``postgres`` (``sudo -u postgres mailtower portal ...``): it connects with
the DSN of ``/etc/mailtower/sync/goc.json`` (the local socket), as ``mailtower customer`` does;
``--dsn`` gives another.

- ``user add NAME --role operator|admin [--customer CUSTOMER]``: the password is asked twice
  on a terminal, else read as one line from standard input; ``passwd NAME`` changes it (their
  sessions end); ``remove NAME`` (their sessions end); ``list``.
- ``schema [--role-password-stdin]``: the portal's tables and indexes, and the role
  ``mt_portal``'s grants (with its password from standard input: the role itself); idempotent.

Exit status: 0 done, 1 refused or failed (no such user or customer, the database), 2 bad input.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

import psycopg

from mailtower._text import shown
from mailtower.goc.portal import store
from mailtower.goc.sync import deployed
from mailtower.goc.sync.exceptions import SyncError

GOC_CONFIG = Path("/etc/mailtower/sync/goc.json")
MIN_PASSWORD = 12


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    portal = commands.add_parser(
        "portal",
        help="the quarantine portal's users and objects (at the GOC)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    portal.add_argument("--dsn", help="the GOC's database (default: goc.json's)")
    portal.add_argument("--config", type=Path, default=GOC_CONFIG, help=argparse.SUPPRESS)
    actions = portal.add_subparsers(dest="portal_action", metavar="ACTION", required=True)

    user = actions.add_parser("user", help="operators and customers' admins")
    verbs = user.add_subparsers(dest="user_action", metavar="VERB", required=True)
    add = verbs.add_parser("add", help="add a user (or change their role and password)")
    add.add_argument("name")
    add.add_argument("--role", choices=["operator", "admin"], required=True)
    add.add_argument("--customer", help="an admin's customer (mailtower customer list)")
    passwd = verbs.add_parser("passwd", help="change a user's password (their sessions end)")
    passwd.add_argument("name")
    remove = verbs.add_parser("remove", help="remove a user (their sessions end)")
    remove.add_argument("name")
    verbs.add_parser("list", help="the users, their roles and customers")

    schema = actions.add_parser("schema", help="the portal's tables, indexes and grants")
    schema.add_argument(
        "--role-password-stdin",
        action="store_true",
        help="also make the login role mt_portal with the password on standard input",
    )
    portal.set_defaults(func=run)


def _password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the passwords differ")
    return first


def run(args: argparse.Namespace) -> int:
    label = f"mailtower portal {args.portal_action}"
    try:
        dsn = args.dsn or deployed.load(args.config, deployed.GocSide).dsn
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            return _act(args, conn)
    except ValueError as exc:
        print(f"{label}: {shown(exc)}", file=sys.stderr)
        return 2
    except SyncError as exc:
        print(f"{label}: {shown(exc)} (or give --dsn)", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{label}: database error: {shown(reason)}", file=sys.stderr)
        return 1


def _act(args: argparse.Namespace, conn: psycopg.Connection[Any]) -> int:
    if args.portal_action == "schema":
        password = sys.stdin.readline().rstrip("\n") if args.role_password_stdin else None
        if password is not None and len(password) < 16:
            raise ValueError("the mt_portal password: 16 characters or more")
        with conn.transaction():
            store.apply_schema(conn)
            if password is not None:
                store.ensure_role(conn, password)
            granted = store.apply_grants(conn)
        print(f"portal schema in place; mt_portal granted on {', '.join(granted)}")
        return 0
    action = args.user_action
    if action == "list":
        for name, role, customer in store.list_users(conn):
            print("\t".join(shown(v) for v in (name, role, customer or "-")))
        return 0
    if action == "remove":
        if not store.remove_user(conn, args.name):
            print(f"mailtower portal user remove: no user {shown(args.name)!r}", file=sys.stderr)
            return 1
        print(f"removed {shown(args.name)}; their sessions ended")
        return 0
    if action == "passwd":
        row = conn.execute(
            "SELECT u.role, c.name FROM public.portal_users u"
            " LEFT JOIN public.customers c ON c.id = u.customer_id WHERE u.name = %s",
            (args.name,),
        ).fetchone()
        if row is None:
            print(f"mailtower portal user passwd: no user {shown(args.name)!r}", file=sys.stderr)
            return 1
        role, customer = str(row[0]), row[1]
    else:
        role, customer = args.role, args.customer
    password = _password()
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"use a password of {MIN_PASSWORD} characters or more")
    store.set_user(conn, args.name, role, customer, password)
    print(f"{role} {shown(args.name)} set" + (f" for {shown(customer)}" if customer else ""))
    return 0
