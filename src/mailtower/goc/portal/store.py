"""The portal's database: its users, sessions, links and audit, and the quarantine it shows.

Blocking psycopg; the web app calls it from worker threads. **Every read of the quarantine
goes through ``_scoped``**, the one place a session's role becomes SQL (operator: every
customer; admin: ``customer_id`` = theirs; user: their address among ``recipients``, both
compared in lower case through ``public.mt_lower_addresses``; admins and users never see a
message with no customer or one set aside as unprocessable), always
with ``quarantine_id IS NOT NULL`` (the partial indexes' condition). A message outside the
scope is simply not found: the app answers 404 exactly as for an id that does not exist.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import Jsonb

from mailtower.goc.eye.auth import USERNAME, hash_password, verify_password
from mailtower.goc.sync import quarantine_actions
from mailtower.goc.sync.changes import Changes

ROLES = ("operator", "admin", "user")
PAGE_SIZE = 50
MAX_SEARCH = 200  # characters of one search field
ACTIONS_TABLE = quarantine_actions.TABLE  # GOC-local: the sync's, and the portal's step's
ADDRESS_RE = re.compile(r"^[^@\s<>()\[\],;:\\\"]{1,64}@[a-z0-9.-]{1,253}$")
# What mt_portal may touch (granted by apply_grants; docs/quarantine.md, "The portal").
VERDICT_COLUMNS = (
    "event_id",
    "tower",
    "scanned_at",
    "verdict",
    "message_id",
    "sender",
    "recipients",
    "findings",
    "quarantine_id",
    "size_bytes",
    "customer_id",
    "subject",
    "expires_at",
    "message",
    "quarantine_meta",
)
OWN_TABLES = ("portal_users", "portal_sessions", "portal_links", "portal_audit")


def token_hash(token: str) -> bytes:
    """What the database keeps of a session id or a link token (never the token itself)."""
    return hashlib.sha256(token.encode()).digest()


def normal_address(address: str) -> str | None:
    """A user's address as the portal compares it (lower case), or None when it is not one."""
    address = address.strip().lower()
    return address if ADDRESS_RE.match(address) and len(address) <= 254 else None


@dataclass(frozen=True)
class Scope:
    """Who is asking: what every query of the quarantine is limited to."""

    role: str  # operator | admin | user
    who: str  # the user's name, or a user's address
    customer_id: int | None = None  # admin: their customer
    address: str | None = None  # user: their address

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r}")
        if (self.role == "admin") != (self.customer_id is not None):
            raise ValueError("an admin, and only an admin, has a customer")
        if (self.role == "user") != (self.address is not None):
            raise ValueError("a user, and only a user, has an address")


def _scoped(scope: Scope, alias: str = "v") -> tuple[sql.Composable, list[Any]]:
    """The one place a scope becomes SQL: the condition and its parameters."""
    col = sql.Identifier(alias)
    base = sql.SQL("{}.quarantine_id IS NOT NULL").format(col)
    if scope.role == "operator":
        return base, []
    # Admins and users: a customer's messages only, never one set aside as unprocessable (never
    # fully scanned; its recipients may be several customers'): those are the operators'.
    base = sql.SQL(
        "{} AND {}.customer_id IS NOT NULL AND NOT ({}.quarantine_meta ? 'unprocessable')"
    ).format(base, col, col)
    if scope.role == "admin":
        return sql.SQL("{} AND {}.customer_id = %s").format(base, col), [scope.customer_id]
    # A user: @> on the lower-cased recipients reads their GIN expression index (= ANY would
    # not); scand keeps Postfix's spelling, so the stored one may have capitals.
    mine = sql.SQL("{} @> ARRAY[%s]::text[]").format(_lower_recipients(alias))
    return sql.SQL("{} AND {}").format(base, mine), [scope.address]


def _lower_recipients(alias: str = "v") -> sql.Composable:
    """The row's recipients in lower case: the expression the GIN index is on (schema.sql)."""
    return sql.SQL("public.mt_lower_addresses({})").format(sql.Identifier(alias, "recipients"))


