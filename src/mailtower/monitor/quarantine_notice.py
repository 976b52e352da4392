"""Quarantine notices: who is told, when, and the plain-text mail that tells them.

Everything a notice shows about a message (its sender, subject, finding names, even its
recipients' addresses) was written by whoever sent it. It is cleaned (``clean``: no CR, LF or
other control character, no bidirectional overrides, bounded length) before it goes anywhere,
and the mail is built by the email package, which encodes and folds headers itself: hostile
text can neither add a header nor break the mail. Notices are plain text, never HTML.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from mailtower.customers.policy import CustomerPolicy

MAX_SUBJECT = 200  # characters of a message's subject shown in a notice
MAX_FIELD = 254  # an address, a verdict or a finding name
MAX_ITEMS = 100  # messages listed in one notice; the rest are counted
# An address a notice may go to: plain ASCII local@domain, nothing a header or SMTP command
# could misread. Others (quoted local parts, UTF-8) get no notice (logged).
_ADDRESS = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)


def clean(text: object, limit: int = MAX_FIELD) -> str:
    """``text`` as one safe line: control and format characters (CR, LF, NUL, bidi overrides,
    line separators) become spaces, runs of spaces one, at most ``limit`` characters."""
    out = []
    for ch in str(text if text is not None else ""):
        category = unicodedata.category(ch)
        if category[0] in "CZ" and ch != " ":  # Cc, Cf, Cs, Co, Cn, Zl, Zp (and odd spaces)
            out.append(" ")
        else:
            out.append(ch)
    line = " ".join("".join(out).split())
    if len(line) > limit:
        line = line[: limit - 1].rstrip() + "…"
    return line


def notifiable(address: str) -> bool:
    return len(address) <= MAX_FIELD and bool(_ADDRESS.match(address))


def targets(policy: CustomerPolicy, sender: str | None, recipients: Sequence[str]) -> list[str]:
    """Who is told of a message quarantined under ``policy``: its recipients, the customer's
    admin address, or both — never the envelope sender (a forged one must get no mail from
    us), compared without case, even when the sender is also a recipient."""
    found: list[str] = []
    if policy.notify in ("recipient", "both"):
        found += list(recipients)
    if policy.notify in ("admin", "both") and policy.admin_address:
        found.append(policy.admin_address)
    never = (sender or "").strip().lower()
    seen: set[str] = set()
    out = []
    for address in found:
        key = address.lower()
        if key == never or key in seen:
            continue
        seen.add(key)
        out.append(address)
    return out


def due_at(scanned_at: datetime, digest_hour: int | None) -> datetime:
    """When a notice of a message quarantined at ``scanned_at`` is due: at once, or at the
    first ``digest_hour``:00 UTC after it (so one digest a day gathers a day's messages)."""
    if digest_hour is None:
        return scanned_at
    at = scanned_at.astimezone(UTC)
    digest = at.replace(hour=digest_hour, minute=0, second=0, microsecond=0)
    if digest < at:
        digest += timedelta(days=1)
    return digest


def message_url(portal_url: str | None, event_id: str) -> str | None:
    """The portal's page of one message (``/message/<event_id>``, goc/portal/app.py's route),
    or None without a portal (or an event id that is not a uuid: never a made-up path)."""
    if not portal_url:
        return None
    try:
        eid = uuid.UUID(event_id)
    except ValueError:
        return None
    return f"{portal_url.rstrip('/')}/message/{eid}"


@dataclass(frozen=True)
class Item:
    """One quarantined message, as a notice lists it (fields as stored: cleaned when shown)."""

    event_id: str
    quarantine_id: str
    scanned_at: datetime
    sender: str | None
    subject: str | None
    verdict: str
    findings: tuple[str, ...]


def build(
    *,
    to: str,
    items: Sequence[Item],
    sender: str,
    tower: str,
    hostname: str,
    portal_url: str | None,
    now: datetime,
    digest: bool,
) -> EmailMessage:
    """The notice to ``to`` listing ``items`` (at most MAX_ITEMS; the rest are counted)."""
    shown = list(items)[:MAX_ITEMS]
    count = len(items)
    kind = "Daily digest" if digest else "Notice"
    lines = [
        f"{kind} from the mail tower {clean(tower)}: "
        f"{count} message{'s' if count != 1 else ''} to {clean(to)} "
        f"{'were' if count != 1 else 'was'} held in quarantine and not delivered.",
        "",
    ]
    for item in shown:
        findings = ", ".join(clean(f, 100) for f in item.findings[:5])
        if len(item.findings) > 5:
            findings += f", and {len(item.findings) - 5} more"
        lines += [
            f"Date:          {item.scanned_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
            f"From:          {clean(item.sender) or '(empty sender)'}",
            f"Subject:       {clean(item.subject, MAX_SUBJECT) or '(no subject)'}",
            f"Verdict:       {clean(item.verdict, 40)}" + (f" ({findings})" if findings else ""),
            f"Quarantine id: {clean(item.quarantine_id, 100)}",
        ]
        link = message_url(portal_url, item.event_id)
        if link:
            lines.append(f"Review it:     {link}")
        lines.append("")
    if count > len(shown):
        lines += [f"… and {count - len(shown)} more.", ""]
    if portal_url:
        lines += [f"Review, release or delete them at {portal_url}", ""]
    lines += [
        "The sender was not told. If you expected one of these messages, ask your mail",
        "administrator to release it; do not reply to this notice.",
    ]
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = to
    subject = f"[quarantine] {count} message{'s' if count != 1 else ''} held for you"
    msg["Subject"] = subject if not digest else f"{subject} (daily digest)"
    msg["Date"] = format_datetime(now.astimezone(UTC))
    msg["Message-ID"] = make_msgid("quarantine", domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-reply to this
    msg["Precedence"] = "bulk"
    msg.set_content(
        "\n".join(lines) + "\n", subtype="plain", charset="utf-8", cte="quoted-printable"
    )
    return msg
