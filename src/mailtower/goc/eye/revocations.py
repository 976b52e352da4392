"""Where logged-out sessions are remembered, so that a restart of VirusEye does not bring a
logged-out cookie back to life.

Sessions are signed tokens (``auth.Sessions``); logout revokes one by its random session id
until the token would have expired anyway. ``Sessions`` keeps the revoked ids in memory for its
per-request check; a store keeps them across restarts: ``PgRevocations`` in the GOC database
(``public.eye_revoked_sessions``, schema.sql), ``MemoryRevocations`` for tests. Both are
blocking: the web server calls them from a worker thread.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import psycopg


class RevocationStore(Protocol):
    """Revoked session ids with the unix time each token expires (blocking calls)."""

    def load(self) -> dict[str, int]:
        """Every revoked id that has not expired yet."""
        ...

    def add(self, sid: str, expires: int) -> None:
        """Remember ``sid`` as revoked until ``expires`` (and forget ids past theirs)."""
        ...


class MemoryRevocations:
    """A store in this process's memory: survives an app, not the process (tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._revoked: dict[str, int] = {}

    def load(self) -> dict[str, int]:
        now = time.time()
        with self._lock:
            return {s: e for s, e in self._revoked.items() if e > now}

    def add(self, sid: str, expires: int) -> None:
        with self._lock:
            now = time.time()
            self._revoked = {s: e for s, e in self._revoked.items() if e > now}
            self._revoked[sid] = expires


LOAD = (
    "SELECT sid, extract(epoch FROM expires_at)::bigint FROM public.eye_revoked_sessions"
    " WHERE expires_at > now()"
)
ADD = (
    "INSERT INTO public.eye_revoked_sessions (sid, expires_at) VALUES (%s, to_timestamp(%s))"
    " ON CONFLICT (sid) DO NOTHING"
)
PRUNE = "DELETE FROM public.eye_revoked_sessions WHERE expires_at <= now()"


class PgRevocations:
    """Revoked sessions in the GOC hub (the ``mt_eye`` role may SELECT, INSERT and DELETE)."""

    def __init__(self, dsn: str):
        self.dsn = dsn

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=5,
            options="-c statement_timeout=10000",
            application_name="mailtower-eye",
        )

    def load(self) -> dict[str, int]:
        with self._connect() as conn:
            return {str(sid): int(expires) for sid, expires in conn.execute(LOAD)}

    def add(self, sid: str, expires: int) -> None:
        with self._connect() as conn, conn.transaction():
            conn.execute(ADD, (sid, expires))
            conn.execute(PRUNE)
