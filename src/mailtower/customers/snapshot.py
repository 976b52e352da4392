"""Every customer's policy as one file: what scand's workers read per message.

The tower's SQL holds the policies (replicated from the GOC); a scanner's supervisor polls it
and, when something changed, writes ``domain → customer`` and ``customer → policy`` to one
JSON file, atomically. Workers read the file rather than SQL: a message never waits for the
database, and a tower whose SQL is down keeps scanning with the policies it last saw.

Each policy is validated with ``mailtower.customers.policy.parse``; one that does not pass
(written around the GOC's command) leaves that customer with its previous policy, so a typo
never lifts a customer's bans. A customer with no valid policy ever seen here has none: scand
answers 451 for its mail (the relay keeps it) until a valid one arrives — the default would
lift the bans it asked for.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mailtower import _fsio
from mailtower.customers.errors import SnapshotError
from mailtower.customers.policy import DEFAULT, CustomerPolicy, PolicyError, dump, parse

log = logging.getLogger(__name__)

FORMAT = 2  # the file's "format": a reader refuses another one

# Policies parsed before, by their JSON text, and each parsed policy's stored text. A change
# to one customer of 10,000 makes the poller and every worker parse that one policy again,
# not all of them (measured in the lab: 46 scanners re-validating 10,000 policies at once took
# 17 s of two shared CPUs; docs/benchmarks.md). Policies are immutable, so sharing is safe.
_PARSED: dict[str, CustomerPolicy] = {}
_TEXT: dict[int, tuple[CustomerPolicy, str]] = {}  # id(policy) → (policy, its text)
_CACHE_LIMIT = 200_000  # distinct policy texts kept (then the caches start again)


def _parsed(text: str) -> CustomerPolicy:
    """``parse(text)``, once per distinct text; raises PolicyError as parse does."""
    policy = _PARSED.get(text)
    if policy is None:
        if len(_PARSED) >= _CACHE_LIMIT:
            _PARSED.clear()
            _TEXT.clear()
        policy = parse(text)
        _PARSED[text] = policy
        _TEXT.setdefault(id(policy), (policy, text))
    return policy


def _text(policy: CustomerPolicy) -> str:
    """The JSON text of ``policy`` (the text it was parsed from, else ``dump``)."""
    known = _TEXT.get(id(policy))
    if known is not None and known[0] is policy:
        return known[1]
    return dump(policy)


# Run every second: the tower's config generation (raised by a row trigger on every write to
# these tables, replicated or local: templates/sql/etc/mailtower/sql/schema.sql.j2) and the
# tables' file nodes (a TRUNCATE makes new ones and fires no row trigger). O(1) however many
# customers; correct whatever order transactions commit in (a "latest updated_at" is not: it
# is a transaction's start time). The tower's schema is applied before its scanners deploy.
CHANGE_QUERY = """
SELECT concat_ws('/', (SELECT n FROM config_generation),
    pg_relation_filenode('customers'), pg_relation_filenode('domains'),
    pg_relation_filenode('policies'))
"""
# Every active domain with its customer and that customer's policy (NULL: no policies row,
# the default policy).
LOAD_QUERY = """
SELECT d.name, c.name, p.policy::text
FROM domains d
JOIN customers c ON c.id = d.customer_id
LEFT JOIN policies p ON p.customer_id = c.id
WHERE d.active
ORDER BY d.name
"""


class _Cursor(Protocol):
    def execute(self, query: Any, params: Any = ...) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the snapshot needs of a psycopg connection."""

    def cursor(self) -> Any: ...