VIRUS_REFUSED = (
    "This message holds a virus: only your mail administrator can release or download it."
)


def may_take(scope: Scope, row: dict[str, Any]) -> bool:
    """Whether ``scope`` may release or download ``row``: a user never a virus (admins and
    operators may, knowing what they do)."""
    return scope.role != "user" or row["verdict"] != "virus"


@dataclass(frozen=True)
class PortalSession:
    scope: Scope
    csrf: str
    expires_at: datetime


@dataclass
class Search:
    """The list page's filters; empty strings are no filter."""

    sender: str = ""
    recipient: str = ""
    subject: str = ""
    verdict: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def params(self) -> dict[str, str]:
        out = {k: getattr(self, k) for k in ("sender", "recipient", "subject", "verdict")}
        out["since"] = self.since.isoformat() if self.since else ""
        out["until"] = self.until.isoformat() if self.until else ""
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True)
class Cursor:
    """Keyset paging: the last row shown (never OFFSET)."""

    scanned_at: datetime
    event_id: uuid.UUID

    def text(self) -> str:
        return f"{self.scanned_at.isoformat()}_{self.event_id}"

    @classmethod
    def parse(cls, text: str) -> Cursor | None:
        at, _, eid = text.rpartition("_")
        try:
            return cls(datetime.fromisoformat(at), uuid.UUID(eid))
        except ValueError:
            return None


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


STATE_SQL = """
CASE
  WHEN a.action IS NOT NULL AND a.done_at IS NULL THEN a.action || ' pending'
  WHEN a.result = 'released' THEN 'released'
  WHEN a.result = 'deleted' THEN 'deleted'
  WHEN a.result IN ('failed', 'gone') THEN a.action || ' ' || a.result
  WHEN v.message IS NULL AND v.expires_at <= now() THEN 'expired'
  WHEN v.message IS NULL THEN 'gone'
  ELSE 'held'
END"""
STATE_NO_ACTIONS_SQL = """
CASE
  WHEN v.message IS NULL AND v.expires_at <= now() THEN 'expired'
  WHEN v.message IS NULL THEN 'gone'
  ELSE 'held'
END"""


