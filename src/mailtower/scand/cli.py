"""``mailtower quarantine list|show|release|delete``: the tower's quarantine, for operators.

On a scanner of a deployed tower (settings with ``quarantine_store = "sql"``) the commands read
and act on the tower's SQL quarantine (docs/quarantine.md) as ``mailtower_scanner``: ``list``
newest first, paged; ``show`` a row's metadata and what was done with it (``quarantine_log``);
``release`` re-injects the stored message to the relay with its original envelope and logs it
(``mt_quarantine_released``); ``delete`` drops its bytes and logs it (``mt_quarantine_delete``).
The scanner role may change quarantine rows only through those functions. Any scanner of the
tower serves (the relay's re-injection listener takes the scanners only). With ``--spool``, or
without SQL settings (a standalone scand), they act on a directory store as before.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailtower import quarantine as rows
from mailtower import settings as settings_mod
from mailtower._text import shown
from mailtower.errors import SettingsError
from mailtower.scand.errors import QuarantineError
from mailtower.scand.quarantine import ID_RE, QuarantineStore
from mailtower.settings import TowerSettings


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``quarantine`` and its actions to the ``mailtower`` command."""
    quarantine = commands.add_parser(
        "quarantine", help="inspect and release a scanner's quarantine"
    )
    qcommands = quarantine.add_subparsers(dest="qcommand", metavar="ACTION", required=True)
    qlist = qcommands.add_parser(
        "list",
        help="list quarantined messages (SQL: newest first, paged; a directory: oldest first)",
        description="Exit status: 0 listed, 1 settings or SQL error.",
    )
    qlist.add_argument("--json", action="store_true", help="JSON for programs")
    qlist.add_argument(
        "--limit", type=int, default=50, help=f"SQL: at most this many (1-{rows.PAGE_MAX})"
    )
    qlist.add_argument(
        "--before", metavar="CURSOR", help="SQL: the page after this cursor (printed by list)"
    )
    qshow = qcommands.add_parser(
        "show",
        help="show one quarantined message's metadata",
        description="Exit status: 0 shown, 1 unknown id, settings or SQL error.",
    )
    qshow.add_argument("id", help="quarantine id (or, in SQL, the event id)")
    qrelease = qcommands.add_parser(
        "release",
        help="re-inject a quarantined message to the relay with its original envelope",
        description="Exit status: 0 released, 1 unknown id, already released (without "
        "--again), its message deleted or expired, settings, SQL or relay error.",
    )
    qrelease.add_argument("id", help="quarantine id (or, in SQL, the event id)")
    qrelease.add_argument(
        "--again", "--force", dest="again", action="store_true", help="release again if released"
    )
    qdelete = qcommands.add_parser(
        "delete",
        help="delete a quarantined message for good (SQL: its bytes; the verdict event stays)",
        description="Exit status: 0 deleted, 1 unknown id, already deleted, settings or SQL error.",
    )
    qdelete.add_argument("id", help="quarantine id (or, in SQL, the event id)")
    for sub in (qlist, qshow, qrelease, qdelete):
        sub.add_argument(
            "--settings",
            type=Path,
            default=settings_mod.SETTINGS_PATH,
            help=f"tower settings JSON (default: {settings_mod.SETTINGS_PATH}); with "
            'quarantine_store "sql" the tower\'s SQL quarantine is used',
        )
        sub.add_argument(
            "--spool",
            type=Path,
            default=None,
            help="a directory store's spool directory (default: spool_dir of this host's "
            "settings when they use no SQL)",
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
    if (settings := _sql_settings(args)) is not None:
        return _sql_action(settings, _sql_list, args)
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
    if (settings := _sql_settings(args)) is not None:
        return _sql_action(settings, _sql_show, args)
    try:
        entry = _store(args).get(args.id)
    except QuarantineError as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(entry.meta, indent=2))
    print(f"message: {entry.message_path}")
    return 0


