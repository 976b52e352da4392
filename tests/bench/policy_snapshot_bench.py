"""What a policy change costs the scanners' pollers, on a local PostgreSQL 15 cluster with the
tower's schema and ``--customers`` customers (each its own domain and its own policy, as in
tests/pair/test_85_customers.py), created and removed by this script.

    python tests/bench/policy_snapshot_bench.py [--customers 10000] [--changes 30]
                                                [--scanners 46] [--rounds 3]

Prints (wall milliseconds, median and p90 over ``--changes`` changes of one customer's policy):

- one poller: the change check; a delta (check, delta query, merge); a full load (check, the
  query of every customer, the merge); the file written (``to_json`` and the atomic rename);
  a worker's read of it (``from_json``, every policy text already parsed: the cache is warm);
- a fleet: ``--scanners`` processes, each a poller with its own connection and snapshot, all
  sharing this machine's CPUs with the server; one policy change committed; the time until
  the last of them has written its file, with the delta (now) and with a full load on every
  change (before), and the CPU all of them and their SQL backends spent on it. Each polls
  every 50 ms (scand: every ``policy_poll_s``, 1 s), so the figure is the work, not the poll
  phase. Workers' reads are not in the fleet figure.

The load average is printed: every process shares this machine's cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: pgclusters
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import psycopg  # noqa: E402
from pgclusters import Cluster, make_workdir  # noqa: E402

from mailtower.customers import snapshot  # noqa: E402

SCHEMA = Path(__file__).resolve().parents[2] / "templates/sql/etc/mailtower/sql/schema.sql.j2"
FLEET_POLL_S = 0.05


def say(message: str) -> None:
    print(f"[snapshot-bench] {message}", file=sys.stderr, flush=True)


def populate(conn: psycopg.Connection[Any], customers: int) -> None:
    for role in ("mailtower_relay", "mailtower_scanner", "mailtower_monitor"):
        conn.execute(f"CREATE ROLE {role} LOGIN")
    conn.execute(SCHEMA.read_text().encode())
    with conn.transaction():
        conn.execute(
            "INSERT INTO customers (name) SELECT 'bulk-' || i FROM generate_series(1, %s) i",
            (customers,),
        )
        conn.execute(
            "INSERT INTO domains (name, customer_id) SELECT c.name || '.example', c.id"
            " FROM customers c"
        )
        conn.execute(
            "INSERT INTO policies (customer_id, policy) SELECT c.id, jsonb_build_object("
            " 'max_message_bytes', 1000000 + c.id,"
            " 'ban_extensions', jsonb_build_array('x' || c.id)) FROM customers c"
        )
    conn.execute("VACUUM ANALYZE")


def change(conn: psycopg.Connection[Any], i: int) -> None:
    """One customer's policy changed (a new text: parsed once by each process)."""
    conn.execute(
        "UPDATE policies SET policy = jsonb_build_object('ban_extensions',"
        " jsonb_build_array('z' || %s::text)) WHERE customer_id = 1 + %s %% 100",
        (i, i),
    )


