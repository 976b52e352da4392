"""The portal's HTML, built on the server: every value from mail or a user goes through ``h``.

``h`` escapes HTML (``& < > " '``) after ``mailtower._text.shown`` has made every
non-printable character visible as a backslash escape (NULs, controls, bidi overrides such as
U+202E, which could make ``exe.txt`` read as ``txt.exe``). A message's text is shown line by
line the same way inside ``<pre>``; its HTML part is converted to text first. Nothing from a
message is ever rendered as markup, linked, or loaded; there is no script at all.
"""

from __future__ import annotations

import email
import email.policy
import html
import re
from collections.abc import Iterable
from datetime import datetime
from email.message import EmailMessage
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlencode

from mailtower._text import shown

MAX_TEXT = 200_000  # characters of a message's text shown
MAX_PREVIEW = 2 * 1024 * 1024  # bytes of a stored message parsed for its page (the rest: the .eml)
MAX_HEADERS = 200
VERDICTS = ("virus", "banned", "suspicious")


def h(value: object) -> str:
    """``value`` safe inside HTML text and quoted attributes, non-printables made visible."""
    return html.escape(shown("" if value is None else value), quote=True)


def h_text(text: str) -> str:
    """Multi-line text for a ``<pre>``: each line as ``h`` shows it, tabs as spaces."""
    return "\n".join(h(line.expandtabs(8)) for line in text.splitlines())


def page(title: str, body: str, *, who: str = "", csrf: str = "") -> str:
    nav = ""
    if who:
        nav = (
            f'<nav><a href="/">Quarantine</a> <span class="who">{h(who)}</span>'
            f'<form method="post" action="/logout" class="inline">{csrf_field(csrf)}'
            '<button type="submit">Sign out</button></form></nav>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{h(title)} · mailtower quarantine</title>"
        '<link rel="stylesheet" href="/static/portal.css"></head>'
        f"<body>{nav}<main><h1>{h(title)}</h1>{body}</main></body></html>"
    )


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{h(token)}">'


def login_page(csrf: str, error: str = "", notice: str = "", *, back_to: str = "/") -> str:
    """The sign-in page; ``back_to``: the page a password sign-in returns to (the app checks
    it is a message's page)."""
    body = ""
    if error:
        body += f'<p class="error" id="error">{h(error)}</p>'
    if notice:
        body += f'<p class="notice" id="notice">{h(notice)}</p>'
    body += (
        "<section><h2>Administrators and operators</h2>"
        f'<form method="post" action="/login">{csrf_field(csrf)}'
        + (f'<input type="hidden" name="next" value="{h(back_to)}">' if back_to != "/" else "")
        + '<label>Name <input id="name" name="name" autocomplete="username" required></label>'
        '<label>Password <input id="password" name="password" type="password"'
        ' autocomplete="current-password" required></label>'
        '<button id="login-button" type="submit">Sign in</button></form></section>'
        "<section><h2>Your own mail</h2>"
        f'<form method="post" action="/link">{csrf_field(csrf)}'
        '<label>Your address <input id="address" name="address" type="email" required></label>'
        '<button id="link-button" type="submit">Mail me a sign-in link</button></form>'
        "</section>"
    )
    return page("Sign in", body)


def link_page(csrf: str, token: str) -> str:
    # A POST, not the GET of the mailed link: a mail scanner fetching links uses up nothing.
    body = (
        f'<form method="post" action="/link/use">{csrf_field(csrf)}'
        f'<input type="hidden" name="token" value="{h(token)}">'
        '<button id="use-link" type="submit">Sign in</button></form>'
    )
    return page("Sign in with your link", body)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def _findings(findings: Any) -> str:
    names = []
    for f in findings or []:
        if isinstance(f, dict):
            names.append(f"{f.get('engine', '?')}: {f.get('name', '?')}")
    return "; ".join(names)


def _recipients(recipients: Iterable[str] | None) -> str:
    items = list(recipients or [])
    shown_ = ", ".join(items[:5])
    return shown_ + (f" (+{len(items) - 5})" if len(items) > 5 else "")


