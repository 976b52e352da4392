"""The quarantine portal's pages with 100,000 quarantined messages (issue 18).

    python tests/bench/portal_bench.py [--rows 100000] [--repeat 20]

Starts a throwaway PostgreSQL 15 (tests/pgclusters.py) with the GOC's schema and the portal's
(``mt_portal``, its grants, its indexes), fills ``--rows`` quarantined verdict events for two
customers (70 % / 30 %; realistic senders, recipients, subjects and findings; a 2 KiB message
each) spread over 30 days, ANALYZEs, and times the store's queries as the pages run them, as
``mt_portal``: for an operator, the big customer's admin and one of its users, the first page,
a deep keyset page (the 40th: the cursor of the 39th), a subject search, a sender search and
(for the admin) a recipient search. Prints one line per case: the median and the worst of
``--repeat`` runs in milliseconds, and the rows the page had. Nothing is asserted: the figures
go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "unit")]

import pgclusters  # noqa: E402
from portal_fixtures import PORTAL_PASSWORD, QUARANTINE_ACTIONS  # noqa: E402

from mailtower.goc.portal import store as portal  # noqa: E402
from mailtower.goc.sync.goc import ensure_goc  # noqa: E402

FILL = """
INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict, message_id, sender,
    recipients, findings, quarantine_id, size_bytes, customer_id, subject, expires_at, message,
    quarantine_meta)
SELECT gen_random_uuid(),
       CASE WHEN i %% 2 = 0 THEN 'tower-a' ELSE 'tower-b' END,
       'scanner-' || (i %% 23),
       now() - (i * interval '26 seconds'),
       (ARRAY['virus', 'banned', 'suspicious'])[1 + i %% 3],
       '<' || i || '@mail.example>',
       (ARRAY['billing', 'noreply', 'promo', 'hr', 'ceo'])[1 + i %% 5] || i %% 997
           || '@' || (ARRAY['spam.example', 'phish.example', 'bulk.example'])[1 + i %% 3],
       ARRAY['user' || (i %% 500) || '@' || CASE WHEN i %% 10 < 7 THEN 'big.example'
                                                ELSE 'small.example' END],
       jsonb_build_array(jsonb_build_object('engine', 'clamd', 'name',
           'Win.Trojan.Agent-' || (i %% 300), 'part', 'invoice.zip')),
       'q-' || i,
       2048,
       CASE WHEN i %% 10 < 7 THEN %(big)s ELSE %(small)s END,
       (ARRAY['Invoice ', 'Your parcel ', 'Payment overdue ', 'Meeting notes ',
              'Password reset '])[1 + i %% 5] || (i %% 10007),
       now() - (i * interval '26 seconds') + interval '14 days',
       convert_to(repeat('x', 2000), 'UTF8'),
       '{"reason": "virus"}'
FROM generate_series(1, %(rows)s) AS i
"""


def timed(label: str, repeat: int, run: object) -> None:
    times = []
    rows = 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows = run()  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    print(
        f"{label:44s} median {statistics.median(times):7.2f} ms"
        f"  worst {max(times):7.2f} ms  rows {rows}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    workdir = pgclusters.make_workdir("mailtower-portal-bench-")
    cluster = pgclusters.Cluster.create("goc", workdir)
    try:
        ensure_goc(cluster.dsn(), sync_password="sync-password-0123456789")
        with cluster.connect() as conn:
            conn.execute(QUARANTINE_ACTIONS)
            portal.apply_schema(conn)
            portal.ensure_role(conn, PORTAL_PASSWORD)
            portal.apply_grants(conn)
            ids = {}
            for name in ("big", "small"):
                row = conn.execute(
                    "INSERT INTO customers (name) VALUES (%s) RETURNING id", (name,)
                ).fetchone()
                assert row is not None
                ids[name] = row[0]
                conn.execute(
                    "INSERT INTO domains (name, customer_id) VALUES (%s, %s)",
                    (f"{name}.example", row[0]),
                )
            started = time.perf_counter()
            conn.execute(FILL, {"rows": args.rows, **ids})  # type: ignore[arg-type]
            conn.execute("VACUUM ANALYZE verdict_events")
            print(f"filled {args.rows} rows in {time.perf_counter() - started:.1f} s")
        store = portal.Store(cluster.conninfo(portal.PORTAL_ROLE, PORTAL_PASSWORD))
        scopes = {
            "operator": portal.Scope("operator", "op"),
            "admin": portal.Scope("admin", "admin-big", customer_id=ids["big"]),
            "user": portal.Scope("user", "user3@big.example", address="user3@big.example"),
        }
        for role, scope in scopes.items():

            def first(scope: portal.Scope = scope) -> int:
                return len(store.page(scope, portal.Search(), None)[0])

            cursor = None
            for _ in range(39):
                cursor = store.page(scope, portal.Search(), cursor)[1]
                if cursor is None:
                    break

            def deep(scope: portal.Scope = scope, cursor: object = cursor) -> int:
                return len(store.page(scope, portal.Search(), cursor)[0])  # type: ignore[arg-type]

            def subject(scope: portal.Scope = scope) -> int:
                return len(store.page(scope, portal.Search(subject="overdue 42"), None)[0])

            def sender(scope: portal.Scope = scope) -> int:
                return len(store.page(scope, portal.Search(sender="promo12"), None)[0])

            timed(f"{role}: first page", args.repeat, first)
            if cursor is not None:
                timed(f"{role}: 40th page (keyset)", args.repeat, deep)

            def rare(scope: portal.Scope = scope) -> int:
                return len(store.page(scope, portal.Search(subject="reset 9999"), None)[0])

            timed(f"{role}: subject contains 'overdue 42'", args.repeat, subject)
            timed(f"{role}: subject contains 'reset 9999' (rare)", args.repeat, rare)
            timed(f"{role}: sender contains 'promo12'", args.repeat, sender)
            if role == "admin":

                def recipient(scope: portal.Scope = scope) -> int:
                    search = portal.Search(recipient="user3@big.example")
                    return len(store.page(scope, search, None)[0])

                timed(f"{role}: recipient user3@big.example", args.repeat, recipient)
        store.close()
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
