"""Tower A's SQL primary dies (PostgreSQL killed) while mail flows; the operator's one command
(`invoke sql.failover`) promotes the standby and re-points the GOC sync. The relay keeps
routing, the scanners spool their events and flush them to the new primary, and at the GOC
every event of the messages sent is there exactly once. Then the old primary is rebuilt as a
standby and the pair is switched back (`invoke sql.rebuild`, `invoke sql.failover`), leaving
the lab as its inventory says.

Figures: tests/output/figures.json (sql_failover).
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import threading
import time

from conftest import ROOT, Pair, goc_events, token_of
from towerlib import record_figure, wait_for

INVOKE = [sys.executable, "-m", "invoke"]
SERVICE = "postgresql@15-main"


def invoke(*args: str) -> str:
    done = subprocess.run([*INVOKE, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"invoke {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def events_at(pair: Pair, node, tokens: set[str]) -> set[str]:
    out = pair.towers["a"].psql(
        "SELECT event_id, message_id FROM verdict_events WHERE message_id LIKE '%@internet.lab>'"
        " AND scanned_at > now() - interval '2 hours'",
        host=node,
    )
    return {
        line.split("|")[0] for line in out.splitlines() if token_of(line.split("|")[1]) in tokens
    }


def relay_answers(pair: Pair, after: str) -> None:
    """Twenty RCPTs at tower A's relay, each on its own connection, are all accepted."""
    relay = str(pair.towers["a"].settings.hosts.relay)
    for _ in range(20):
        with smtplib.SMTP(relay, 25, timeout=30) as smtp:
            smtp.ehlo("failover-check.internet.lab")
            smtp.mail("someone@internet.lab")
            code, reply = smtp.rcpt(pair.rcpt(0))
            smtp.rset()
        assert code == 250, f"RCPT at {relay} right after {after}: {code} {reply!r}"


def test_primary_dies_one_command_promotes_and_no_event_is_lost_or_doubled(pair: Pair) -> None:
    tower = pair.towers["a"]
    sql1, sql2 = (tower.node(h.name) for h in tower.hosts("sql"))
    old_addr, new_addr = (str(a) for a in tower.settings.hosts.sql)
    b = pair.towers["b"]
    sent: list[str] = []
    stop = threading.Event()

    def load() -> None:  # through the sender: about half of it through tower A
        while not stop.is_set():
            sent.extend(pair.submit(pair.rcpt(0)))
            time.sleep(0.2)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        time.sleep(5)
        killed = time.monotonic()
        sql1.check_output(f"systemctl kill --signal=KILL {SERVICE}")
        wait_for(
            lambda: sql1.run("pg_isready -q").rc != 0, 30, f"{old_addr}'s PostgreSQL to be gone"
        )
        time.sleep(5)  # the tower runs without a primary for a while
        out = invoke("sql.failover", "--tower", "lab-a")
        recovered = time.monotonic() - killed
        timings = json.loads(out.strip().splitlines()[-1])
        time.sleep(5)
    finally:
        stop.set()
        loader.join()
    tokens = set(sent)
    arrivals = pair.wait_delivered(sorted(tokens), index=0, timeout=300)
    assert tokens <= set(arrivals)

    # Every event of tower A (now on sql2) and of tower B is at the GOC, once.
    def complete():  # type: ignore[no-untyped-def]
        at_towers = events_at(pair, sql2, tokens) | events_at(pair, b.sql_primary(), tokens)
        at_goc = goc_events(pair, tokens)
        ids = {r["event_id"] for r in at_goc}
        return (
            at_towers
            and ids == at_towers
            and {r["token"] for r in at_goc} == tokens
            and (
                at_towers,
                at_goc,
            )
        )

    at_towers, at_goc = wait_for(complete, 240, "every event of the messages at the GOC", 1)
    assert len(at_goc) == len({r["event_id"] for r in at_goc})
    record_figure(
        "sql_failover",
        {
            "messages": len(tokens),
            "events_at_towers": len(at_towers),
            "events_at_goc": len(at_goc),
            "kill_to_repointed_s": round(recovered, 1),
            **{k: round(v, 1) for k, v in timings.items()},
        },
    )
    # Back as the inventory says: sql1 a standby of sql2, then a planned switch back. Right
    # after each command the relay's SQL lookups answer (the commands reload its Postfix:
    # Postfix 3.7 would otherwise hold restarted hosts out for 60 s and answer 451 at RCPT).
    reloaded = "Postfix reloaded (fresh SQL connections)"
    assert reloaded in invoke("sql.rebuild", "--tower", "lab-a", "--host", old_addr)
    sql2.check_output(f"systemctl stop {SERVICE}")
    assert reloaded in invoke("sql.failover", "--tower", "lab-a")
    assert reloaded in invoke("sql.rebuild", "--tower", "lab-a", "--host", new_addr)
    relay_answers(pair, "the switch back and the rebuild of the standby")
    assert tower.psql("SELECT pg_is_in_recovery()") == "f"
    assert tower.psql("SELECT pg_is_in_recovery()", host=sql2) == "t"
    # And the sync carries events from the primary again.
    tokens = set(pair.submit(pair.rcpt(0), count=10))
    wait_for(
        lambda: {r["token"] for r in goc_events(pair, tokens)} == tokens,
        120,
        "events after the switch back at the GOC",
        1,
    )