def list_page(
    rows: list[dict[str, Any]],
    search: dict[str, str],
    next_cursor: str | None,
    *,
    who: str,
    role: str,
    csrf: str,
) -> str:
    verdicts = "".join(
        f'<option value="{v}"{" selected" if search.get("verdict") == v else ""}>{v}</option>'
        for v in VERDICTS
    )
    form = (
        '<form method="get" action="/" class="search" id="search">'
        f'<label>Sender <input name="sender" value="{h(search.get("sender", ""))}"></label>'
        f'<label>Recipient <input name="recipient" value="{h(search.get("recipient", ""))}">'
        "</label>"
        f'<label>Subject <input name="subject" value="{h(search.get("subject", ""))}"></label>'
        f'<label>Verdict <select name="verdict"><option value="">any</option>{verdicts}'
        "</select></label>"
        f'<label>From <input name="since" type="date" value="{h(search.get("since", "")[:10])}">'
        "</label>"
        f'<label>To <input name="until" type="date" value="{h(search.get("until", "")[:10])}">'
        '</label><button type="submit">Search</button></form>'
    )
    head = (
        "<tr><th>Date</th><th>Sender</th><th>Recipients</th><th>Subject</th><th>Verdict</th>"
        "<th>Findings</th><th>Size</th><th>Tower</th><th>State</th></tr>"
    )
    body_rows = []
    for r in rows:
        eid = h(str(r["event_id"]))
        body_rows.append(
            f'<tr data-event="{eid}"><td>{h(_when(r["scanned_at"]))}</td>'
            f"<td>{h(r['sender'] or '<>')}</td><td>{h(_recipients(r['recipients']))}</td>"
            f'<td><a href="/message/{eid}">{h(r["subject"] or "(no subject)")}</a></td>'
            f"<td>{h(r['verdict'])}</td><td>{h(_findings(r['findings']))}</td>"
            f"<td>{h(_size(r['size_bytes']))}</td><td>{h(r['tower'])}</td>"
            f'<td class="state">{h(r["state"])}</td></tr>'
        )
    table = (
        f'<table id="messages"><thead>{head}</thead><tbody>{"".join(body_rows)}</tbody></table>'
        if rows
        else '<p id="empty">No quarantined messages.</p>'
    )
    more = ""
    if next_cursor:
        query = urlencode({**search, "after": next_cursor})
        more = f'<p><a id="next" href="/?{h(query)}">Older messages</a></p>'
    title = {"operator": "Quarantine: every customer", "admin": "Quarantine", "user": "Your mail"}
    return page(title[role], form + table + more, who=who, csrf=csrf)


def _size(size: int | None) -> str:
    if size is None:
        return ""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1024 / 1024:.1f} MiB"