def _quarantine_delete(args: argparse.Namespace) -> int:
    if (settings := _sql_settings(args)) is not None:
        return _sql_action(settings, _sql_delete, args)
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
    if args.spool is None and settings.quarantine_store == "sql":
        return _sql_action(settings, _sql_release, args)
    # The spool of the settings that name the relay, unless --spool says otherwise.
    store = QuarantineStore(Path(args.spool or settings.spool_dir) / "quarantine")
    try:
        entry = store.get(args.id)
    except QuarantineError as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    if entry.meta.get("released_at") and not args.again:
        print(
            f"mailtower: {entry.id} was already released at {entry.meta['released_at']} "
            f"by {entry.meta.get('released_by', '?')}; use --again to release it again",
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


# -- the SQL quarantine ------------------------------------------------------------------------


class _Refused(Exception):
    """What the operator asked cannot be done; the message says why (exit status 1)."""


def _sql_settings(args: argparse.Namespace) -> settings_mod.TowerSettings | None:
    """This host's settings if the commands act on the SQL quarantine (no ``--spool``, and
    settings that use it), else None."""
    if args.spool is not None:
        return None
    try:
        settings = settings_mod.load(args.settings)
    except SettingsError:
        return None  # a standalone scand's host: the default spool
    return settings if settings.quarantine_store == "sql" else None


def _sql_action(settings: TowerSettings, action: Any, args: argparse.Namespace) -> int:
    """Run ``action(conn, settings, args)`` on the tower's primary as mailtower_scanner."""
    import psycopg

    try:
        dsn = settings.sql_dsn("mailtower_scanner", settings.secret("sql_scanner"), writable=True)
    except SettingsError as exc:
        print(
            f"mailtower: {exc}; run `mailtower quarantine` on one of the tower's scanners",
            file=sys.stderr,
        )
        return 1
    try:
        with psycopg.connect(
            dsn, autocommit=True, application_name="mailtower-quarantine-cli"
        ) as conn:
            return int(action(conn, settings, args))
    except _Refused as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(
            f"mailtower: the tower's SQL quarantine ({', '.join(map(str, settings.hosts.sql))}):"
            f" {shown(exc)}",
            file=sys.stderr,
        )
        return 1


def _find(conn: Any, ident: str) -> rows.Quarantined:
    """The quarantine row ``ident`` names (a quarantine id or an event id), with its bytes."""
    try:
        event_id = uuid.UUID(ident)
    except ValueError:
        if not ID_RE.match(ident):
            raise _Refused(
                f"{shown(ident)!s} is neither a quarantine id (20261126T190501Z-…) nor an "
                "event id (a uuid)"
            ) from None
        found = rows.by_quarantine_id(conn, ident)
        if len(found) > 1:
            raise _Refused(f"{ident} names {len(found)} rows: give the event id") from None
        if not found:
            raise _Refused(f"no quarantined message {ident} in the tower's SQL") from None
        return found[0]
    row = rows.by_event_id(conn, event_id)
    if row is None:
        raise _Refused(f"no quarantined message with event id {event_id}")
    return row


def _log(conn: Any, event_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """What was done with each of ``event_ids`` (quarantine_log), oldest first."""
    done: dict[uuid.UUID, list[dict[str, Any]]] = {e: [] for e in event_ids}
    if not event_ids:
        return done
    with conn.cursor() as cur:
        cur.execute(
            "SELECT event_id, action, at, by, recipients, answer FROM quarantine_log"
            " WHERE event_id = ANY(%s) ORDER BY at, id",
            (event_ids,),
        )
        for event_id, action, at, by, recipients, answer in cur.fetchall():
            done[event_id].append(
                {
                    "action": action,
                    "at": at.isoformat(),
                    "by": by,
                    "recipients": list(recipients),
                    "answer": answer,
                }
            )
    return done


def _as_json(row: rows.Quarantined, log: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "event_id": str(row.event_id),
        "quarantine_id": row.quarantine_id,
        "tower": row.tower,
        "scanner": row.scanner,
        "scanned_at": row.scanned_at.isoformat(),
        "verdict": row.verdict,
        "sender": row.sender,
        "recipients": list(row.recipients),
        "findings": [dict(f) for f in row.findings],
        "size_bytes": row.size_bytes,
        "message_id": row.message_id,
        "customer_id": row.customer_id,
        "subject": row.subject,
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        "quarantine_meta": dict(row.quarantine_meta),
        "held": row.held,
        "log": log,
    }


def _cursor_text(row: rows.Quarantined) -> str:
    return f"{row.scanned_at.isoformat()}/{row.event_id}"


def _parse_cursor(text: str) -> tuple[datetime, uuid.UUID]:
    try:
        at, _, event_id = text.rpartition("/")
        return datetime.fromisoformat(at), uuid.UUID(event_id)
    except ValueError:
        raise _Refused(f"--before {shown(text)}: not a cursor printed by list") from None


def _sql_list(conn: Any, settings: TowerSettings, args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= rows.PAGE_MAX:
        raise _Refused(f"--limit must be 1..{rows.PAGE_MAX}")
    before = _parse_cursor(args.before) if args.before else None
    page = rows.page(conn, limit=args.limit, before=before)
    done = _log(conn, [r.event_id for r in page])
    if args.json:
        print(json.dumps([_as_json(r, done[r.event_id]) for r in page], indent=2))
        return 0
    if not page:
        print("no quarantined message" + (" before that cursor" if before else ""))
        return 0
    for row in page:
        findings = ",".join(str(f.get("name", "?")) for f in row.findings)
        actions = sorted({d["action"] for d in done[row.event_id]})
        marks = "".join(f"  [{a}d]" if a != "expire" else "  [expired]" for a in actions)
        if not row.held and not actions:
            marks += "  [no message]"
        line = (
            f"{row.quarantine_id}  {row.scanned_at:%Y-%m-%d %H:%M:%S}  {row.size_bytes:>9}  "
            f"{row.verdict:<10}  <{row.sender or ''}>  {len(row.recipients)} rcpt  "
            f"{findings}  {row.subject or ''}"
        )
        print(shown(line + marks))
    if len(page) == args.limit:
        print(f"next page: --before {_cursor_text(page[-1])}")
    return 0


def _sql_show(conn: Any, settings: TowerSettings, args: argparse.Namespace) -> int:
    row = _find(conn, args.id)
    doc = _as_json(row, _log(conn, [row.event_id])[row.event_id])
    # json.dumps escapes every control character; non-ASCII as \u escapes too.
    print(json.dumps(doc, indent=2))
    return 0


def _sql_delete(conn: Any, settings: TowerSettings, args: argparse.Namespace) -> int:
    row = _find(conn, args.id)
    with conn.transaction():
        conn.execute(rows.ACTION_LOCK, (row.event_id,))
        deleted = conn.execute(
            "SELECT mt_quarantine_delete(%s, %s)", (row.event_id, _operator())
        ).fetchone()[0]
    if not deleted:
        raise _Refused(f"{row.quarantine_id}: its message is already deleted or expired")
    print(
        f"{row.quarantine_id} deleted ({shown(row.verdict)}, never delivered from here; the "
        "GOC's copy expires there)"
    )
    return 0


def _sql_release(conn: Any, settings: TowerSettings, args: argparse.Namespace) -> int:
    from mailtower.scand.errors import ReinjectError
    from mailtower.scand.reinject import reinject, relay_address

    row = _find(conn, args.id)
    user = _operator()
    # One release at a time per message (the monitor's manager takes the same lock for its
    # own check and its move to "sending"): the check below and the log row after the
    # relay's answer are one transaction, so of the two, one sees the other's release.
    with conn.transaction():
        conn.execute(rows.ACTION_LOCK, (row.event_id,))
        released = rows.releases(conn, row.event_id)  # by an operator or a portal request
        in_flight = conn.execute(
            "SELECT request_id FROM quarantine_log WHERE event_id = %s AND action = 'release'"
            " AND request_id IS NOT NULL AND (answer LIKE 'claimed %%' OR answer LIKE"
            " 'sending %%')",
            (row.event_id,),
        ).fetchone()
        if in_flight is not None and not args.again:
            raise _Refused(
                f"{row.quarantine_id}: a portal release of it is in progress (request "
                f"{in_flight[0]}, mailtower-monitor); see its result, or use --again"
            )
        current = rows.by_event_id(conn, row.event_id)
        if current is None or current.message is None:
            raise _Refused(f"{row.quarantine_id}: its message is deleted or expired")
        rcpt_tos = list(current.recipients)
        if not rcpt_tos:
            raise _Refused(f"{row.quarantine_id} has no recipients")
        # Each recipient once: what an earlier release (a user's own copy from the portal, an
        # operator's) covered is left out; --again sends to every recipient.
        covered = rows.released_to(released, rcpt_tos)
        if not args.again:
            left_out = [r for r in rcpt_tos if r.lower() in covered]
            rcpt_tos = [r for r in rcpt_tos if r.lower() not in covered]
            if not rcpt_tos:
                raise _Refused(
                    f"{row.quarantine_id} was already released"
                    f" {shown(released[-1].describe())}; use --again to release it again"
                )
            if left_out:
                print(
                    f"{row.quarantine_id}: left out, already released to them: "
                    + shown(", ".join(left_out))
                )
        mail_from = current.sender or ""
        raw = current.message
        stored = [str(o) for o in current.quarantine_meta.get("mail_options") or []]
        options = stored or _release_options(raw, mail_from, rcpt_tos)
        now = datetime.now(UTC)
        header = (
            f"X-Mailtower-Released: {now.isoformat(timespec='seconds')}; by={user}\r\n"
            f"X-Mailtower-Verdict: released; was={_header_word(current.verdict)}; "
            f"tower={settings.name}; id={current.quarantine_id}\r\n"
        ).encode()
        try:
            answer = reinject(settings, raw, mail_from, rcpt_tos, options, header=header)
        except ReinjectError as exc:
            raise _Refused(
                f"release of {current.quarantine_id} to the relay {relay_address(settings)} "
                f"failed: {shown(exc)}; not marked released"
            ) from None
        try:
            conn.execute(
                "SELECT mt_quarantine_released(%s, %s, %s, %s)",
                (current.event_id, user, rcpt_tos, answer),
            )
        except Exception as exc:
            print(
                f"mailtower: {current.quarantine_id} was delivered to the relay "
                f"({shown(answer)}) but could not be logged released: {shown(exc)}",
                file=sys.stderr,
            )
            raise
    print(f"{current.quarantine_id} released to {relay_address(settings)}: {shown(answer)}")
    return 0


def _header_word(text: str) -> str:
    """``text`` fit for a header field: printable ASCII without ``;``, at most 32 characters."""
    return "".join(c for c in text if c.isascii() and c.isprintable() and c not in ";")[:32]
