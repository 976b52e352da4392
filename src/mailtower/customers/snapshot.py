"""Every customer's policy as one file: what scand's workers read per message.

The tower's SQL holds the policies (replicated from the GOC); a scanner's supervisor polls it
and, when something changed, writes ``domain → customer`` and ``customer → policy`` to one
JSON file, atomically. Workers read the file rather than SQL: a message never waits for the
database, and a tower whose SQL is down keeps scanning with the policies it last saw.

A change costs what changed, not the whole tower: every row of the three tables carries the
tower's generation it was last written at (``mt_gen``, set by a trigger), so a poll after a
change to one customer reads that customer (``load_delta``). Deletions, renames, TRUNCATE and
another SQL server cannot be seen that way: they make the poller read everything (``load``),
as does a periodic full reload, the safety net (``plan``). Either way the result is the same.

Each policy is validated with ``mailtower.customers.policy.parse``; one that does not pass
(written around the GOC's command) leaves that customer with its previous policy, so a typo
never lifts a customer's bans. A customer with no valid policy ever seen here has none: scand
answers 451 for its mail (the relay keeps it) until a valid one arrives — the default would
lift the bans it asked for.
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

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


def _in_order(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    """``mapping`` with its keys in order: itself if they are already (a full load's domains
    come sorted), else a sorted copy."""
    keys = list(mapping)
    if all(map(operator.lt, keys, itertools.islice(keys, 1, None))):
        return mapping
    return dict(sorted(mapping.items()))


def _text(policy: CustomerPolicy) -> str:
    """The JSON text of ``policy`` (the text it was parsed from, else ``dump``)."""
    known = _TEXT.get(id(policy))
    if known is not None and known[0] is policy:
        return known[1]
    return dump(policy)


# Run every second (templates/sql/etc/mailtower/sql/schema.sql.j2 has the trigger): the
# tower's generation n (raised by every row written to these tables, replicated or local), the
# count of removals among them (rows deleted, keys changed), the tables' file nodes (a TRUNCATE
# makes new ones and fires no row trigger) and when the server started (another server, or
# this one restarted: its history may not continue the one the snapshot was made from). O(1)
# however many customers; correct whatever order transactions commit in (the generations are
# handed out in commit order; a "latest updated_at" is not: it is a transaction's start time).
# The tower's schema is applied before its scanners deploy.
CHANGE_QUERY = """
SELECT concat_ws('/', g.n, g.removals,
    pg_relation_filenode('customers'), pg_relation_filenode('domains'),
    pg_relation_filenode('policies'), extract(epoch FROM pg_postmaster_start_time()))
FROM config_generation g
"""
# Every active domain with its customer and that customer's policy (NULL: no policies row,
# the default policy).
LOAD_QUERY = """
SELECT d.name, c.name, p.policy::text
FROM domains d
JOIN customers c ON c.id = d.customer_id
LEFT JOIN policies p ON p.customer_id = c.id
WHERE d.active
ORDER BY d.name COLLATE "C"
"""
# The customers written since generation %(since)s (their own row, one of their domains or
# their policy: three index scans on mt_gen, not an OR across a join), each with every domain
# of theirs, active or not, so that a domain deactivated or moved to them is seen.
DELTA_QUERY = """
SELECT d.name, d.active, c.name, p.policy::text
FROM (
    SELECT id FROM customers WHERE mt_gen > %(since)s
    UNION SELECT customer_id FROM domains WHERE mt_gen > %(since)s
    UNION SELECT customer_id FROM policies WHERE mt_gen > %(since)s
) AS changed
JOIN customers c ON c.id = changed.id
JOIN domains d ON d.customer_id = c.id
LEFT JOIN policies p ON p.customer_id = c.id
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

    def same_content(self, other: Snapshot) -> bool:
        """Do both scan every recipient alike (whatever their generation, time and check)?"""
        return (
            self.invalid == other.invalid
            and self.domains == other.domains
            and self.policies == other.policies
        )

    # -- the file

    def to_json(self) -> bytes:
        # Keys in order, and each mapping sorted here only if it is not in order already
        # (json.dumps' sort_keys sorted them all again); the bytes are the same.
        doc = {
            "check": self.check,
            "domains": _in_order(self.domains),
            "format": FORMAT,
            "generation": self.generation,
            "invalid": list(self.invalid),
            # Each policy as its JSON text: a reader parses only the texts it has not seen.
            "policies": {name: _text(policy) for name, policy in _in_order(self.policies).items()},
            "written_at": self.written_at,
        }
        return (json.dumps(doc, separators=(",", ":")) + "\n").encode()

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
            domains = doc["domains"]
            # JSON keys are text; the values are checked, not copied (each worker reads the
            # whole file on every change).
            if not isinstance(domains, dict) or not all(type(v) is str for v in domains.values()):
                raise TypeError("domains must map names to names")
            policies = {}
            known = _PARSED.get
            for name, value in dict(doc["policies"]).items():
                policy = known(value) if type(value) is str else None
                if policy is None:
                    if not isinstance(value, str):
                        raise SnapshotError(f"{what}: the policy of {name} is not JSON text")
                    try:
                        policy = _parsed(value)
                    except PolicyError as exc:
                        raise PolicyError(f"{what}: policy of {name}: {exc}") from None
                policies[name] = policy
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


@dataclass(frozen=True)
class Check:
    """The change check's answer, read: ``n`` and ``removals`` from config_generation, and
    ``rest`` (the file nodes and the server's start), which must not change between deltas."""

    n: int
    removals: int
    rest: str

    @classmethod
    def parse(cls, text: str) -> Check | None:
        """None for an answer of another form (an older scanner's file, a test's token)."""
        parts = text.split("/")
        if len(parts) != 6:
            return None
        try:
            return cls(int(parts[0]), int(parts[1]), "/".join(parts[2:]))
        except ValueError:
            return None