class _Text(HTMLParser):
    """HTML to plain text: tags dropped, scripts and styles dropped whole."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip += 1
        elif tag in ("br", "p", "div", "tr", "li", "h1", "h2", "h3", "table"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head", "title") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _Text()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts)


def preview(raw: bytes | None, limit: int = MAX_PREVIEW) -> dict[str, Any]:
    """Headers, the text (or HTML as text) and the attachments' names of a stored message; only
    its first ``limit`` bytes are parsed (``cut``: the message is longer), so a big message
    costs a bounded time."""
    if raw is None:
        return {"headers": [], "text": None, "attachments": [], "error": None, "cut": False}
    cut = len(raw) > limit
    view = _preview(bytes(raw[:limit]) if cut else raw)
    view["cut"] = cut
    return view


def _preview(raw: bytes) -> dict[str, Any]:
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        headers = [(str(k), _header(v)) for k, v in list(msg.items())[:MAX_HEADERS]]
        text = None
        body = msg.get_body(preferencelist=("plain", "html"))
        if body is not None:
            content = _content(body)
            text = html_to_text(content) if body.get_content_type() == "text/html" else content
        attachments = []
        for part in msg.walk():
            if part.is_multipart() or part is body:
                continue
            name = part.get_filename()
            if name is not None or part.get_content_disposition() == "attachment":
                attachments.append(
                    {
                        "name": name or "(no name)",
                        "type": part.get_content_type(),
                        "size": len(part.get_payload(decode=True) or b""),
                    }
                )
        return {
            "headers": headers,
            "text": None if text is None else text[:MAX_TEXT],
            "attachments": attachments,
            "error": None,
        }
    except Exception as exc:  # a malformed message: say so, show what we can (nothing)
        return {"headers": [], "text": None, "attachments": [], "error": type(exc).__name__}


def _header(value: Any) -> str:
    """A header's value on one line: folding whitespace (tabs included) shown as one space;
    every other non-printable stays visible (``h``)."""
    try:
        text = str(value)
    except Exception:
        return "(undecodable)"
    return re.sub(r"[ \t]*\r?\n?[ \t]+", " ", text)


def _content(part: Any) -> str:
    try:
        return str(part.get_content())
    except (LookupError, ValueError):
        payload = part.get_payload(decode=True) or b""
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def message_page(row: dict[str, Any], *, who: str, role: str, csrf: str, note: str = "") -> str:
    eid = h(str(row["event_id"]))
    view = preview(row["message"])
    facts = [
        ("Date", _when(row["scanned_at"])),
        ("Sender", row["sender"] or "<>"),
        ("Recipients", ", ".join(row["recipients"] or [])),
        ("Subject", row["subject"] or ""),
        ("Verdict", row["verdict"]),
        ("Findings", _findings(row["findings"])),
        ("Size", _size(row["size_bytes"])),
        ("Tower", row["tower"]),
        ("Expires", _when(row["expires_at"])),
        ("State", row["state"]),
    ]
    body = ""
    if note:
        body += f'<p class="notice" id="notice">{h(note)}</p>'
    body += '<dl id="facts">' + "".join(f"<dt>{h(k)}</dt><dd>{h(v)}</dd>" for k, v in facts)
    body += "</dl>"
    actions = []
    # A user never releases or downloads a virus (the app refuses it too): their admin may.
    virus_held = role == "user" and row["verdict"] == "virus"
    if row["message"] is not None and not virus_held:
        actions.append(_action(eid, "release", "Release", csrf))
        if role != "user":
            actions.append(_action(eid, "delete", "Delete", csrf))
        actions.append(f'<a id="raw" href="/message/{eid}/raw">Download (.eml)</a>')
    elif row["message"] is not None:
        actions.append(
            '<p id="virus-held">This message holds a virus: only your mail administrator can'
            " release or download it.</p>"
        )
    if role != "user" and row["sender"]:
        actions.append(_action(eid, "allow", "Allow this sender", csrf))
    body += f'<div class="actions">{"".join(actions)}</div>'
    requests = row.get("requests") or []
    if requests:
        body += '<h2>Requests</h2><table id="requests"><tr><th>Action</th><th>By</th>'
        body += "<th>Asked</th><th>Done</th><th>Result</th></tr>"
        for q in requests:
            body += (
                f"<tr><td>{h(q['action'])}</td><td>{h(q['requested_by'])}</td>"
                f"<td>{h(_when(q['requested_at']))}</td><td>{h(_when(q['done_at']))}</td>"
                f"<td>{h(q['result'] or 'pending')}</td></tr>"
            )
        body += "</table>"
    if view["error"]:
        body += f'<p class="error">This message could not be read ({h(view["error"])}).</p>'
    if view["cut"]:
        body += (
            f'<p class="notice" id="cut">This message is {h(_size(len(row["message"])))}: only'
            f" its first {h(_size(MAX_PREVIEW))} are shown here, so its text and attachments"
            " may be cut short or missing.</p>"
        )
    if view["attachments"]:
        body += (
            '<h2>Attachments</h2><ul id="attachments">'
            + "".join(
                f"<li>{h(a['name'])} ({h(a['type'])}, {h(_size(a['size']))})</li>"
                for a in view["attachments"]
            )
            + "</ul>"
        )
    if view["headers"]:
        body += (
            '<h2>Headers</h2><pre id="headers">'
            + "\n".join(f"{h(k)}: {h(v)}" for k, v in view["headers"])
            + "</pre>"
        )
    if view["text"] is not None:
        body += f'<h2>Text</h2><pre id="text">{h_text(view["text"])}</pre>'
    elif row["message"] is None:
        body += '<p id="no-copy">The message itself is no longer kept here.</p>'
    return page("Quarantined message", body, who=who, csrf=csrf)


def _action(eid: str, action: str, label: str, csrf: str) -> str:
    return (
        f'<form method="post" action="/message/{eid}/{action}" class="inline">'
        f'{csrf_field(csrf)}<button id="{action}" type="submit">{h(label)}</button></form>'
    )


def error_page(status: int, text: str) -> str:
    return page(f"{status}", f"<p>{h(text)}</p>")