@dataclass
class Store:
    """A lazily (re)connected connection to the GOC hub as mt_portal, one thread at a time."""

    dsn: str
    _conn: psycopg.Connection[Any] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _has_actions: bool | None = None

    @contextmanager
    def conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=5,
                    options="-c statement_timeout=10000",
                    application_name="mailtower-portal",
                    row_factory=dict_row,  # type: ignore[arg-type]
                )
                self._has_actions = None
            try:
                yield self._conn
            except psycopg.OperationalError:
                self._conn.close()
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    def has_actions(self, conn: psycopg.Connection[Any]) -> bool:
        """Whether quarantine_actions exists (``mailtower portal schema`` makes it: only a hub
        that step has not run on lacks it)."""
        if self._has_actions is None:
            row = conn.execute("SELECT to_regclass('public.quarantine_actions') AS t").fetchone()
            self._has_actions = bool(row and row["t"])
        return self._has_actions

    # -- users ---------------------------------------------------------------------------------

    def password_user(self, name: str, password: str) -> Scope | None:
        """The scope of ``name``/``password`` (blocking: ~0.1 s of scrypt), None if wrong."""
        from mailtower.goc.eye.auth import _dummy_hash

        with self.conn() as conn:
            row = conn.execute(
                "SELECT role, customer_id, password FROM public.portal_users WHERE name = %s",
                (name,),
            ).fetchone()
        ok = verify_password(password, row["password"] if row else _dummy_hash())
        if not ok or row is None:
            return None
        return Scope(row["role"], name, customer_id=row["customer_id"])

    # -- sessions ------------------------------------------------------------------------------

    def open_session(self, scope: Scope, lifetime_s: int, idle_s: int) -> tuple[str, PortalSession]:
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        with self.conn() as conn:
            row = conn.execute(
                "INSERT INTO public.portal_sessions (id_hash, role, name, customer_id, address,"
                " csrf, expires_at, idle_s) VALUES (%s, %s, %s, %s, %s, %s,"
                " now() + make_interval(secs => %s), %s) RETURNING expires_at",
                (
                    token_hash(token),
                    scope.role,
                    None if scope.role == "user" else scope.who,
                    scope.customer_id,
                    scope.address,
                    csrf,
                    lifetime_s,
                    idle_s,
                ),
            ).fetchone()
        assert row is not None
        return token, PortalSession(scope, csrf, row["expires_at"])

    def session(self, token: str | None) -> PortalSession | None:
        """The live session ``token`` stands for (not revoked, not past either expiry); it is
        touched (last_seen) at most once a minute. An admin's or operator's session holds only
        while their row still says the same role and customer."""
        if not token or len(token) > 100:
            return None
        digest = token_hash(token)
        with self.conn() as conn:
            row = conn.execute(
                "SELECT s.role, s.name, s.customer_id, s.address, s.csrf, s.expires_at,"
                " s.last_seen < now() - interval '60 seconds' AS stale"
                " FROM public.portal_sessions s"
                " WHERE s.id_hash = %s AND s.revoked_at IS NULL AND s.expires_at > now()"
                " AND s.last_seen > now() - make_interval(secs => s.idle_s)"
                " AND (s.role = 'user' OR EXISTS (SELECT 1 FROM public.portal_users u"
                "      WHERE u.name = s.name AND u.role = s.role"
                "      AND u.customer_id IS NOT DISTINCT FROM s.customer_id))",
                (digest,),
            ).fetchone()
            if row is not None and row["stale"]:  # a write a minute, not one a request
                conn.execute(
                    "UPDATE public.portal_sessions SET last_seen = now() WHERE id_hash = %s",
                    (digest,),
                )
        if row is None:
            return None
        scope = Scope(
            row["role"],
            row["address"] if row["role"] == "user" else row["name"],
            customer_id=row["customer_id"],
            address=row["address"],
        )
        return PortalSession(scope, row["csrf"], row["expires_at"])

    def end_session(self, token: str) -> None:
        with self.conn() as conn:
            conn.execute(
                "UPDATE public.portal_sessions SET revoked_at = now() WHERE id_hash = %s",
                (token_hash(token),),
            )

    # -- one-time links ------------------------------------------------------------------------

    def link_wanted(self, address: str) -> bool:
        """Whether ``address`` has quarantined mail at a customer's domain (a link is sent)."""
        address = address.lower()
        domain = address.rpartition("@")[2]
        where, params = _scoped(Scope("user", address, address=address))  # what they would see
        with self.conn() as conn:
            row = conn.execute(
                sql.SQL(
                    "SELECT EXISTS (SELECT 1 FROM public.domains WHERE name = %s) AND EXISTS ("
                    " SELECT 1 FROM public.verdict_events v WHERE {}) AS wanted"
                ).format(where),
                [domain, *params],
            ).fetchone()
        return bool(row and row["wanted"])

    def new_link(self, address: str, lifetime_s: int) -> str:
        token = secrets.token_urlsafe(32)
        with self.conn() as conn:
            conn.execute(
                "INSERT INTO public.portal_links (token_hash, address, expires_at)"
                " VALUES (%s, %s, now() + make_interval(secs => %s))",
                (token_hash(token), address, lifetime_s),
            )
        return token

    def use_link(self, token: str) -> str | None:
        """The address of a link not used yet and not expired, now used; None otherwise."""
        if not token or len(token) > 100:
            return None
        with self.conn() as conn:
            row = conn.execute(
                "UPDATE public.portal_links SET used_at = now() WHERE token_hash = %s"
                " AND used_at IS NULL AND expires_at > now() RETURNING address",
                (token_hash(token),),
            ).fetchone()
        return None if row is None else str(row["address"])

    # -- the quarantine ------------------------------------------------------------------------

    def page(
        self, scope: Scope, search: Search, after: Cursor | None, size: int = PAGE_SIZE
    ) -> tuple[list[dict[str, Any]], Cursor | None]:
        """One page of the scope's quarantine, newest first, and the cursor of the next one."""
        where, params = _scoped(scope)
        conds: list[sql.Composable] = [where]
        if search.sender:
            conds.append(sql.SQL("v.sender ILIKE %s"))
            params.append(_like(search.sender))
        if search.recipient:
            conds.append(sql.SQL("{} @> ARRAY[%s]::text[]").format(_lower_recipients()))
            params.append(search.recipient.strip().lower())
        if search.subject:
            conds.append(sql.SQL("v.subject ILIKE %s"))
            params.append(_like(search.subject))
        if search.verdict:
            conds.append(sql.SQL("v.verdict = %s"))
            params.append(search.verdict)
        if search.since:
            conds.append(sql.SQL("v.scanned_at >= %s"))
            params.append(search.since)
        if search.until:
            conds.append(sql.SQL("v.scanned_at < %s"))
            params.append(search.until)
        if after is not None:
            # The indexes run (scanned_at DESC, event_id): the same order, so a page is one
            # index range however deep it is.
            conds.append(sql.SQL("v.scanned_at <= %s AND (v.scanned_at < %s OR v.event_id > %s)"))
            params += [after.scanned_at, after.scanned_at, after.event_id]
        with self.conn() as conn:
            state, join = self._state(conn)
            query = sql.SQL(
                "SELECT v.event_id, v.tower, v.scanned_at, v.verdict, v.sender, v.recipients,"
                " v.findings, v.size_bytes, v.subject, v.customer_id, v.expires_at, {state}"
                " AS state FROM public.verdict_events v {join} WHERE {where}"
                " ORDER BY v.scanned_at DESC, v.event_id LIMIT %s"
            ).format(state=state, join=join, where=sql.SQL(" AND ").join(conds))
            rows = conn.execute(query, [*params, size + 1]).fetchall()
        more = len(rows) > size
        rows = rows[:size]
        cursor = Cursor(rows[-1]["scanned_at"], rows[-1]["event_id"]) if more else None
        return rows, cursor

    def _state(self, conn: psycopg.Connection[Any]) -> tuple[sql.Composable, sql.Composable]:
        if not self.has_actions(conn):
            return sql.SQL(STATE_NO_ACTIONS_SQL), sql.SQL("")
        return sql.SQL(STATE_SQL), sql.SQL(
            "LEFT JOIN LATERAL (SELECT q.action, q.result, q.done_at"
            " FROM public.quarantine_actions q WHERE q.event_id = v.event_id"
            " ORDER BY q.requested_at DESC LIMIT 1) a ON true"
        )

    def message(self, scope: Scope, event_id: str) -> dict[str, Any] | None:
        """One message in the scope, with its bytes; None when missing *or* out of scope."""
        try:
            eid = uuid.UUID(event_id)
        except ValueError:
            return None
        where, params = _scoped(scope)
        with self.conn() as conn:
            state, join = self._state(conn)
            row = conn.execute(
                sql.SQL(
                    "SELECT {columns}, {state} AS state FROM public.verdict_events v {join}"
                    " WHERE v.event_id = %s AND {where}"
                ).format(
                    columns=sql.SQL(", ").join(sql.Identifier("v", c) for c in VERDICT_COLUMNS),
                    state=state,
                    join=join,
                    where=where,
                ),
                [eid, *params],
            ).fetchone()
            if row is not None and self.has_actions(conn):
                row["requests"] = conn.execute(
                    "SELECT action, recipients, requested_by, requested_at, done_at, result,"
                    " answer FROM public.quarantine_actions WHERE event_id = %s"
                    " ORDER BY requested_at",
                    (eid,),
                ).fetchall()
        return row

    def request(self, scope: Scope, event_id: str, action: str) -> str:
        """Ask the event's tower to release or delete it; what happened, for the page.

        Raises LookupError when the message is not in the scope (the app's 404)."""
        assert action in ("release", "delete")
        row = self.message(scope, event_id)
        if row is None:
            raise LookupError(event_id)
        if not may_take(scope, row):
            raise PermissionError(VIRUS_REFUSED)
        # quarantine_actions' recipients: a release to these only, empty for a delete (the
        # column means nothing to a delete; empty is "all of them" to the tower's manager).
        recipients: list[str] = []
        if action == "release":
            recipients = list(row["recipients"])
            if scope.address is not None:  # a user: their own copy only, as the row spells it
                recipients = [r for r in recipients if r.lower() == scope.address.lower()]
        with self.conn() as conn:
            if not self.has_actions(conn):
                return "unavailable"
            with conn.transaction():
                # One request at a time per message: a second click is not a second release.
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 18))",
                    (str(row["event_id"]),),
                )
                if row["message"] is None:
                    return "gone"
                gone = conn.execute(
                    "SELECT 1 FROM public.quarantine_actions WHERE event_id = %s"
                    " AND action = 'delete' AND (done_at IS NULL OR result = 'deleted')",
                    (row["event_id"],),
                ).fetchone()
                if gone is not None:
                    return "already"  # a deletion asked or done: nothing more to do
                if action == "release":
                    # Each recipient gets a message once: a release goes only to those no
                    # pending or done release covers (a user's own, then the admin's rest).
                    covered = self._released(conn, row["event_id"], row["recipients"])
                    wanted: list[str] = []
                    for address in recipients:
                        if address.lower() not in covered:
                            covered.add(address.lower())  # and each once
                            wanted.append(address)
                    recipients = wanted
                    if not recipients:
                        return "already"
                conn.execute(
                    "INSERT INTO public.quarantine_actions (request_id, event_id, tower,"
                    " quarantine_id, action, recipients, requested_by, requested_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, now())",
                    (
                        uuid.uuid4(),
                        row["event_id"],
                        row["tower"],
                        row["quarantine_id"],
                        action,
                        recipients,
                        f"{scope.role}:{scope.who}",
                    ),
                )
                self._audit(conn, scope, action, row, {"recipients": recipients})
        return "requested"

    @staticmethod
    def _released(
        conn: psycopg.Connection[Any], event_id: Any, all_recipients: list[str]
    ) -> set[str]:
        """The recipients (lower case) a pending or done release of ``event_id`` already
        covers. A release without recipients is one to all of them, as the tower's manager
        reads it; addresses compare without case, as the manager compares them."""
        rows = conn.execute(
            "SELECT recipients FROM public.quarantine_actions WHERE event_id = %s"
            " AND action = 'release' AND (done_at IS NULL OR result = 'released')",
            (event_id,),
        ).fetchall()
        return {
            address.lower()
            for row in rows
            for address in (row["recipients"] or all_recipients or [])
        }

    def audit(
        self, scope: Scope, action: str, row: dict[str, Any] | None, details: dict[str, Any]
    ) -> None:
        with self.conn() as conn:
            self._audit(conn, scope, action, row, details)

    @staticmethod
    def _audit(
        conn: psycopg.Connection[Any],
        scope: Scope,
        action: str,
        row: dict[str, Any] | None,
        details: dict[str, Any],
    ) -> None:
        conn.execute(
            "INSERT INTO public.portal_audit (who, role, customer_id, action, event_id, tower,"
            " details) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                scope.who,
                scope.role,
                row["customer_id"] if row else scope.customer_id,
                action,
                row["event_id"] if row else None,
                row["tower"] if row else None,
                Jsonb(details),
            ),
        )

    def allow_sender(self, scope: Scope, event_id: str) -> str:
        """Add the message's envelope sender (lower case) to its customer's ``allow_senders``
        (admin: their own customer's messages only, as ``_scoped`` finds them; operator),
        through the GOC's validated policy path (``goc.customers.set_policy``), audited in the
        same transaction; what happened, for the page: ``allowed``, ``already`` (nothing
        changed), ``null-sender``, ``no-customer`` or ``refused: <why>``.

        Raises LookupError when the message is not in the scope (the app's 404)."""
        from mailtower.goc import customers
        from mailtower.goc.errors import InputError, Refused

        if scope.role == "user":
            raise PermissionError("users do not allow-list")
        row = self.message(scope, event_id)
        if row is None:
            raise LookupError(event_id)
        if scope.role == "admin" and row["customer_id"] != scope.customer_id:
            raise LookupError(event_id)  # _scoped already ensures it: never another's policy
        # The null sender (<>: bounces, notices) is never allowed (CustomerPolicy.allows_sender).
        sender = (row["sender"] or "").strip().removeprefix("<").removesuffix(">").strip().lower()
        if not sender:
            return "null-sender"
        if row["customer_id"] is None:
            return "no-customer"  # held under the tower's own policy: no customer's to change
        with self.conn() as conn:
            # goc.customers reads rows by position
            conn.row_factory = tuple_row  # type: ignore[assignment]
            try:
                with conn.transaction():
                    found = conn.execute(
                        "SELECT name FROM public.customers WHERE id = %s", (row["customer_id"],)
                    ).fetchone()
                    if found is None:
                        return "no-customer"
                    name = str(found[0])
                    # Read, add, write under the customer's row lock (set_policy takes the same
                    # lock again in this transaction and validates the result), so two clicks
                    # at once for two senders do not lose one another.
                    customer_id = customers._customer_id(conn, name, lock=True)
                    _, old = customers._stored_policy(conn, customer_id)
                    if sender in old.allow_senders:
                        return "already"
                    changed, _ = customers.set_policy(
                        conn, name, changes={"allow_senders": [*old.allow_senders, sender]}
                    )
                    if not changed:
                        return "already"
                    self._audit(conn, scope, "allow", row, {"sender": sender})
            except (InputError, Refused) as exc:
                return f"refused: {exc}"
            finally:
                conn.row_factory = dict_row  # type: ignore[assignment]
        return "allowed"

    # -- expiry --------------------------------------------------------------------------------

    def expire(self, batch: int = 1000) -> int:
        """NULL the GOC's copy of one batch of messages past ``expires_at`` (and of those
        whose deletion the tower has done); how many."""
        with self.conn() as conn:
            gone = ""
            if self.has_actions(conn):
                gone = (
                    " OR EXISTS (SELECT 1 FROM public.quarantine_actions q"
                    " WHERE q.event_id = v.event_id AND q.action = 'delete'"
                    " AND q.result IN ('deleted', 'gone'))"
                )
            cur = conn.execute(
                "UPDATE public.verdict_events SET message = NULL WHERE event_id IN ("
                " SELECT v.event_id FROM public.verdict_events v WHERE v.message IS NOT NULL"
                f" AND (v.expires_at <= now(){gone}) LIMIT %s)",
                (batch,),
            )
            return cur.rowcount

    def forget(self) -> None:
        """Drop sessions and links long past their end (they are refused already)."""
        with self.conn() as conn:
            conn.execute(
                "DELETE FROM public.portal_sessions WHERE expires_at < now() - interval '1 day'"
            )
            conn.execute(
                "DELETE FROM public.portal_links WHERE expires_at < now() - interval '1 day'"
            )


