"""GOC sync figures (issue 5) on local PostgreSQL 15 clusters: a GOC, tower-a (primary + hot
standby) and tower-b, all on this machine, created and removed by this script.

    python tests/bench/sync_bench.py [--events 1000] [--rate 100] [--config-rounds 100]
                                     [--bulk 20000] [--conf NAME=VALUE]… [--json PATH]

Definitions:

- config propagation: from the commit of a new customer (customer, domain, route, policy in one
  transaction) at the GOC until its route is visible on a tower's primary (polled every 2 ms
  on an open connection, one poller per tower); "both" is the later of the two towers;
- event propagation: from the commit of one event at a tower (one event per transaction,
  ``--rate`` per second, alternating towers) until it is visible at the GOC (a poller reads
  new rows every 2 ms);
- GOC ingest: both towers' subscriptions paused, ``--bulk`` events written at each tower in
  batches of 500 (as scanners flush), both resumed: events over the time until the GOC has
  all of them; also end-to-end with the towers writing at full speed meanwhile;
- GOC outage: the GOC stopped, events written at both towers, the GOC started: time from its
  start until it has every event; the counts;
- primary failover: the primary of tower-a hangs (SIGSTOP), its standby is promoted
  (``pg_ctl promote``), ``repoint_after_failover`` runs: the time of each step, the events
  reconciled, and the counts at the GOC against the new primary (lost, duplicated).

fsync and synchronous_commit are on (the defaults). Every process shares this machine's
cores, so the figures are lower bounds for separate hosts; the load average is printed.
Needs PostgreSQL 15 (requirements-apt.txt: postgresql-15); runs the servers as ``postgres``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: pgclusters, synclab
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import psycopg  # noqa: E402
from pgclusters import Cluster, wait_until  # noqa: E402
from synclab import (  # noqa: E402
    GOC_SYNC_PASSWORD,
    SyncLab,
    Tower,
    add_customer,
    flush_events,
    make_events,
)

from mailtower.goc.sync import (  # noqa: E402
    ensure_goc,
    event_count,
    names,
    repoint_after_failover,
)

POLL_S = 0.002


def say(message: str) -> None:
    print(f"[sync-bench] {message}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "n": len(ordered),
        "p50_ms": round(at(0.50) * 1000, 2),
        "p99_ms": round(at(0.99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


def wait_visible(cluster: Cluster, query: str, param: Any, timeout_s: float = 30) -> float:
    """Poll until ``query`` returns a row; the time.monotonic() it was first seen."""
    with cluster.connect() as conn:
        deadline = time.monotonic() + timeout_s
        while conn.execute(query, (param,)).fetchone() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cluster.name}: not visible after {timeout_s}s: {param}")
            time.sleep(POLL_S)
        return time.monotonic()


def bench_config(lab: SyncLab, rounds: int) -> dict[str, Any]:
    towers = list(lab.towers.values())
    per_tower: dict[str, list[float]] = {t.name: [] for t in towers}
    both: list[float] = []
    for i in range(rounds):
        domain = f"bench{i}-{uuid.uuid4().hex[:8]}.example"
        seen: dict[str, float] = {}

        def poll(tower: Tower, domain: str = domain, seen: dict[str, float] = seen) -> None:
            seen[tower.name] = wait_visible(
                tower.primary, "SELECT 1 FROM routes WHERE domain = %s", domain
            )

        threads = [threading.Thread(target=poll, args=(t,)) for t in towers]
        for thread in threads:
            thread.start()
        add_customer(lab.goc, domain)
        committed = time.monotonic()
        for thread in threads:
            thread.join()
        for name, at in seen.items():
            per_tower[name].append(at - committed)
        both.append(max(seen.values()) - committed)
    return {
        "both_towers": percentiles(both),
        **{name: percentiles(values) for name, values in per_tower.items()},
    }


class GocWatcher(threading.Thread):
    """Records when each new event id becomes visible at the GOC."""

    def __init__(self, goc: Cluster):
        super().__init__(daemon=True)
        self.goc = goc
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with self.goc.connect() as conn:
            # received_at is the apply transaction's start; a later commit may carry an earlier
            # value (two apply workers), hence the overlap; ids already seen are skipped.
            since = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            while not self.stop.is_set():
                rows = conn.execute(
                    "SELECT event_id::text, received_at FROM verdict_events"
                    " WHERE received_at > %s - interval '2 s'",
                    (since,),
                ).fetchall()
                now = time.monotonic()
                for event_id, received in rows:
                    self.seen.setdefault(event_id, now)
                    since = max(since, received)
                time.sleep(POLL_S)


def bench_events(lab: SyncLab, count: int, rate: float) -> dict[str, Any]:
    watcher = GocWatcher(lab.goc)
    watcher.start()
    time.sleep(0.1)
    towers = list(lab.towers.values())
    conns = {
        t.name: psycopg.connect(t.scanner_dsn(), autocommit=True) for t in towers
    }  # one event per transaction, on open connections
    committed: dict[str, float] = {}
    start = time.monotonic()
    try:
        for i in range(count):
            tower = towers[i % len(towers)]
            event = make_events(tower.name, 1)[0]
            conns[tower.name].execute(
                "INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict,"
                " recipients, size_bytes) VALUES (%s, %s, 's01', now(), 'clean', %s, 1000)",
                (event.event_id, tower.name, event.recipients),
            )
            committed[event.event_id] = time.monotonic()
            pause = start + (i + 1) / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        wait_until(lambda: all(e in watcher.seen for e in committed), 60, "every event seen")
    finally:
        watcher.stop.set()
        watcher.join()
        for conn in conns.values():
            conn.close()
    latencies = [watcher.seen[e] - t for e, t in committed.items()]
    return {"rate_per_s": rate, **percentiles(latencies)}


def set_goc_intake(lab: SyncLab, enabled: bool) -> None:
    # One transaction: the launcher then starts both workers in one pass (it starts workers
    # at most once per wal_retrieve_retry_interval, so a second ENABLE would wait for it).
    with lab.goc.connect() as conn, conn.transaction():
        for tower in lab.towers:
            verb = "ENABLE" if enabled else "DISABLE"
            conn.execute(f"ALTER SUBSCRIPTION {names.events_subscription(tower)} {verb}")


def goc_total(lab: SyncLab) -> int:
    return event_count(lab.goc.dsn())


def bench_ingest(lab: SyncLab, bulk: int) -> dict[str, Any]:
    towers = list(lab.towers.values())

    def write_all(per_tower: int) -> float:
        started = time.monotonic()
        threads = [
            threading.Thread(target=flush_events, args=(t, make_events(t.name, per_tower)))
            for t in towers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.monotonic() - started

    # 1. a backlog at both towers, then the GOC takes it in. The clock starts at the first
    #    applied transaction (received_at): after ENABLE the launcher may wait up to
    #    wal_retrieve_retry_interval before it starts a worker, which is reported apart.
    set_goc_intake(lab, False)
    before = goc_total(lab)
    write_s = write_all(bulk)
    enabled_at = time.time()
    set_goc_intake(lab, True)
    target = before + bulk * len(towers)
    wait_until(lambda: goc_total(lab) >= target, 600, "the backlog at the GOC")
    done_at = time.time()
    first = lab.goc.scalar(
        "SELECT extract(epoch FROM min(received_at)) FROM verdict_events"
        " WHERE received_at >= to_timestamp(%s)",
        enabled_at,
    )
    drain_s = done_at - float(first)
    start_delay_s = float(first) - enabled_at
    # 2. end to end: the towers write at full speed, the GOC follows
    before = goc_total(lab)
    started = time.monotonic()
    live_write_s = write_all(bulk)
    target = before + bulk * len(towers)
    wait_until(lambda: goc_total(lab) >= target, 600, "the live events at the GOC")
    live_s = time.monotonic() - started
    total = bulk * len(towers)
    return {
        "events": total,
        "backlog_drain_events_per_s": round(total / drain_s),
        "backlog_drain_s": round(drain_s, 2),
        "enable_to_first_apply_s": round(start_delay_s, 2),
        "towers_write_events_per_s": round(total / write_s),
        "live_end_to_end_events_per_s": round(total / live_s),
        "live_towers_write_s": round(live_write_s, 2),
        "live_all_at_goc_s": round(live_s, 2),
    }


def bench_goc_outage(lab: SyncLab, per_tower: int) -> dict[str, Any]:
    before = goc_total(lab)
    lab.goc.stop()
    for tower in lab.towers.values():
        flush_events(tower, make_events(tower.name, per_tower))
    lab.goc.start()
    started = time.monotonic()
    target = before + per_tower * len(lab.towers)
    wait_until(lambda: goc_total(lab) >= target, 300, "the outage backlog at the GOC")
    caught_up_s = time.monotonic() - started
    at_goc = goc_total(lab)
    at_towers = sum(event_count(t.primary.dsn()) for t in lab.towers.values())
    return {
        "events_during_outage": per_tower * len(lab.towers),
        "catch_up_after_start_s": round(caught_up_s, 2),
        "events_at_goc": at_goc,
        "events_at_towers": at_towers,
        "lost": at_towers - at_goc,
    }


def bench_failover(lab: SyncLab, before_n: int, during_n: int) -> dict[str, Any]:
    tower = lab.towers["tower-a"]
    old, standby = tower.primary, tower.standby
    assert standby is not None
    flush_events(tower, make_events(tower.name, before_n))
    lsn = old.current_lsn()
    wait_until(lambda: standby.replayed(lsn), 60, "the standby to replay")
    old.freeze()
    try:
        started = time.monotonic()
        standby.promote()
        promote_s = time.monotonic() - started
        tower.primary, tower.standby = standby, old
        flush_events(tower, make_events(tower.name, during_n))  # scanners, before the re-point
        started = time.monotonic()
        report = repoint_after_failover(
            lab.goc.dsn(),
            tower.name,
            standby.dsn(),
            tower_conninfo=tower.conninfo(),
            goc_conninfo=lab.goc_conninfo(),
        )
        repoint_s = time.monotonic() - started
    finally:
        old.kill()
    flush_events(tower, make_events(tower.name, during_n))
    started = time.monotonic()
    at_tower = event_count(standby.dsn())
    wait_until(
        lambda: event_count(lab.goc.dsn(), tower.name) >= at_tower, 120, "events after failover"
    )
    with standby.connect() as conn:
        tower_ids = {r[0] for r in conn.execute("SELECT event_id FROM verdict_events")}
    with lab.goc.connect() as conn:
        goc_ids = [
            r[0]
            for r in conn.execute(
                "SELECT event_id FROM verdict_events WHERE tower = %s", (tower.name,)
            )
        ]
    return {
        "promote_s": round(promote_s, 2),
        "repoint_s": round(repoint_s, 2),
        "repoint_s_reported": round(report.seconds, 2),
        "events_reconciled": report.reconciled.copied if report.reconciled else 0,
        "after_repoint_all_at_goc_s": round(time.monotonic() - started, 2),
        "events_at_new_primary": len(tower_ids),
        "events_at_goc": len(goc_ids),
        "lost": len(tower_ids - set(goc_ids)),
        "duplicated": len(goc_ids) - len(set(goc_ids)),
    }


def timed(label: str, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    say(f"{label} …")
    started = time.monotonic()
    result = step()
    say(f"{label}: done in {time.monotonic() - started:.1f}s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000, help="events for propagation")
    parser.add_argument("--rate", type=float, default=100.0, help="events/s while measuring")
    parser.add_argument("--config-rounds", type=int, default=100)
    parser.add_argument("--bulk", type=int, default=20000, help="events per tower (ingest)")
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting for every cluster, e.g. wal_retrieve_retry_interval=1s",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    conf = dict(item.split("=", 1) for item in args.conf)

    figures: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "server_settings": conf}
    say("creating clusters: goc, tower-a (primary + standby), tower-b")
    lab = SyncLab.create(["tower-a", "tower-b"], standby_for=["tower-a"], **conf)
    try:
        started = time.monotonic()
        ensure_goc(lab.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
        add_customer(lab.goc, "first.example")
        lab.ensure_all()
        figures["setup_s"] = round(time.monotonic() - started, 2)
        figures["load_average_at_start"] = os.getloadavg()
        figures["config_propagation"] = timed(
            "config GOC → towers", lambda: bench_config(lab, args.config_rounds)
        )
        figures["event_propagation"] = timed(
            "events tower → GOC", lambda: bench_events(lab, args.events, args.rate)
        )
        figures["goc_ingest"] = timed("GOC ingest", lambda: bench_ingest(lab, args.bulk))
        figures["goc_outage"] = timed("GOC outage", lambda: bench_goc_outage(lab, 5000))
        figures["primary_failover"] = timed(
            "primary failover", lambda: bench_failover(lab, 2000, 1000)
        )
        figures["load_average_at_end"] = os.getloadavg()
    finally:
        lab.destroy()
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
