"""How long the relay keeps mail it cannot deliver to a customer: each customer's policy.

A customer's ``retention_days`` (``mailtower.customers.policy``, 1-14, default 3) is read
from the tower's SQL for every active domain, whoever put it there (the tower's inventory or
the GOC's sync): the relay's orderer expires deferred mail by it (``mailtower.relay.order``).

When SQL does not answer the last values it read stay in force (also across a restart: they
are kept in a small file). Before any are known (a first start with SQL down) nothing is
expired early: every message gets the tower's ``queue_lifetime``, as before customers had
policies. A domain SQL does not list (mail in transit to the outside, a removed customer) gets
the default policy's retention (3 days, or the tower's ``queue_lifetime`` if that is shorter).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pydantic import ValidationError

from mailtower.customers.policy import DEFAULT, CustomerPolicy

log = logging.getLogger("mailtower.relay.retention")

DAY_S = 86400
DEFAULT_DAYS = DEFAULT.retention_days
# An unreadable value with nothing read before: longer than any tower keeps mail, so the
# tower's own queue_lifetime decides (``lifetime_s`` takes the smaller).
UNKNOWN_DAYS = 10_000
CACHE = Path("/var/lib/mailtower/relay-retention.json")
# Every active domain with its customer's retention; no policies row (or no such key): NULL.
QUERY = (
    "SELECT d.name, p.policy->>'retention_days' FROM domains d "
    "LEFT JOIN policies p ON p.customer_id = d.customer_id WHERE d.active"
)

Rows = Sequence[tuple[str, str | None]]


def sql_fetch(dsn: str) -> Callable[[], Rows]:
    """Rows of QUERY from the tower's SQL (either host answers: it only reads)."""

    def fetch() -> Rows:
        import psycopg

        # A short statement timeout: the orderer waits for this between two passes.
        with psycopg.connect(dsn, autocommit=True, options="-c statement_timeout=5000") as conn:
            return [(str(name), value) for name, value in conn.execute(QUERY).fetchall()]

    return fetch


def days_of(value: str | None) -> int | None:
    """A policy's ``retention_days`` as SQL returns it (text), checked by the policy model;
    None when absent or invalid (the caller then uses the default)."""
    if value is None:
        return None
    try:
        return CustomerPolicy.model_validate({"retention_days": value}).retention_days
    except ValidationError:
        return None


class Retention:
    """Each domain's retention in days, refreshed from SQL every ``refresh_s`` seconds."""

    def __init__(
        self,
        fetch: Callable[[], Rows],
        *,
        refresh_s: float = 30.0,
        cache: Path | None = CACHE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fetch = fetch
        self.refresh_s = refresh_s
        self.cache = cache
        self.clock = clock
        self.days: dict[str, int] | None = self._load()  # None: nothing known yet
        self._due = float("-inf")
        self._failing = False
        self._invalid: dict[str, str] = {}  # domain → the bad value already logged

    def _load(self) -> dict[str, int] | None:
        if self.cache is None:
            return None
        try:
            data = json.loads(self.cache.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("event=retention_cache_unreadable path=%s error=%r", self.cache, str(exc))
            return None
        if not isinstance(data, dict):
            return None
        days: dict[str, int] = {}
        for domain, value in data.items():
            parsed = days_of(str(value)) if isinstance(value, int) else None
            if parsed is not None:
                days[str(domain)] = parsed
        return days

    def _save(self) -> None:
        if self.cache is None or self.days is None:
            return
        try:
            tmp = self.cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.days, sort_keys=True))
            os.replace(tmp, self.cache)
        except OSError as exc:  # the values still hold in memory
            log.warning("event=retention_cache_failed path=%s error=%r", self.cache, str(exc))

    def refresh(self) -> None:
        """Read SQL again if ``refresh_s`` passed; keep what is known when it does not answer."""
        now = self.clock()
        if now < self._due:
            return
        self._due = now + self.refresh_s
        try:
            rows = self.fetch()
        except Exception as exc:  # psycopg errors, DNS, timeouts: keep the last values
            if not self._failing:
                log.warning(
                    "event=retention_sql_failed known_domains=%s error=%r "
                    "(keeping the last values; logged once until SQL answers)",
                    "none" if self.days is None else len(self.days),
                    str(exc),
                )
            self._failing = True
            return
        if self._failing:
            log.info("event=retention_sql_back")
        self._failing = False
        days: dict[str, int] = {}
        for name, value in rows:
            domain = name.strip().rstrip(".").lower()
            parsed = days_of(value)
            if value is None:
                parsed = DEFAULT_DAYS  # no policy, or none said: the default policy's
            elif parsed is None:
                # Unreadable (a newer GOC's value, a hand-written row): never expire early —
                # the value last read for this domain, else the tower's own lifetime.
                parsed = (self.days or {}).get(domain, UNKNOWN_DAYS)
                if self._invalid.get(domain) != value:
                    log.warning(
                        "event=retention_invalid domain=%s retention_days=%r keeping_days=%d",
                        domain,
                        value,
                        parsed,
                    )
                    self._invalid[domain] = value
            else:
                self._invalid.pop(domain, None)
            days[domain] = parsed
        if days != self.days:
            log.info("event=retention_loaded domains=%d", len(days))
            self.days = days
            self._save()

    def lifetime_s(self, domains: Iterable[str], ceiling_s: int) -> int:
        """Seconds a message for ``domains`` is kept: the longest retention among them (one
        message is expired whole, so the most generous customer decides), at most
        ``ceiling_s`` (the tower's ``maximal_queue_lifetime``, which Postfix applies anyway)."""
        if self.days is None:  # nothing read yet: never expire before the tower's own lifetime
            return ceiling_s
        known = self.days
        days = max((known.get(d.lower(), DEFAULT_DAYS) for d in domains), default=DEFAULT_DAYS)
        return min(ceiling_s, days * DAY_S)