def change_check(conn: Connection) -> str:
    """The change check's answer now: equal answers, equal snapshots."""
    with conn.cursor() as cur:
        cur.execute(CHANGE_QUERY)
        row = cur.fetchone()
    return str(row[0]) if row else ""


Mode = Literal["none", "delta", "full"]
# Rows written since the snapshot above which a poll reads everything rather than a delta (in
# the lab, 23 scanners' deltas of 10,000 new customers at once ran past 5 s: the UNION of the
# changed ids and the joins cost more than the plain sorted read of every row).
DELTA_MAX_WRITES = 1000


def plan(previous: Snapshot | None, check: str, *, full: bool = False) -> Mode:
    """How to bring ``previous`` to the state the change check answered ``check`` for:
    "none" (nothing changed), "delta" (only rows were written: read the customers written
    since ``previous.check``'s generation) or "full" (read everything: no snapshot yet,
    ``full`` asked for, a row deleted or a key changed, a TRUNCATE, another server or the
    generation gone back, an answer of another form)."""
    if previous is None or full:
        return "full"
    if check == previous.check:
        return "none"
    now, before = Check.parse(check), Check.parse(previous.check)
    if now is None or before is None:
        return "full"
    if now.removals != before.removals or now.rest != before.rest or now.n < before.n:
        return "full"
    if now.n - before.n > DELTA_MAX_WRITES:
        return "full"  # a bulk change: one plain read of everything costs less than the delta
    return "delta"


def refresh(
    conn: Connection, previous: Snapshot | None, *, full: bool = False, now: float | None = None
) -> tuple[Snapshot, Mode]:
    """One poll: the change check, then what ``plan`` says. Returns the snapshot SQL gives now
    (``previous`` itself for "none") and the mode. The check is read before the load, and the
    snapshot records it: a transaction committed in between is in this load and read again
    by the next delta (applying a customer twice gives the same result), never missed."""
    check = change_check(conn)
    mode = plan(previous, check, full=full)
    if mode == "none":
        assert previous is not None  # plan
        return previous, mode
    if mode == "delta":
        assert previous is not None  # plan
        since = Check.parse(previous.check)
        assert since is not None  # plan
        return load_delta(conn, previous, since.n, check=check, now=now), mode
    return load(conn, previous, check=check, now=now), mode


def _policy(customer: str, stored: Any, kept: CustomerPolicy | None) -> CustomerPolicy:
    """The policy ``stored`` for ``customer`` (None: no policies row, the default); raises
    PolicyError, logged, if it does not pass (its caller keeps ``kept``)."""
    if stored is None:
        return DEFAULT
    # text from the queries (a driver that decodes jsonb gives a mapping)
    text = stored if isinstance(stored, str) else json.dumps(stored, sort_keys=True)
    try:
        return _parsed(text)
    except PolicyError as exc:
        log.error(
            "event=policy_invalid customer=%s keeping=%s error=%r",
            customer,
            "previous" if kept is not None else "none: its mail is held (451)",
            str(exc),
        )
        raise


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
    invalid: set[str] = set()
    for domain, name, stored in rows:
        customer = str(name)
        domains[str(domain).lower()] = customer
        if customer in policies or customer in invalid:
            continue
        kept = previous.policies.get(customer)
        try:
            policies[customer] = _policy(customer, stored, kept)
        except PolicyError:
            invalid.add(customer)
            if kept is not None:
                policies[customer] = kept
    return Snapshot(
        domains=domains,
        policies=policies,
        invalid=tuple(sorted(invalid)),
        generation=previous.generation + 1,
        written_at=time.time() if now is None else now,
        check=check,
    )


def load_delta(
    conn: Connection,
    previous: Snapshot,
    since: int,
    *,
    check: str = "",
    now: float | None = None,
) -> Snapshot:
    """``previous`` with the customers written after generation ``since`` read again: equal
    to what ``load`` gives when no row was deleted and no key changed since (``plan``)."""
    with conn.cursor() as cur:
        cur.execute(DELTA_QUERY, {"since": since})
        rows = cur.fetchall()
    domains = dict(previous.domains)
    policies = dict(previous.policies)
    invalid = set(previous.invalid)
    stored_of: dict[str, Any] = {}  # changed customers with an active domain → stored policy
    named: set[str] = set()  # every customer the rows name
    left: set[str] = set()  # customers a domain was mapped to before and is not now
    for domain, active, customer, stored in rows:
        name, customer = str(domain).lower(), str(customer)
        named.add(customer)
        before = domains.get(name)
        if active:
            domains[name] = customer  # in place: the order stays (to_json need not sort)
            stored_of.setdefault(customer, stored)
        elif before is not None:
            del domains[name]
        if before is not None and (before != customer or not active):
            left.add(before)
    for customer, stored in stored_of.items():
        invalid.discard(customer)
        try:
            policies[customer] = _policy(customer, stored, previous.policies.get(customer))
        except PolicyError:
            invalid.add(customer)  # its previous policy stays, if it had one
    # Customers no active domain maps to any more are not in a full load: out.
    maybe_gone = (named | left) - stored_of.keys()
    if maybe_gone:
        mapped = set(domains.values())
        for customer in maybe_gone - mapped:
            policies.pop(customer, None)
            invalid.discard(customer)
    return Snapshot(
        domains=domains,
        policies=policies,
        invalid=tuple(sorted(invalid)),
        generation=previous.generation + 1,
        written_at=time.time() if now is None else now,
        check=check,
    )


__all__ = [
    "Check",
    "Snapshot",
    "SnapshotError",
    "change_check",
    "load",
    "load_delta",
    "plan",
    "read",
    "refresh",
]
