"""``mailtower quarantine list|show|release|delete``: a scanner's quarantine, for operators."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from mailtower import settings as settings_mod
from mailtower._text import shown
from mailtower.errors import SettingsError
from mailtower.scand.errors import QuarantineError
from mailtower.scand.quarantine import QuarantineStore
from mailtower.settings import TowerSettings


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``quarantine`` and its actions to the ``mailtower`` command."""
    quarantine = commands.add_parser(
        "quarantine", help="inspect and release a scanner's quarantine"
    )
    qcommands = quarantine.add_subparsers(dest="qcommand", metavar="ACTION", required=True)
    qlist = qcommands.add_parser("list", help="list quarantined messages, oldest first")
    qlist.add_argument("--json", action="store_true", help="JSON for programs")
    qshow = qcommands.add_parser("show", help="show one quarantined message's metadata")
    qshow.add_argument("id")
    qrelease = qcommands.add_parser(
        "release",
        help="re-inject a quarantined message to the relay with its original envelope",
        description="Exit status: 0 released, 1 unknown id, already released (without "
        "--force), settings or relay error.",
    )
    qrelease.add_argument("id")
    qrelease.add_argument(
        "--settings",
        type=Path,
        default=settings_mod.SETTINGS_PATH,
        help=f"tower settings JSON naming the relay (default: {settings_mod.SETTINGS_PATH})",
    )
    qrelease.add_argument("--force", action="store_true", help="release again if released")
    qdelete = qcommands.add_parser(
        "delete", help="delete a quarantined message and its metadata for good"
    )
    qdelete.add_argument("id")
    for sub in (qlist, qshow, qrelease, qdelete):
        sub.add_argument(
            "--spool",
            type=Path,
            default=None,
            help="spool directory (default: spool_dir of this host's settings)",
        )
    qlist.set_defaults(func=_quarantine_list)
    qshow.set_defaults(func=_quarantine_show)
    qrelease.set_defaults(func=_quarantine_release)
    qdelete.set_defaults(func=_quarantine_delete)


def _default_spool() -> Path:
    """The spool of this host's settings, or the model's default when there are none."""
    try:
        return Path(settings_mod.load().spool_dir)
    except SettingsError:
        return Path(TowerSettings.model_fields["spool_dir"].default)


def _store(args: argparse.Namespace) -> QuarantineStore:
    spool = args.spool if args.spool is not None else _default_spool()
    return QuarantineStore(spool / "quarantine")


def _quarantine_list(args: argparse.Namespace) -> int:
    entries = _store(args).list()
    if args.json:
        print(json.dumps([e.meta for e in entries], indent=2))
        return 0
    if not entries:
        print("quarantine is empty")
        return 0
    for e in entries:
        findings = ",".join(str(f.get("name", "?")) for f in e.meta.get("findings", []))
        sender = e.meta.get("envelope", {}).get("mail_from", "")
        verdict = e.meta.get("verdict", "?")
        released = f"  [released {e.meta['released_at']}]" if e.meta.get("released_at") else ""
        line = f"{e.id}  {e.meta.get('size_bytes', 0):>9}  {verdict:<13}  <{sender}>  {findings}"
        print(shown(line + released))
    return 0


def _quarantine_show(args: argparse.Namespace) -> int:
    try:
        entry = _store(args).get(args.id)
    except QuarantineError as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(entry.meta, indent=2))
    print(f"message: {entry.message_path}")
    return 0


def _quarantine_delete(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        entry = store.get(args.id)
        store.delete(entry.id)
    except QuarantineError as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mailtower: {shown(args.id)}: cannot delete: {exc.strerror}", file=sys.stderr)
        return 1
    verdict = shown(entry.meta.get("verdict", "?"))
    print(f"{entry.id} deleted ({verdict}, never delivered from here)")
    return 0


def _operator() -> str:
    """Who runs the command: the sudo caller if any, else the login user."""
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (OSError, KeyError):
        user = ""
    return "".join(c for c in user if c.isprintable() and c not in " ;") or "unknown"


def _release_options(raw: bytes, mail_from: str, rcpt_tos: list[str]) -> list[str]:
    """MAIL FROM options the message needs (the store keeps no options; sent if offered)."""
    options = []
    if any(b > 0x7F for b in raw):
        options.append("BODY=8BITMIME")
    if not all(addr.isascii() for addr in [mail_from, *rcpt_tos]):
        options.append("SMTPUTF8")
    return options


def _quarantine_release(args: argparse.Namespace) -> int:
    from mailtower.scand.errors import ReinjectError
    from mailtower.scand.reinject import reinject, relay_address

    try:
        settings = settings_mod.load(args.settings)
    except SettingsError as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    # The spool of the settings that name the relay, unless --spool says otherwise.
    store = QuarantineStore(Path(args.spool or settings.spool_dir) / "quarantine")
    try:
        entry = store.get(args.id)
    except QuarantineError as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    if entry.meta.get("released_at") and not args.force:
        print(
            f"mailtower: {entry.id} was already released at {entry.meta['released_at']} "
            f"by {entry.meta.get('released_by', '?')}; use --force to release it again",
            file=sys.stderr,
        )
        return 1
    envelope = entry.meta.get("envelope") or {}
    mail_from = str(envelope.get("mail_from", ""))
    rcpt_tos = [str(r) for r in envelope.get("rcpt_tos", [])]
    if not rcpt_tos:
        print(f"mailtower: {entry.id} has no recipients in its envelope", file=sys.stderr)
        return 1
    try:
        raw = entry.message_path.read_bytes()
    except OSError as exc:
        print(f"mailtower: {entry.message_path}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    user = _operator()
    header = (
        f"X-Mailtower-Released: {now.isoformat(timespec='seconds')}; by={user}\r\n"
        f"X-Mailtower-Verdict: released; was={entry.meta.get('verdict', 'unknown')}; "
        f"tower={settings.name}; id={entry.id}\r\n"
    ).encode()
    try:
        answer = reinject(
            settings,
            raw,
            mail_from,
            rcpt_tos,
            _release_options(raw, mail_from, rcpt_tos),
            header=header,
        )
    except ReinjectError as exc:
        print(
            f"mailtower: release of {entry.id} to the relay {relay_address(settings)} failed: "
            f"{shown(exc)}; not marked released",
            file=sys.stderr,
        )
        return 1
    try:
        store.mark_released(entry.id, at=now, by=user, relay_answer=answer)
    except OSError as exc:
        print(
            f"mailtower: {entry.id} was delivered to the relay ({shown(answer)}) but could not be "
            f"marked released: {exc}",
            file=sys.stderr,
        )
        return 1
    print(f"{entry.id} released to {relay_address(settings)}: {shown(answer)}")
    return 0
