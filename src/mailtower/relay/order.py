"""mailtower-relay-order: a returning customer gets its queued mail in the order it arrived.

Postfix retries every deferred message on its own schedule and moves due messages into its
active queue in directory order, so after an outage a customer receives its mail shuffled.
This daemon, on the relay, keeps the order without touching how Postfix delivers:

- while a customer's server does not accept connections, the messages deferred for it are put
  on **hold** (Postfix neither retries nor expires held mail);
- when the server answers again, they are released **oldest first, one at a time**: each is
  handed to Postfix (``postqueue -i``) and delivered — or deferred again, which holds the rest
  back — before the next one is released;
- mail it cannot deliver is returned to its sender after the **customer's retention**
  (``retention_days`` of its policy, read from the tower's SQL: ``mailtower.relay.retention``)
  rather than after Postfix's one ``maximal_queue_lifetime`` for all: a deferred message, or
  one it holds, older than its lifetime is released (if held), force-expired (``postsuper -e``)
  and retried at once (``postqueue -i``), so Postfix returns it with the real delay reason.
  A message's lifetime is the longest retention among the customers of its remaining
  recipients (Postfix expires a message whole, so the most generous customer decides), at most
  ``maximal_queue_lifetime`` (the tower's ``queue_lifetime``, Postfix's own ceiling, which
  still applies when this daemon is stopped). A domain SQL does not list gets the default
  policy's 3 days (capped the same way); before SQL ever answered, and for a value that cannot
  be read, nothing is expired before ``maximal_queue_lifetime`` (or the value last read); SQL
  down keeps the values last read.

The IDs it holds are kept in a state file, so a restart knows its own held mail from an
operator's; ``--release-all`` (run when the service stops) gives every one of them back to
Postfix. Nothing is ever removed from the queue here: at worst mail is delivered unordered,
and expired mail goes back to its sender the way Postfix returns any (a non-delivery notice).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mailtower import settings as settings_mod
from mailtower.relay.retention import Retention, sql_fetch
from mailtower.settings import Customer, TowerSettings

log = logging.getLogger("mailtower.relay.order")

STATE = Path("/var/lib/mailtower/relay-order.json")
# Seconds of a Postfix time value (``3d``, ``20s``; a bare number is days): the settings' own.
duration_s = settings_mod.duration_s


@dataclass(frozen=True)
class Queued:
    """One message in the relay's queue, as ``postqueue -j`` shows it."""

    queue_id: str
    queue: str  # incoming, active, deferred, hold …
    arrival: int
    recipients: tuple[tuple[str, str], ...]  # (address, delay reason), still to deliver
    forced_expire: bool = False  # ``postsuper -e`` done: Postfix returns it at its next attempt
    sender: str | None = None  # "" for a notice (a bounce in transit)

    @classmethod
    def from_json(cls, entry: dict) -> Queued:
        return cls(
            entry["queue_id"],
            entry["queue_name"],
            int(entry.get("arrival_time", 0)),
            tuple((r["address"], r.get("delay_reason", "")) for r in entry.get("recipients", [])),
            bool(entry.get("forced_expire", False)),
            entry.get("sender"),
        )

    @property
    def domains(self) -> list[str]:
        """The domains of its remaining recipients (lower case, each once, sorted)."""
        return sorted({a.rpartition("@")[2].lower() for a, _ in self.recipients})

    def for_customer(self, customer: Customer) -> bool:
        return any(a.rpartition("@")[2].lower() == customer.domain for a, _ in self.recipients)

    def waits_for(self, customer: Customer) -> bool:
        """Deferred because the customer's server could not be reached (not, e.g., a scanner)."""
        return self.queue == "deferred" and any(
            a.rpartition("@")[2].lower() == customer.domain and customer.server in reason
            for a, reason in self.recipients
        )


class Postfix(Protocol):
    """What the orderer needs from Postfix (a fake in the tests)."""

    def queue(self) -> list[Queued]: ...

    def hold(self, queue_id: str) -> None: ...

    def release(self, queue_id: str, *, retry: bool = True) -> None:
        """Out of hold; with ``retry``, attempted at once (else at Postfix's next retry)."""
        ...

    def expire(self, queue_id: str) -> None:
        """Returned to its sender now, with its delay reasons (a deferred message)."""
        ...

    def lifetime_s(self) -> int: ...

    def where(self, queue_id: str) -> str | None:
        """The queue a message is in now (cheap: no full queue listing), None when gone."""
        ...