def timed(f: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = f()
    return (time.perf_counter() - started) * 1000, result


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"median {statistics.median(ordered):7.1f} ms   p90 {p90:7.1f} ms"


def one_poller(cluster: Cluster, changes: int) -> None:
    writer, conn = cluster.connect(), cluster.connect()
    path = Path(tempfile.mkdtemp(prefix="snapshot-bench-")) / "policies.json"
    figures: dict[str, list[float]] = {}

    def record(name: str, ms: float) -> None:
        figures.setdefault(name, []).append(ms)

    snap, _ = snapshot.refresh(conn, None)
    snap.write(path)
    for i in range(changes):
        change(writer, i)
        ms, _ = timed(lambda: snapshot.change_check(conn))
        record("change check", ms)
        ms, (new, mode) = timed(lambda s=snap: snapshot.refresh(conn, s))
        assert mode == "delta", mode
        record("delta: check + query + merge", ms)
        ms, _ = timed(lambda n=new: n.write(path))
        record("file written (to_json + rename)", ms)
        ms, _ = timed(lambda: snapshot.read(path))
        record("a worker's read (from_json)", ms)
        ms, full = timed(lambda s=snap: snapshot.refresh(conn, s, full=True)[0])
        assert full.same_content(new)
        record("full: check + query + merge", ms)
        snap = new
    say(f"one poller, {changes} changes of one customer's policy:")
    for name, values in figures.items():
        print(f"  {name:34s} {summary(values)}", flush=True)
    d, w = figures["delta: check + query + merge"], figures["file written (to_json + rename)"]
    f = figures["full: check + query + merge"]
    print(
        f"  per change, delta + write: {statistics.median(d) + statistics.median(w):.1f} ms;"
        f" full + write (before): {statistics.median(f) + statistics.median(w):.1f} ms",
        flush=True,
    )
    writer.close()
    conn.close()
    shutil.rmtree(path.parent, ignore_errors=True)


def fleet(cluster: Cluster, scanners: int, rounds: int) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Queue(), ctx.Queue()
    tmp = Path(tempfile.mkdtemp(prefix="snapshot-fleet-"))
    gos = [ctx.Event() for _ in range(2 * rounds)]
    procs = []
    say(f"fleet: starting {scanners} pollers (each loads every customer once)")
    for i in range(scanners):
        proc = ctx.Process(
            target=scanner,
            args=(cluster.dsn(), str(tmp / f"s{i}.json"), ready, gos, done),
        )
        proc.start()
        procs.append(proc)
    for _ in range(scanners):
        ready.get(timeout=600)
    say(f"fleet: {scanners} pollers, one policy change at a time")
    writer = cluster.connect()
    try:
        for r, go in enumerate(gos):
            mode = "delta" if r < rounds else "full (before)"
            time.sleep(2)  # everyone idle, polling
            committed = time.time()
            change(writer, 1000 + r)
            go.set()
            results = [done.get(timeout=600) for _ in range(scanners)]
            last = max(r[0] for r in results) - committed
            wall = statistics.median(r[1] for r in results)
            client = sum(r[2] for r in results) / 1000
            server = sum(r[3] for r in results) / 1000
            print(
                f"  {mode:13s}: last file {last:5.2f} s after the commit; per scanner"
                f" {wall:5.0f} ms (median); CPU of all: pollers {client:5.2f} s + their"
                f" SQL backends {server:5.2f} s   (load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )
            go.clear()
    finally:
        writer.close()
        for proc in procs:
            proc.join(30)
        shutil.rmtree(tmp, ignore_errors=True)


def scanner(dsn: str, path: str, ready: Any, gos: list[Any], done: Any) -> None:
    """A poller process: a delta on each change of the first rounds, then a full load on each
    (what every change cost before)."""
    rounds = len(gos) // 2
    with psycopg.connect(dsn, autocommit=True) as conn:
        backend = conn.info.backend_pid
        snap, _ = snapshot.refresh(conn, None)
        snap.write(Path(path))
        ready.put(os.getpid())
        for r, go in enumerate(gos):
            go.wait()
            while (check := snapshot.change_check(conn)) == snap.check:
                time.sleep(FLEET_POLL_S)
            started, cpu, server = time.perf_counter(), time.process_time(), cpu_s(backend)
            if r >= rounds:  # before: every change read everything
                new = snapshot.load(conn, snap, check=check)
            else:
                new, _ = snapshot.refresh(conn, snap)
            new.write(Path(path))
            done.put(
                (
                    time.time(),
                    (time.perf_counter() - started) * 1000,
                    (time.process_time() - cpu) * 1000,
                    (cpu_s(backend) - server) * 1000,
                )
            )
            snap = new


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far (its server backend: local)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--scanners", type=int, default=46, help="0: no fleet figure")
    parser.add_argument("--rounds", type=int, default=3, help="fleet changes per mode")
    args = parser.parse_args()
    workdir = make_workdir("mailtower-snapshot-bench-")
    cluster = Cluster.create("snapshot-bench", workdir)
    try:
        with cluster.connect() as conn:
            populate(conn, args.customers)
        say(f"{args.customers} customers; load average {os.getloadavg()[0]:.1f}")
        one_poller(cluster, args.changes)
        if args.scanners:
            fleet(cluster, args.scanners, args.rounds)
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
