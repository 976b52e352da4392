"""Tower A's SQL is backed up by pgBackRest to its monitor, mail flows (verdict events written
after the backup: they come back from the WAL archive, not from the backup), then the primary
is lost and the operator's one command (`invoke sql.restore`) restores the repository onto the
standby host, wiped: there is no spare SQL container in the lab, and a restore onto an
emptied host is what a new host gets (it only needs the sql role deployed). Its events and
customers equal the old primary's, the relay routes again and the GOC sync resumes (a new
message's verdict event reaches the GOC). Then the lab is put back as its inventory says:
`sql.rebuild` makes the old primary a standby of the restored host, a switch back
(`sql.failover`) and a rebuild of the other.

Point-in-time recovery is proven on this machine with real pgBackRest
(tests/unit/test_backup_pgbackrest.py); figures: tests/output/figures.json (sql_restore).
"""

from __future__ import annotations

import json
import time

from conftest import Pair, goc_events
from test_60_sql_failover import SERVICE, events_at, invoke, relay_answers
from towerlib import record_figure, wait_for

REPO = "cd /tmp && su pgbackrest -s /bin/sh -c '/usr/bin/pgbackrest --stanza=lab-a {}'"
# The replicated columns: mt_gen (TOWER_ONLY_COLUMNS) is the tower's own count of writes,
# stamped again when the restored host's sync copies the GOC's configuration afresh.
SNAPSHOTS = {
    "customers": "SELECT to_jsonb(c) - 'mt_gen' FROM customers c ORDER BY 1",
    "domains": "SELECT to_jsonb(d) - 'mt_gen' FROM domains d ORDER BY 1",
    "events": "SELECT event_id, message_id, verdict FROM verdict_events ORDER BY event_id",
}


def test_restore_onto_a_wiped_host_has_the_same_rows_and_the_sync_resumes(pair: Pair) -> None:
    tower = pair.towers["a"]
    sql1, sql2 = (tower.node(h.name) for h in tower.hosts("sql"))
    old_addr, new_addr = (str(a) for a in tower.settings.hosts.sql)
    monitor = tower.monitor()

    # The deploy made the stanza and a first full backup; take a differential one now.
    monitor.check_output(REPO.format("--type=diff backup"))
    info = json.loads(monitor.check_output(REPO.format("--output=json info")))
    assert info[0]["status"]["message"] == "ok", info
    assert {b["type"] for b in info[0]["backup"]} >= {"full", "diff"}

    # Events written after the backup, archived: `check` switches WAL and waits for it.
    tokens = set(pair.submit(pair.rcpt(0), count=20))
    pair.wait_delivered(sorted(tokens), index=0, timeout=300)
    written = wait_for(lambda: events_at(pair, sql1, tokens), 120, "events at tower A", 1)
    # The snapshot first, then `check`: all it holds is archived. (The other way round, an
    # event committed between the two was in the snapshot but in no archived WAL: the
    # archive's recovery point, not a fault of the restore — seen in the lab under load.)
    before = {name: tower.psql(q, host=sql1) for name, q in SNAPSHOTS.items()}
    sql1.check_output("cd /tmp && su postgres -c '/usr/bin/pgbackrest --stanza=lab-a check'")
    assert before["customers"], "tower A has no customers to compare"
    assert all(event_id in before["events"] for event_id in written)

    # The primary is lost; the standby host is wiped and restored from the repository.
    sql1.check_output(f"systemctl kill --signal=KILL {SERVICE}")
    wait_for(lambda: sql1.run("pg_isready -q").rc != 0, 30, f"{old_addr}'s PostgreSQL gone")
    back = False
    try:
        started = time.monotonic()
        out = invoke("sql.restore", "--tower", "lab-a", "--host", new_addr)
        restored_s = time.monotonic() - started
        timings = json.loads(out.strip().splitlines()[-1])
        assert tower.psql("SELECT pg_is_in_recovery()", host=sql2) == "f"
        after = {name: tower.psql(q, host=sql2) for name, q in SNAPSHOTS.items()}
        for name in ("customers", "domains"):
            assert after[name] == before[name], f"{name} differ after the restore"
        # every event of the snapshot (those committed after it and archived by `check` too)
        missing = set(before["events"].splitlines()) - set(after["events"].splitlines())
        assert not missing, f"{len(missing)} events lost by the restore: {sorted(missing)[:3]}"
        assert written <= events_at(pair, sql2, tokens)
        relay_answers(pair, "the restore")
        # The old primary is fenced for good: neither a reboot nor a deploy starts it.
        fence = sql1.run(f"systemctl is-enabled {SERVICE}").stdout.strip()
        assert fence == "masked", f"{old_addr}: PostgreSQL {fence!r} after the restore"

        # The sync resumes: a new message's event reaches the GOC from the restored primary.
        fresh = set(pair.submit(pair.rcpt(0), count=10))
        wait_for(
            lambda: {r["token"] for r in goc_events(pair, fresh)} == fresh,
            180,
            "events written after the restore at the GOC",
            1,
        )
        record_figure(
            "sql_restore",
            {
                "events_restored": len(written),
                "restore_command_s": round(restored_s, 1),
                **{k: round(v, 1) for k, v in timings.items()},
            },
        )

        # Back as the inventory says (sql1 the primary, sql2 its standby).
        reloaded = "Postfix reloaded (fresh SQL connections)"
        assert reloaded in invoke("sql.rebuild", "--tower", "lab-a", "--host", old_addr)
        sql2.check_output(f"systemctl stop {SERVICE}")
        assert reloaded in invoke("sql.failover", "--tower", "lab-a")
        assert reloaded in invoke("sql.rebuild", "--tower", "lab-a", "--host", new_addr)
        back = True
    finally:
        if not back:
            _put_back(sql1, sql2, old_addr, new_addr)
    assert tower.psql("SELECT pg_is_in_recovery()") == "f"
    # The promoted host archives: a backup and a check from the repository succeed.
    monitor.check_output(REPO.format("check"))
    monitor.check_output(REPO.format("--type=incr backup"))


def _put_back(sql1, sql2, old_addr: str, new_addr: str) -> None:
    """After a failure mid-test: the pair as the inventory says again, so the suite goes on
    (best effort; each step's output is in the log)."""
    if sql2.run("su postgres -c \"psql -Atc 'SELECT pg_is_in_recovery()'\"").stdout.strip() == "f":
        invoke("sql.rebuild", "--tower", "lab-a", "--host", old_addr)
        sql2.run(f"systemctl stop {SERVICE}")
        invoke("sql.failover", "--tower", "lab-a")
    else:
        sql1.run(f"systemctl unmask {SERVICE} && systemctl start {SERVICE}")
    invoke("sql.rebuild", "--tower", "lab-a", "--host", new_addr)
