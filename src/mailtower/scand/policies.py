"""Customers' policies in scand: the poller that writes the snapshot file from SQL, and the
file as each scanning process reads it (mailtower.customers.snapshot has the format).

The supervisor (or a single-process scand) runs one ``Poller`` thread; every scanning process
has a ``SnapshotFile`` and asks it once per message, which costs one stat() unless the file
changed. No snapshot at all (never written, SQL never reached) is a 451 for every message:
mail is never scanned under the default policy because the customers' were not read.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mailtower.customers import snapshot as snapshot_mod
from mailtower.customers.snapshot import Connection, Snapshot, SnapshotError
from mailtower.settings import TowerSettings

log = logging.getLogger("mailtower.scand")


class SnapshotFile:
    """The snapshot file as this process last read it; reread when its inode or mtime
    changed (the poller replaces it by a rename: a new inode every time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int] | None = None
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()

    def current(self) -> Snapshot | None:
        """The snapshot to scan with now; None when none was ever readable."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._snapshot  # removed by hand: keep what was read (None at first)
        key = (st.st_ino, st.st_mtime_ns)
        if key == self._key:
            return self._snapshot
        with self._lock:
            if key != self._key:
                try:
                    loaded = snapshot_mod.read(self.path)
                except OSError as exc:
                    # The read failed, not the file (no descriptors left, …): tried again at
                    # the next message; the previous one stays meanwhile.
                    log.error(
                        "event=policy_snapshot_read_failed path=%s keeping=%s error=%r",
                        self.path,
                        "previous" if self._snapshot else "none",
                        str(exc),
                    )
                    return self._snapshot
                except SnapshotError as exc:
                    # Not retried until the file changes again (the poller rewrites a broken
                    # one); the previous one stays.
                    log.error(
                        "event=policy_snapshot_unreadable path=%s keeping=%s error=%r",
                        self.path,
                        "previous" if self._snapshot else "none",
                        str(exc),
                    )
                else:
                    self._snapshot = loaded
                    log.info(
                        "event=policy_snapshot_loaded path=%s generation=%d customers=%d",
                        self.path,
                        loaded.generation,
                        len(loaded.policies),
                    )
                self._key = key
        return self._snapshot


STATEMENT_TIMEOUT_MS = 30_000
RETRY_FULL_S = 60.0  # a failed periodic full reread is tried again within this (spread)


def _connect(dsn: str) -> Connection:
    import psycopg

    # A half-open connection (a SQL host gone without a word) must not freeze the policies for
    # the kernel's TCP timeout: dead peers are noticed in seconds (keepalives, TCP user
    # timeout), and every statement is bounded. The bound is generous: reading 10,000 new
    # customers while a tower's 23 scanners read them too took over 5 s in the lab, and a
    # statement cancelled there is read again the next second by every scanner at once (with
    # 5 s, 40 s of cancelled reads before the first one finished).
    return psycopg.connect(  # type: ignore[return-value]
        dsn,
        autocommit=True,
        connect_timeout=5,
        options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
        tcp_user_timeout=10000,
    )


class Poller:
    """Polls the tower's SQL every ``settings.policy_poll_s``: when the change check's answer
    differs from the one the snapshot was made at, reads what changed (a delta: the customers
    written since), or everything when a delta cannot tell (``snapshot.plan``); everything
    also at start and every ``settings.policy_full_reload_s``, the safety net. The file is
    rewritten only when its content changed: every worker re-reads it then."""

    def __init__(
        self,
        settings: TowerSettings,
        *,
        connect: Callable[[str], Connection] = _connect,
        clock: Callable[[], float] = time.time,
        spread: Callable[[], float] = lambda: random.uniform(0.5, 1.5),
    ) -> None:
        self.path = Path(settings.policy_snapshot)
        self.interval_s = settings.policy_poll_s
        self.full_reload_s = settings.policy_full_reload_s
        self.dsn = settings.sql_dsn(
            "mailtower_scanner", settings.secret("sql_scanner"), writable=False
        )
        self.connect = connect
        self.clock = clock
        self.spread = spread
        self._conn: Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: tuple[int, int] | None = None  # the file as this poller wrote it last
        try:
            self.snapshot: Snapshot | None = snapshot_mod.read(self.path)
            st = os.stat(self.path)
            self._written = (st.st_ino, st.st_mtime_ns)  # kept if the first load agrees
        except FileNotFoundError:
            self.snapshot = None
        except (OSError, SnapshotError) as exc:
            log.error("event=policy_snapshot_unreadable path=%s error=%r", self.path, str(exc))
            self.snapshot = None
        # For /metrics (PollerCollector).
        self.last_ok: float | None = None  # when SQL last answered the change check
        self.errors = 0
        self.invalid_found = 0
        self._failing = False  # logged once per outage, not every second
        # When this poller last read everything (None: not yet; the file it found may come
        # from another version, or be older than the last full reload it made), and when it
        # reads everything next: policy_full_reload_s times a random factor in [0.5, 1.5).
        # The spread keeps a tower's scanners out of step: a removal makes every one of them
        # read everything at once, and with a fixed period they would all do it again
        # together a period later (in the lab, 46 scanners' full reads of 10,000 customers
        # at once held a policy change back for seconds).
        self.last_full: float | None = None
        self.next_full: float = 0.0

    def poll_once(self) -> bool:
        """One round: the change check and, if needed, a new snapshot. True if SQL answered."""
        try:
            if self._conn is None:
                self._conn = self.connect(self.dsn)
            rewrite = self.snapshot is None or not self._file_intact()
            started = time.monotonic()
            at = self.clock()
            full_due = self.last_full is None or at >= self.next_full
            if full_due and self.last_full is not None:
                # A periodic reread that fails (a timeout under load) is tried again in a
                # minute at most, not every second: meanwhile changes are read as deltas.
                self.next_full = at + min(RETRY_FULL_S, self.full_reload_s) * self.spread()
            new, mode = snapshot_mod.refresh(
                self._conn, self.snapshot, full=rewrite or full_due, now=at
            )
            if mode == "full":
                self.last_full = at
                self.next_full = at + self.full_reload_s * self.spread()
            if mode != "none":
                if rewrite or self.snapshot is None or not new.same_content(self.snapshot):
                    self._write(new, mode, started)
                else:  # the same policies: the workers keep the file they have
                    self.snapshot = replace(self.snapshot, check=new.check)
                    log.debug(
                        "event=policy_snapshot_unchanged mode=%s took_ms=%d",
                        mode,
                        (time.monotonic() - started) * 1000,
                    )
        except Exception as exc:  # SQL down, a failover, the disk: try again next round
            self.errors += 1
            if not self._failing:
                log.warning(
                    "event=policy_poll_failed keeping=%s error=%r",
                    f"generation {self.snapshot.generation}" if self.snapshot else "none",
                    exc,
                )
            self._failing = True
            self._close()
            return False
        if self._failing:
            log.info("event=policy_poll_recovered")
        self._failing = False
        self.last_ok = self.clock()
        return True

    def _write(self, new: Snapshot, mode: str, started: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the role makes it too
        new.write(self.path)
        st = os.stat(self.path)
        self._written = (st.st_ino, st.st_mtime_ns)
        self.invalid_found += len(new.invalid)
        self.snapshot = new
        log.info(
            "event=policy_snapshot_written path=%s generation=%d mode=%s customers=%d "
            "domains=%d invalid=%s took_ms=%d",
            self.path,
            new.generation,
            mode,
            len(new.policies),
            len(new.domains),
            ",".join(new.invalid) or "-",
            (time.monotonic() - started) * 1000,
        )

    def _file_intact(self) -> bool:
        """Is the file there, as this poller last wrote it? (Removed or broken by hand: the
        next round writes it again, or a restarted worker would have nothing to scan by.)"""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return self._written == (st.st_ino, st.st_mtime_ns)

    def run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval_s)
        self._close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="policy-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        close = getattr(conn, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:
                log.debug("event=policy_poll_close_failed error=%r", exc)


class PollerCollector(Collector):
    """The poller's metrics: how old the policies are, which snapshot, how many customers."""

    def __init__(self, poller: Poller) -> None:
        self.poller = poller

    def collect(self) -> Any:
        poller = self.poller
        snap = poller.snapshot
        since = poller.last_ok if poller.last_ok is not None else (snap.written_at if snap else 0)
        yield GaugeMetricFamily(
            "mailtower_policy_snapshot_age_seconds",
            "Seconds since the customers' policies were last checked against SQL",
            value=max(0.0, poller.clock() - since) if since else float("inf"),
        )
        yield GaugeMetricFamily(
            "mailtower_policy_snapshot_generation",
            "Generation of the policy snapshot written (0: none)",
            value=snap.generation if snap else 0,
        )
        yield GaugeMetricFamily(
            "mailtower_policy_customers",
            "Customers in the policy snapshot",
            value=len(snap.policies) if snap else 0,
        )
        yield GaugeMetricFamily(
            "mailtower_policy_invalid_customers",
            "Customers whose stored policy is invalid (their previous one is applied)",
            value=len(snap.invalid) if snap else 0,
        )
        yield CounterMetricFamily(
            "mailtower_policy_invalid",
            "Invalid policies met while loading snapshots, since scand started",
            value=poller.invalid_found,
        )
        yield CounterMetricFamily(
            "mailtower_policy_poll_errors",
            "Rounds of the policy poller that failed (SQL unreachable, disk), since scand started",
            value=poller.errors,
        )
