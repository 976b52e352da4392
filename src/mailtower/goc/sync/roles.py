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

from mailtower.goc.sync.catalog import Conn, scalar
from mailtower.goc.sync.changes import Changes
from mailtower.goc.sync.exceptions import SyncError
from mailtower.goc.sync.names import SYNC_ROLE

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
    ensure_login_role(conn, SYNC_ROLE, password, changes, replication=True)


def ensure_login_role(
    conn: Conn, name: str, password: str | None, changes: Changes, *, replication: bool = False
) -> None:
    """Role ``name`` with LOGIN (and REPLICATION), and ``password`` (None: leave it alone)."""
    row = conn.execute(
        "SELECT rolcanlogin, rolreplication, rolpassword FROM pg_authid WHERE rolname = %s",
        (name,),
    ).fetchone()
    role = sql.Identifier(name)
    attributes = sql.SQL("LOGIN REPLICATION" if replication else "LOGIN")
    if row is None:
        if password is None:
            raise SyncError(f"{changes.server}: role {name} is missing; give its password")
        conn.execute(
            sql.SQL("CREATE ROLE {} {} PASSWORD {}").format(
                role, attributes, sql.Literal(scram_verifier(password))
            )
        )
        changes.did(f"created role {name} ({attributes.as_string(None)})")
        return
    can_login, has_replication, verifier = row
    if not can_login or (replication and not has_replication):
        conn.execute(sql.SQL("ALTER ROLE {} {}").format(role, attributes))
        changes.did(f"gave role {name} {attributes.as_string(None)}")
    if password is not None and not scram_matches(verifier, password):
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(role, sql.Literal(scram_verifier(password)))
        )
        changes.did(f"set the password of role {name}")


def ensure_privileges(
    conn: Conn, role: str, table: str, privileges: tuple[str, ...], changes: Changes
) -> None:
    """``privileges`` (e.g. SELECT, INSERT) on ``public.<table>`` for ``role``."""
    for privilege in privileges:
        if not scalar(
            conn,
            "SELECT has_table_privilege(%s, %s, %s)",
            (role, f"public.{table}", privilege),
        ):
            conn.execute(
                sql.SQL("GRANT {} ON {} TO {}").format(
                    sql.SQL(privilege), sql.Identifier("public", table), sql.Identifier(role)
                )
            )
            changes.did(f"granted {privilege} on {table} to {role}")


def ensure_select(conn: Conn, tables: tuple[str, ...], changes: Changes) -> None:
    """SELECT for the sync role: the initial table copy and reconciliation read with it."""
    for table in tables:
        ensure_privileges(conn, SYNC_ROLE, table, ("SELECT",), changes)