@dataclass(frozen=True)
class Snapshot:
    """Customers' policies at one moment. ``domains``: domain (lower case) → customer name;
    ``policies``: customer name → policy; ``invalid``: customers whose stored policy did not
    pass validation (they have their previous one here); ``generation`` counts the snapshots
    a poller wrote, ``written_at`` is when (epoch seconds); ``check``: the change check's
    answer the snapshot was made at."""

    domains: Mapping[str, str] = field(default_factory=dict)
    policies: Mapping[str, CustomerPolicy] = field(default_factory=dict)
    invalid: tuple[str, ...] = ()
    generation: int = 0
    written_at: float = 0.0
    check: str = ""

    def customer_of(self, address: str) -> str | None:
        """The customer whose domain ``address`` is at (None: no customer's)."""
        domain = address.rpartition("@")[2].strip().rstrip(".").lower()
        return self.domains.get(domain)

    def lookup(self, address: str) -> tuple[str | None, CustomerPolicy | None]:
        """(customer, policy) for a recipient ``address``: (None, DEFAULT) when its domain is
        no customer's; (customer, None) when that customer's stored policy never passed
        validation here (scand holds its mail: scanning it by the default would lift bans)."""
        customer = self.customer_of(address)
        if customer is None:
            return None, DEFAULT
        policy = self.policies.get(customer)
        if policy is None:
            return customer, None if customer in self.invalid else DEFAULT
        return customer, policy

    # -- the file

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "generation": self.generation,
            "written_at": self.written_at,
            "check": self.check,
            "domains": dict(sorted(self.domains.items())),
            # Each policy as its JSON text: a reader parses only the texts it has not seen.
            "policies": {name: _text(policy) for name, policy in self.policies.items()},
            "invalid": list(self.invalid),
        }
        return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, what: str = "policy snapshot") -> Snapshot:
        """The snapshot in ``data``; SnapshotError if it is not one (each policy is validated
        again: a reader never applies what it cannot check)."""
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise SnapshotError(f"{what}: not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise SnapshotError(f"{what}: not a policy snapshot of format {FORMAT}")
        try:
            domains = {str(k): str(v) for k, v in dict(doc["domains"]).items()}
            policies = {}
            for name, value in dict(doc["policies"]).items():
                if not isinstance(value, str):
                    raise SnapshotError(f"{what}: the policy of {name} is not JSON text")
                try:
                    policies[str(name)] = _parsed(value)
                except PolicyError as exc:
                    raise PolicyError(f"{what}: policy of {name}: {exc}") from None
            return cls(
                domains=domains,
                policies=policies,
                invalid=tuple(str(n) for n in doc.get("invalid", ())),
                generation=int(doc["generation"]),
                written_at=float(doc["written_at"]),
                check=str(doc.get("check", "")),
            )
        except PolicyError as exc:
            raise SnapshotError(str(exc)) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{what}: malformed ({type(exc).__name__}: {exc})") from None

    def write(self, path: Path) -> None:
        """Write to ``path`` atomically (a reader sees the old file or the new one, whole)."""
        _fsio.write_atomic(path, self.to_json(), mode=0o644)


def read(path: Path) -> Snapshot:
    """The snapshot at ``path``; FileNotFoundError if there is none, SnapshotError if it is
    broken."""
    return Snapshot.from_json(path.read_bytes(), what=f"policy snapshot {path}")


# -- from SQL


def change_check(conn: Connection) -> str:
    """The change check's answer now: equal answers, equal snapshots."""
    with conn.cursor() as cur:
        cur.execute(CHANGE_QUERY)
        row = cur.fetchone()
    return str(row[0]) if row else ""


def load(
    conn: Connection, previous: Snapshot | None, *, check: str = "", now: float | None = None
) -> Snapshot:
    """The snapshot SQL gives now. A policy that does not pass ``parse`` is logged and its
    customer keeps the policy in ``previous`` (the default if it had none); such customers
    are listed in ``invalid``."""
    with conn.cursor() as cur:
        cur.execute(LOAD_QUERY)
        rows = cur.fetchall()
    previous = previous or Snapshot()
    domains: dict[str, str] = {}
    policies: dict[str, CustomerPolicy] = {}
    invalid: list[str] = []
    for domain, customer, stored in rows:
        domains[str(domain).lower()] = str(customer)
        if customer in policies or customer in invalid:
            continue
        try:
            if stored is None:
                policies[customer] = DEFAULT
            else:  # text from LOAD_QUERY (a driver that decodes jsonb gives a mapping)
                text = stored if isinstance(stored, str) else json.dumps(stored, sort_keys=True)
                policies[customer] = _parsed(text)
        except PolicyError as exc:
            kept = previous.policies.get(customer)
            log.error(
                "event=policy_invalid customer=%s keeping=%s error=%r",
                customer,
                "previous" if kept is not None else "none: its mail is held (451)",
                str(exc),
            )
            invalid.append(customer)
            if kept is not None:
                policies[customer] = kept
    return Snapshot(
        domains=domains,
        policies=policies,
        invalid=tuple(invalid),
        generation=previous.generation + 1,
        written_at=time.time() if now is None else now,
        check=check,
    )


__all__ = ["Snapshot", "SnapshotError", "change_check", "load", "read"]