# -- the schema, the role and the users (as the database's owner: the deploy, the CLI) ---------
# These take a connection with psycopg's default (tuple) rows.


def schema_text() -> str:
    return resources.files("mailtower.goc.portal").joinpath("schema.sql").read_text()


def apply_schema(conn: psycopg.Connection[Any]) -> None:
    """The portal's tables and indexes (idempotent)."""
    conn.execute(schema_text())


PORTAL_ROLE = quarantine_actions.PORTAL_ROLE  # "mt_portal"


def apply_grants(conn: psycopg.Connection[Any], role: str = PORTAL_ROLE) -> list[str]:
    """Least privilege for the portal's role; what was granted (idempotent)."""
    ident = sql.Identifier(role)
    grants = [
        sql.SQL("GRANT SELECT ({}) ON public.verdict_events TO {}").format(
            sql.SQL(", ").join(map(sql.Identifier, VERDICT_COLUMNS)), ident
        ),
        # the GOC's expiry of its copy (Store.expire): this column only
        sql.SQL("GRANT UPDATE (message) ON public.verdict_events TO {}").format(ident),
        sql.SQL("GRANT SELECT ON public.customers, public.domains TO {}").format(ident),
        # the allow-list, through goc.customers.set_policy: it locks the customer's row
        # (FOR UPDATE needs an UPDATE privilege: one column, which it never writes) and
        # upserts the policy.
        sql.SQL("GRANT UPDATE (created_at) ON public.customers TO {}").format(ident),
        sql.SQL("GRANT SELECT, INSERT, UPDATE ON public.policies TO {}").format(ident),
        sql.SQL("GRANT SELECT ON public.portal_users TO {}").format(ident),
        sql.SQL(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON public.portal_sessions,"
            " public.portal_links TO {}"
        ).format(ident),
        sql.SQL("GRANT SELECT, INSERT ON public.portal_audit TO {}").format(ident),
        sql.SQL("GRANT USAGE ON SEQUENCE public.portal_audit_id_seq TO {}").format(ident),
    ]
    for grant in grants:
        conn.execute(grant)
    done = ["verdict_events", "customers", "domains", "policies", *OWN_TABLES]
    # quarantine_actions is the GOC's (goc/sync/quarantine_actions.py): its own ensure makes
    # the table if the sync has not yet, and gives mt_portal its grants and its policy
    # (mt_portal_all: every tower's rows) beside the towers' row-level security, which it
    # never touches. The sync's ensure keeps them too, whichever step runs first.
    if role == PORTAL_ROLE:
        quarantine_actions.ensure_portal(conn, Changes("GOC"))
        done.append(ACTIONS_TABLE)
    return done