SPOOL = Path("/var/spool/postfix")


class RealPostfix:
    """postqueue, postsuper and postconf on this host."""

    def _run(self, *args: str) -> str:
        return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout

    def queue(self) -> list[Queued]:
        out = self._run("postqueue", "-j")
        return [Queued.from_json(json.loads(line)) for line in out.splitlines() if line.strip()]

    def hold(self, queue_id: str) -> None:
        self._run("postsuper", "-h", queue_id)

    def release(self, queue_id: str, *, retry: bool = True) -> None:
        """Back from hold, then due now (``postqueue -i``: deliver this one message)."""
        self._run("postsuper", "-H", queue_id)
        if retry:
            self._run("postqueue", "-i", queue_id)

    def expire(self, queue_id: str) -> None:
        """Force-expired (``postsuper -e``: a mark, nothing is deleted), then attempted now
        (``postqueue -i``), which makes the queue manager return it to its sender with the
        recorded delay reasons instead of at its next retry (up to ``maximal_backoff``)."""
        self._run("postsuper", "-e", queue_id)
        self._run("postqueue", "-i", queue_id)

    def lifetime_s(self) -> int:
        return duration_s(self._run("postconf", "-h", "maximal_queue_lifetime").strip())

    def where(self, queue_id: str) -> str | None:
        # Postfix's default layout: deferred is hashed one level by the ID's first character
        # (hash_queue_depth = 1, hash_queue_names = deferred, defer), the others are flat.
        for queue, path in (
            ("active", SPOOL / "active" / queue_id),
            ("incoming", SPOOL / "incoming" / queue_id),
            ("deferred", SPOOL / "deferred" / queue_id[0] / queue_id),
            ("hold", SPOOL / "hold" / queue_id),
        ):
            if path.exists():
                return queue
        return None


