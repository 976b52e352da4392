"""mailtower-eye: VirusEye, the live outbreak web view served from the GOC, and its operators."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import ipaddress
import logging
import os
import signal
import ssl
import sys
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from mailtower.goc.eye import queries
from mailtower.goc.eye.app import Database, EyeConfig, make_app
from mailtower.goc.eye.auth import Credentials
from mailtower.goc.eye.errors import AuthError
from mailtower.goc.eye.revocations import PgRevocations

log = logging.getLogger("mailtower.goc.eye")

CREDENTIALS_PATH = Path("/etc/mailtower/eye/operators")
SECRET_PATH = Path("/etc/mailtower/eye/session.key")
DEFAULT_LISTEN = "127.0.0.1:8025"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailtower-eye", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the web view")
    serve.add_argument(
        "--dsn",
        default=os.environ.get("MAILTOWER_EYE_DSN"),
        help="libpq DSN of the GOC hub (default: $MAILTOWER_EYE_DSN; keep the password in "
        "~/.pgpass or $PGPASSFILE rather than here, where ps shows it)",
    )
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT to listen on")
    serve.add_argument("--credentials", type=Path, default=CREDENTIALS_PATH)
    serve.add_argument(
        "--secret-file",
        type=Path,
        default=SECRET_PATH,
        help="session-signing key (created, 0600, when missing)",
    )
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate chain")
    serve.add_argument("--tls-key", type=Path, help="… and this private key")
    serve.add_argument(
        "--origin",
        help="public origin when behind a TLS proxy (e.g. https://eye.goc.example); login "
        "requests must come from it",
    )
    serve.add_argument("--refresh", type=float, default=2.0, help="seconds between snapshots")
    serve.add_argument("--window-hours", type=float, default=24.0, help="outbreaks: look back")
    serve.add_argument(
        "--stale-after", type=float, default=60.0, help="seconds without a status: stale tower"
    )

    schema = commands.add_parser(
        "schema",
        help="create tower_status, eye_revoked_sessions and the virus indexes in the hub "
        "(idempotent)",
    )
    schema.add_argument("--dsn", default=os.environ.get("MAILTOWER_EYE_DSN"))

    operator = commands.add_parser("operator", help="add, change or remove an operator")
    operator.add_argument("action", choices=["add", "remove", "list"])
    operator.add_argument("name", nargs="?")
    operator.add_argument("--credentials", type=Path, default=CREDENTIALS_PATH)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    try:
        if args.command == "operator":
            return _operator(args)
        if args.command == "schema":
            return _schema(args)
        return _serve(args)
    except AuthError as exc:
        print(f"mailtower-eye: {exc}", file=sys.stderr)
        return 2


def _operator(args: argparse.Namespace) -> int:
    credentials = Credentials(args.credentials)
    if args.action == "list":
        for name in sorted(credentials.operators() if args.credentials.exists() else {}):
            print(name)
        return 0
    if not args.name:
        print("mailtower-eye operator: name the operator", file=sys.stderr)
        return 2
    if args.action == "remove":
        if not credentials.remove(args.name):
            print(f"no operator {args.name!r} in {args.credentials}", file=sys.stderr)
            return 1
        print(f"removed {args.name}; their sessions end now")
        return 0
    password = _read_password()
    if len(password) < 12:
        print("mailtower-eye operator: use a password of 12 characters or more", file=sys.stderr)
        return 2
    credentials.set_password(args.name, password)
    print(f"operator {args.name} set in {args.credentials}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    import psycopg

    from mailtower.goc.eye.status import apply_schema

    if not args.dsn:
        print("mailtower-eye schema: give --dsn or set MAILTOWER_EYE_DSN", file=sys.stderr)
        return 2
    try:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            apply_schema(conn)
    except psycopg.Error as exc:
        print(f"mailtower-eye schema: {exc}".strip(), file=sys.stderr)
        return 1
    print("VirusEye schema in place (tower_status, eye_revoked_sessions, virus indexes)")
    return 0


def _read_password() -> str:
    """Asked twice on a terminal; one line from standard input otherwise (for scripts)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise SystemExit("mailtower-eye operator: the passwords differ")
    return first


def _serve(args: argparse.Namespace) -> int:
    from mailtower.goc.eye.auth import load_secret

    if not args.dsn:
        print("mailtower-eye serve: give --dsn or set MAILTOWER_EYE_DSN", file=sys.stderr)
        return 2
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"mailtower-eye serve: --listen {args.listen!r}: use HOST:PORT", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("mailtower-eye serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    refused = plain_http_refused(host.strip("[]"), bool(args.tls_cert), args.origin)
    if refused:
        print(f"mailtower-eye serve: {refused}", file=sys.stderr)
        return 2
    tls: ssl.SSLContext | None = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    Credentials(args.credentials).operators()  # fail now, not at the first login
    window = queries.TimeWindow(
        outbreaks=timedelta(hours=args.window_hours),
        thresholds=queries.Thresholds(stale_after_s=args.stale_after),
    )
    config = EyeConfig(
        credentials=args.credentials,
        secret=load_secret(args.secret_file, create=True),
        refresh_s=args.refresh,
        window=window,
        secure_cookie=tls is not None or (args.origin or "").startswith("https://"),
        origin=args.origin,
    )
    database = Database(args.dsn, window)
    try:
        app = make_app(config, database.snapshot, PgRevocations(args.dsn))
        asyncio.run(_run(app, host.strip("[]"), int(port), tls))
    finally:
        database.close()
    return 0


def plain_http_refused(host: str, tls: bool, origin: str | None) -> str | None:
    """Why serving this way would send passwords and session cookies in clear; None: it would not.

    HTTPS only: plain HTTP is served on a loopback address alone, where the only client is this
    host (a test, or a TLS proxy in front, named by ``--origin https://…``).
    """
    if origin is not None and not origin.startswith("https://"):
        return f"--origin {origin!r}: the public origin must be https://"
    if tls or _is_loopback(host):
        return None
    return (
        f"--listen {host}: plain HTTP only on a loopback address; give --tls-cert and "
        "--tls-key to serve HTTPS here, or put a TLS proxy in front (--listen 127.0.0.1:PORT "
        "--origin https://NAME)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


async def _run(app: web.Application, host: str, port: int, tls: ssl.SSLContext | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    log.info("event=listening address=%s:%d tls=%s", host, port, tls is not None)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