def ensure_role(conn: psycopg.Connection[Any], password: str, role: str = PORTAL_ROLE) -> None:
    """The portal's login role with ``password``: the sync's own helper, so the server sees a
    SCRAM verifier, never the password (a statement log would otherwise keep it)."""
    from mailtower.goc.sync.roles import ensure_login_role

    ensure_login_role(conn, role, password, Changes("GOC"))


def set_user(
    conn: psycopg.Connection[Any], name: str, role: str, customer: str | None, password: str
) -> None:
    """Add a portal user or change their role and password; their sessions end."""
    if not USERNAME.match(name):
        raise ValueError(f"user name {name!r}: use letters, digits, . _ - (at most 64)")
    if role not in ("operator", "admin"):
        raise ValueError(f"role {role!r}: operator or admin")
    customer_id = None
    if role == "admin":
        if not customer:
            raise ValueError("an admin needs --customer NAME")
        row = conn.execute(
            "SELECT id FROM public.customers WHERE name = %s", (customer,)
        ).fetchone()
        if row is None:
            raise ValueError(f"no customer {customer!r} (mailtower customer list)")
        customer_id = row[0]
    elif customer:
        raise ValueError("an operator sees every customer: no --customer")
    with conn.transaction():
        conn.execute("DELETE FROM public.portal_sessions WHERE name = %s", (name,))
        conn.execute(
            "INSERT INTO public.portal_users (name, role, customer_id, password)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET role = EXCLUDED.role,"
            " customer_id = EXCLUDED.customer_id, password = EXCLUDED.password,"
            " updated_at = now()",
            (name, role, customer_id, hash_password(password)),
        )


def remove_user(conn: psycopg.Connection[Any], name: str) -> bool:
    cur = conn.execute("DELETE FROM public.portal_users WHERE name = %s", (name,))
    return cur.rowcount > 0


def list_users(conn: psycopg.Connection[Any]) -> list[tuple[str, str, str | None]]:
    rows = conn.execute(
        "SELECT u.name, u.role, c.name FROM public.portal_users u"
        " LEFT JOIN public.customers c ON c.id = u.customer_id ORDER BY u.name"
    ).fetchall()
    return [(str(r[0]), str(r[1]), r[2]) for r in rows]
