"""The replication role every subscription connects as, and its grants.

Passwords are sent as SCRAM-SHA-256 verifiers made here, so the clear text never reaches the
server (nor its statement log), and a password that is already right is left alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

from psycopg import sql

from mailtower.sync.catalog import Conn, scalar
from mailtower.sync.changes import Changes
from mailtower.sync.exceptions import SyncError
from mailtower.sync.names import SYNC_ROLE

_SCRAM = re.compile(r"^SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)$")
_ITERATIONS = 4096  # PostgreSQL's scram_iterations default


def _keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    # No SASLprep: the project's passwords are ASCII.
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return hashlib.sha256(client_key).digest(), server_key


def scram_verifier(password: str, *, salt: bytes | None = None) -> str:
    """A SCRAM-SHA-256 verifier as pg_authid stores it (RFC 5802/7677)."""
    salt = salt if salt is not None else os.urandom(16)
    stored, server = _keys(password, salt, _ITERATIONS)
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${_ITERATIONS}:{b64(salt).decode()}"
        f"${b64(stored).decode()}:{b64(server).decode()}"
    )


def scram_matches(verifier: str | None, password: str) -> bool:
    match = _SCRAM.match(verifier or "")
    if not match:
        return False
    iterations, salt, stored_key, _server_key = match.groups()
    stored, _ = _keys(password, base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(base64.b64encode(stored).decode(), stored_key)


def ensure_sync_role(conn: Conn, password: str | None, changes: Changes) -> None:
    """``mt_sync``: LOGIN REPLICATION, with ``password`` (None: leave the password alone)."""
    row = conn.execute(
        "SELECT rolcanlogin, rolreplication, rolpassword FROM pg_authid WHERE rolname = %s",
        (SYNC_ROLE,),
    ).fetchone()
    role = sql.Identifier(SYNC_ROLE)
    if row is None:
        if password is None:
            raise SyncError(f"{changes.server}: role {SYNC_ROLE} is missing; give its password")
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}").format(
                role, sql.Literal(scram_verifier(password))
            )
        )
        changes.did(f"created role {SYNC_ROLE} (LOGIN REPLICATION)")
        return
    can_login, replication, verifier = row
    if not (can_login and replication):
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN REPLICATION").format(role))
        changes.did(f"gave role {SYNC_ROLE} LOGIN REPLICATION")
    if password is not None and not scram_matches(verifier, password):
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(role, sql.Literal(scram_verifier(password)))
        )
        changes.did(f"set the password of role {SYNC_ROLE}")


def ensure_select(conn: Conn, tables: tuple[str, ...], changes: Changes) -> None:
    """SELECT for the sync role: the initial table copy and reconciliation read with it."""
    for table in tables:
        if not scalar(
            conn,
            "SELECT has_table_privilege(%s, %s, 'SELECT')",
            (SYNC_ROLE, f"public.{table}"),
        ):
            conn.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(
                    sql.Identifier("public", table), sql.Identifier(SYNC_ROLE)
                )
            )
            changes.did(f"granted SELECT on {table} to {SYNC_ROLE}")