def accepts_connections(server: str, port: int, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((server, port), timeout_s):
            return True
    except OSError:
        return False


class Orderer:
    """One pass at a time over the queue; all state but the held IDs lives in Postfix."""

    def __init__(
        self,
        customers: Iterable[Customer],
        postfix: Postfix,
        *,
        retention: Retention | None = None,
        probe: Callable[[Customer], bool] | None = None,
        state: Path = STATE,
        step_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.customers = list(customers)
        self.postfix = postfix
        # Without SQL (tests, a tower without it): every domain gets the default retention.
        self.retention = retention or Retention(lambda: [], cache=None)
        self.expired_total = 0
        self.probe = probe or (lambda c: accepts_connections(c.server, c.port))
        self.state = state
        self.step_timeout_s = step_timeout_s
        self.clock = clock
        self.sleep = sleep
        self.held: set[str] = self._load()

    # -- state ---------------------------------------------------------------------------------

    def _load(self) -> set[str]:
        try:
            return set(json.loads(self.state.read_text()))
        except FileNotFoundError:
            return set()

    def _save(self) -> None:
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(self.held)))
        os.replace(tmp, self.state)

    # -- one pass ------------------------------------------------------------------------------

    def step(self) -> None:
        entries = self.postfix.queue()
        present = {e.queue_id for e in entries}
        if self.held - present:  # delivered or removed by someone else meanwhile
            self.held &= present
            self._save()
        self.retention.refresh()
        expired = self._expire(entries, self.postfix.lifetime_s())
        entries = [e for e in entries if e.queue_id not in expired]
        for customer in self.customers:
            self._customer(customer, entries)

    def _expire(self, entries: list[Queued], ceiling_s: int) -> set[str]:
        """Return to their senders the deferred messages, and those held here, that are older
        than their customers' retention (any domain SQL lists, not only ``self.customers``).
        Mail an operator holds is left alone: Postfix never expires held mail either."""
        now = self.clock()
        expired: set[str] = set()
        for e in sorted(entries, key=lambda e: (e.arrival, e.queue_id)):
            ours = e.queue == "hold" and e.queue_id in self.held
            if e.forced_expire or not (e.queue == "deferred" or ours):
                continue  # already on its way back, or not waiting for a retry
            if e.sender == "":
                continue  # a notice in transit: Postfix's bounce_queue_lifetime decides
            lifetime = self.retention.lifetime_s(e.domains, ceiling_s)
            age = now - e.arrival
            if age < lifetime:
                continue
            if ours:  # out of hold first: Postfix returns no held mail
                self._release(e.queue_id, retry=False)
            self.postfix.expire(e.queue_id)
            if e.queue_id in self.held:  # released by someone else, still on our list
                self.held.discard(e.queue_id)
                self._save()
            self.expired_total += 1
            expired.add(e.queue_id)
            log.info(
                "event=expired queue_id=%s customers=%s age_s=%d lifetime_s=%d was_held=%s "
                "expired_total=%d",
                e.queue_id,
                ",".join(e.domains) or "-",
                age,
                lifetime,
                "yes" if ours else "no",
                self.expired_total,
            )
        return expired

    def _customer(self, customer: Customer, entries: list[Queued]) -> None:
        waiting = [e for e in entries if e.waits_for(customer) and e.queue_id not in self.held]
        held = sorted(
            (e for e in entries if e.queue_id in self.held and e.for_customer(customer)),
            key=lambda e: (e.arrival, e.queue_id),
        )
        if waiting or held:
            up = self.probe(customer)
        else:
            return
        if not up:
            for e in waiting:
                log.info("event=hold queue_id=%s customer=%s", e.queue_id, customer.domain)
                self.postfix.hold(e.queue_id)
                self.held.add(e.queue_id)
            if waiting:
                self._save()
            return
        if held:
            log.info("event=ordered_release customer=%s messages=%d", customer.domain, len(held))
        for e in held:
            self._release(e.queue_id)
            if not self._wait_gone(e.queue_id, customer):
                return  # deferred again (the server went away): the rest stay held, in order

    def _release(self, queue_id: str, *, retry: bool = True) -> None:
        self.postfix.release(queue_id, retry=retry)
        self.held.discard(queue_id)
        self._save()

    def _wait_gone(self, queue_id: str, customer: Customer) -> bool:
        """True when the message left the queue; False when it was deferred for the customer
        again (it is held again, first in line) or did not move within the step timeout."""
        released = self.clock()
        deadline = released + self.step_timeout_s
        while self.clock() < deadline:
            queue = self.postfix.where(queue_id)
            if queue is None:
                return True
            # Deferred again (not merely on its way from hold to active): ask why.
            if queue == "deferred" and self.clock() - released > 0.5:
                entry = next((e for e in self.postfix.queue() if e.queue_id == queue_id), None)
                if entry is None:
                    return True
                if entry.waits_for(customer):
                    self.postfix.hold(queue_id)
                    self.held.add(queue_id)
                    self._save()
                    return False
            self.sleep(0.02)
        log.warning("event=release_slow queue_id=%s customer=%s", queue_id, customer.domain)
        return False

    def release_all(self) -> int:
        """Give every message this daemon holds back to Postfix (on stop)."""
        count = 0
        present = {e.queue_id for e in self.postfix.queue()}
        for queue_id in sorted(self.held):
            if queue_id in present:
                self.postfix.release(queue_id)
                count += 1
        self.held.clear()
        self._save()
        return count


def run(
    settings: TowerSettings, orderer: Orderer, interval_s: float, stop: threading.Event
) -> None:
    log.info("event=start customers=%d interval_s=%s", len(settings.customers), interval_s)
    while not stop.is_set():
        try:
            orderer.step()
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            log.warning("event=step_failed error=%r", str(exc))
        stop.wait(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mailtower-relay-order", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--settings", type=Path, default=settings_mod.SETTINGS_PATH)
    parser.add_argument("--state", type=Path, default=STATE)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between passes")
    parser.add_argument(
        "--release-all", action="store_true", help="release every message it holds, then exit"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    settings = settings_mod.load(args.settings)
    args.state.parent.mkdir(parents=True, exist_ok=True)
    if args.release_all:
        orderer = Orderer(settings.customers, RealPostfix(), state=args.state)
        log.info("event=release_all messages=%d", orderer.release_all())
        return 0
    try:
        password = settings.secret("sql_relay")
    except settings_mod.SettingsError as exc:
        # Not the default for everybody instead: that would return a longer-retention
        # customer's mail early.
        log.error("event=settings_error error=%r fix='deploy the relay again'", str(exc))
        return 2
    retention = Retention(
        sql_fetch(settings.sql_dsn("mailtower_relay", password)),
        cache=args.state.parent / "relay-retention.json",
    )
    orderer = Orderer(settings.customers, RealPostfix(), retention=retention, state=args.state)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(settings, orderer, args.interval, stop)
    return 0
