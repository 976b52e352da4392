"""mailtower-portal: the customers' quarantine portal served from the GOC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
from pathlib import Path

from mailtower.goc.eye.__main__ import _run, plain_http_refused
from mailtower.goc.eye.auth import load_secret
from mailtower.goc.eye.errors import AuthError
from mailtower.goc.portal.app import PortalConfig, make_app
from mailtower.goc.portal.mail import RelayAddress, SmtpMailer
from mailtower.goc.portal.store import Store

log = logging.getLogger("mailtower.goc.portal")

SECRET_PATH = Path("/etc/mailtower/portal/session.key")
DEFAULT_LISTEN = "127.0.0.1:8027"  # 8025 VirusEye, 8026 the bundles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailtower-portal", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the portal")
    serve.add_argument(
        "--dsn",
        default=os.environ.get("MAILTOWER_PORTAL_DSN"),
        help="libpq DSN of the GOC hub as mt_portal (default: $MAILTOWER_PORTAL_DSN; the "
        "password in $PGPASSFILE, not here)",
    )
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT to listen on")
    serve.add_argument("--secret-file", type=Path, default=SECRET_PATH)
    serve.add_argument("--tls-cert", type=Path)
    serve.add_argument("--tls-key", type=Path)
    serve.add_argument("--origin", help="public origin when behind a TLS proxy")
    serve.add_argument(
        "--public-url", help="the portal's URL in sign-in links (default: the origin)"
    )
    serve.add_argument("--mail-from", default="quarantine@localhost")
    serve.add_argument(
        "--relay",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="where sign-in links are submitted (SMTP, port 25 by default); repeatable",
    )
    serve.add_argument("--session-hours", type=float, default=8.0)
    serve.add_argument("--idle-minutes", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    try:
        return _serve(args)
    except AuthError as exc:
        print(f"mailtower-portal: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    if not args.dsn:
        print("mailtower-portal serve: give --dsn or set MAILTOWER_PORTAL_DSN", file=sys.stderr)
        return 2
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"mailtower-portal serve: --listen {args.listen!r}: use HOST:PORT", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("mailtower-portal serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    refused = plain_http_refused(host.strip("[]"), bool(args.tls_cert), args.origin)
    if refused:
        print(f"mailtower-portal serve: {refused}", file=sys.stderr)
        return 2
    tls: ssl.SSLContext | None = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    public_url = args.public_url or args.origin or f"https://{args.listen}"
    config = PortalConfig(
        secret=load_secret(args.secret_file, create=True),
        public_url=public_url,
        mail_from=args.mail_from,
        session_lifetime_s=int(args.session_hours * 3600),
        session_idle_s=int(args.idle_minutes * 60),
        secure_cookie=tls is not None or (args.origin or "").startswith("https://"),
        origin=args.origin,
        # plain HTTP with an origin: on loopback behind a TLS proxy (plain_http_refused)
        behind_proxy=args.origin is not None and tls is None,
    )
    store = Store(args.dsn)
    mailer = SmtpMailer(tuple(RelayAddress.parse(r) for r in args.relay))
    try:
        asyncio.run(_run(make_app(config, store, mailer), host.strip("[]"), int(port), tls))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
