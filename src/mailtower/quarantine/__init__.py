"""The quarantine's row contract, shared by scand, the monitor and the GOC's portal.

A quarantined message is one row of ``verdict_events`` with its raw bytes in ``message``
(docs/quarantine.md). This package says what such a row holds (``Quarantined``), how it is
written (``INSERT``, ``insert``) and read (``by_event_id``, ``by_quarantine_id``, ``page``), and
how its ``subject`` column is made from the message (``subject_of``). It takes a psycopg
connection from its caller and opens none: who connects, with which role, is the caller's.
"""

from __future__ import annotations

from mailtower.quarantine.rows import (
    ACTION_LOCK,
    COLUMNS,
    INSERT,
    PAGE_MAX,
    RELEASES,
    Quarantined,
    Release,
    by_event_id,
    by_quarantine_id,
    cursor_of,
    insert,
    page,
    released_to,
    releases,
)
from mailtower.quarantine.subject import SUBJECT_MAX, subject_of

__all__ = [
    "ACTION_LOCK",
    "COLUMNS",
    "INSERT",
    "PAGE_MAX",
    "RELEASES",
    "SUBJECT_MAX",
    "Quarantined",
    "Release",
    "by_event_id",
    "by_quarantine_id",
    "cursor_of",
    "insert",
    "page",
    "released_to",
    "releases",
    "subject_of",
]
