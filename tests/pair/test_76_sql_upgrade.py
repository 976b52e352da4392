"""A PostgreSQL minor upgrade of tower A's SQL pair while mail flows (issue 19): `invoke
sql.upgrade` upgrades the standby, stops the primary cleanly, switches over once the standby
has its last checkpoint, and makes the old primary the standby; run twice, the lab is back as
its inventory says. Every message is delivered and every event reaches the GOC exactly once.
(The lab's mirror usually has no newer postgresql-15: the packages step is then a no-op and
the switchovers are what is proven.)

Figures: tests/output/figures.json (sql_upgrade).
"""

from __future__ import annotations

import json
import threading
import time

from conftest import Pair, goc_events
from test_60_sql_failover import events_at, invoke, relay_answers
from towerlib import record_figure, wait_for


def test_minor_upgrade_switches_over_twice_and_loses_no_event(pair: Pair) -> None:
    tower = pair.towers["a"]
    sql1, sql2 = (tower.node(h.name) for h in tower.hosts("sql"))
    sent: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            sent.extend(pair.submit(pair.rcpt(0)))
            time.sleep(0.2)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        time.sleep(5)
        first = json.loads(invoke("sql.upgrade", "--tower", "lab-a").strip().splitlines()[-1])
        assert tower.psql("SELECT pg_is_in_recovery()", host=sql2) == "f"  # switched over
        assert tower.psql("SELECT pg_is_in_recovery()", host=sql1) == "t"
        relay_answers(pair, "the first switchover")
        second = json.loads(invoke("sql.upgrade", "--tower", "lab-a").strip().splitlines()[-1])
        time.sleep(5)
    finally:
        stop.set()
        loader.join()
    assert tower.psql("SELECT pg_is_in_recovery()") == "f"  # as the inventory says
    assert tower.psql("SELECT pg_is_in_recovery()", host=sql2) == "t"
    tokens = set(sent)
    assert tokens <= set(pair.wait_delivered(sorted(tokens), index=0, timeout=300))

    b = pair.towers["b"]

    def complete():  # type: ignore[no-untyped-def]
        at_towers = events_at(pair, sql1, tokens) | events_at(pair, b.sql_primary(), tokens)
        at_goc = goc_events(pair, tokens)
        ids = {r["event_id"] for r in at_goc}
        ok = at_towers and ids == at_towers and {r["token"] for r in at_goc} == tokens
        return ok and (at_towers, at_goc)

    at_towers, at_goc = wait_for(complete, 240, "every event of the messages at the GOC", 1)
    assert len(at_goc) == len({r["event_id"] for r in at_goc})
    record_figure(
        "sql_upgrade",
        {
            "messages": len(tokens),
            "events_at_goc": len(at_goc),
            "first_upgrade_s": round(first["done_s"], 1),
            "first_switched_over_at_s": round(first["switched_over_s"], 1),
            "second_upgrade_s": round(second["done_s"], 1),
        },
    )
