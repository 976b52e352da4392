"""The GOC's PostgreSQL is backed up by pgBackRest to the lab's sender (outside every tower),
and restored in place by the operator's one command (`invoke goc.restore`: stop, wipe,
restore to the end of the WAL archive). A customer written at the GOC after the backup comes
back (from the archive), the customers are equal, and the sync resumes both ways: a customer
added at the GOC afterwards reaches tower A's relay, and a new message's verdict event from
tower A reaches the GOC. Also: the backups' metrics on both repository hosts (the sender's
textfile; both stanzas, lab-a's and goc's, in tower A's Prometheus).

Last of the pair tests by its number: it stops the GOC's PostgreSQL, and every tower's sync
with it is made again. Point-in-time recovery: tests/unit/test_backup_pgbackrest.py; the sync
steps on real PostgreSQL: tests/unit/test_sync_goc_restore.py. Figure: goc_restore in
tests/output/figures.json.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

from conftest import Pair, goc_events
from test_50_goc import add_customer_at_goc, rcpt_answer
from test_60_sql_failover import invoke
from towerlib import record_figure, wait_for

REPO = "cd /tmp && su pgbackrest -s /bin/sh -c '/usr/bin/pgbackrest --stanza=goc {}'"
AT_GOC = "cd /tmp && su postgres -c '/usr/bin/pgbackrest --stanza=goc {}'"
TEXTFILE = "/var/lib/prometheus/node-exporter/mailtower-backup.prom"
SNAPSHOTS = {
    "customers": "SELECT id, name FROM customers ORDER BY 1",
    "domains": "SELECT name, customer_id FROM domains ORDER BY 1",
    "routes": "SELECT domain, transport FROM routes ORDER BY 1",
}


def wait_for_quietly(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(1)
    return False


def _sql_state(pair: Pair, domain: str) -> str:
    """Each tower SQL host's role, whether it holds ``domain``, its replay state; the relay's
    pgsql warnings (for the failure message)."""
    parts = []
    for key in ("a", "b"):
        tower = pair.towers[key]
        for entry in tower.hosts("sql"):
            node = tower.node(entry.name)
            try:
                row = tower.psql(
                    "SELECT pg_is_in_recovery(), (SELECT count(*) FROM domains WHERE name ="
                    f" '{domain}'), pg_last_wal_replay_lsn(), CASE WHEN pg_is_in_recovery()"
                    " THEN pg_is_wal_replay_paused()::text ELSE '-' END"
                    " , (SELECT count(*) FROM pg_stat_activity)",
                    node,
                )
            except Exception as exc:  # a host down is part of the picture
                row = f"error {exc!r}"[:200]
            parts.append(f"{key}:{entry.name}={row.strip()}")
        relay = tower.relay().run(
            "journalctl -u postfix@- --since '-10min' --no-pager | grep -i 'pgsql\\|proxymap'"
            " | tail -5"
        )
        parts.append(f"{key} relay: {relay.stdout.strip()[-800:]}")
    return "; ".join(parts)


def accepted(pair: Pair, key: str, domain: str) -> bool:
    return rcpt_answer(str(pair.towers[key].settings.hosts.relay), f"user@{domain}") == 250


def test_the_goc_and_tower_a_report_their_backups(pair: Pair) -> None:
    info = json.loads(pair.sender.check_output(REPO.format("--output=json info")))
    assert info[0]["status"]["message"] == "ok", info
    assert any(b["type"] == "full" for b in info[0]["backup"]), info

    # The metrics timer's textfile on the GOC's repository host (its node exporter serves it
    # to tower A's monitor: goc_backup_metrics, docs/runbook.md "The GOC's backups").
    def textfile() -> str:
        text = pair.sender.run(f"cat {TEXTFILE}").stdout
        return text if 'mailtower_backup_status_code{stanza="goc"} 0' in text else ""

    text = wait_for(textfile, 400, "the sender's backup metrics", 5)
    assert "mailtower_backup_info_up 1" in text
    # Tower A's stanza, read by its monitor's Prometheus from the monitor's node exporter, and
    # the GOC's, from the sender's (job goc_backup): the backup alerts cover both.
    s = pair.towers["a"].settings
    assert s.goc_backup_metrics is not None, "tower A's settings scrape no GOC repository"

    def scraped(selector: str) -> list:
        query = urllib.parse.quote(f"mailtower_backup_last_full_timestamp_seconds{{{selector}}}")
        url = f"http://{s.hosts.monitor}:{s.ports.prometheus}/api/v1/query?query={query}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)["data"]["result"]

    for selector, what in (
        ('stanza="lab-a"', "tower A's backup metric in its Prometheus"),
        ('stanza="goc",job="goc_backup"', "the GOC's backup metric in tower A's Prometheus"),
    ):
        (sample,) = wait_for(lambda sel=selector: scraped(sel), 400, what, 5)
        assert time.time() - float(sample["value"][1]) < 8 * 86400, (selector, sample)


def test_goc_restored_in_place_has_its_customers_and_the_sync_resumes(pair: Pair) -> None:
    goc = pair.goc()
    server = str(pair.customers[0].server)
    # A customer written at the GOC after the deploy's backup: it reaches tower A, and the WAL
    # archive (`check` switches the segment and waits until the repository has it).
    kept = f"kept-{pair.token()[:12]}.lab"
    add_customer_at_goc(pair, kept, server)
    # Within seconds on a quiet pair; after test_95's sql.restore and test_96's faults it once
    # took between 60 s and 3 min (lab, 2026-12-07 23:28, cause not found): the figure shows
    # it, the bound is generous so the restore below is still tested.
    added = time.monotonic()
    wait_for(lambda: accepted(pair, "a", kept), 240, f"{kept} at tower A's relay", 0.5)
    record_figure("goc_config_to_tower_a_before_restore_s", round(time.monotonic() - added, 1))
    goc.check_output(AT_GOC.format("check"))
    before = {name: pair.goc_sql(q) for name, q in SNAPSHOTS.items()}
    assert kept in before["domains"]
    events_before = pair.goc_sql("SELECT count(*) FROM verdict_events")

    started = time.monotonic()
    out = invoke("goc.restore", "--goc", "lab-goc")
    restore_s = time.monotonic() - started
    timings = json.loads(out.strip().splitlines()[-1])
    assert "lab-a: configuration subscribed again" in out, out

    after = {name: pair.goc_sql(q) for name, q in SNAPSHOTS.items()}
    for name in SNAPSHOTS:
        assert after[name] == before[name], f"{name} differ after the GOC's restore"
    assert int(pair.goc_sql("SELECT count(*) FROM verdict_events")) >= int(events_before)
    # Failed in two CIs (after test_95 and test_96, never alone): tower a's relay answered
    # 554 "Relay access denied" for this customer right after the restore (and, in the lab,
    # 250 and 554 in turn). A minute for the standby's replay, then what each SQL host holds.
    answers: list[tuple[float, str, int]] = []

    def both_accept() -> bool:
        codes = {
            k: rcpt_answer(str(pair.towers[k].settings.hosts.relay), f"user@{kept}")
            for k in ("a", "b")
        }
        answers.extend((round(time.monotonic() - started, 1), k, c) for k, c in codes.items())
        return all(c == 250 for c in codes.values())

    if not wait_for_quietly(both_accept, 60):
        raise AssertionError(
            f"{kept} not accepted by both relays after the GOC's restore: {answers[-12:]};"
            f" {_sql_state(pair, kept)}"
        )

    # Configuration down again: a customer added at the restored GOC reaches tower A.
    fresh = f"fresh-{pair.token()[:12]}.lab"
    add_customer_at_goc(pair, fresh, server)
    wait_for(lambda: accepted(pair, "a", fresh), 60, f"{fresh} at tower A's relay", 0.5)
    # Events up again: a new message's verdict event from tower A reaches the GOC.
    tokens = set(pair.submit(pair.rcpt(0), count=5))
    wait_for(
        lambda: {r["token"] for r in goc_events(pair, tokens)} == tokens,
        180,
        "events of messages sent after the GOC's restore at the GOC",
        1,
    )
    # Nothing left for the deploy to do, and the GOC archives again (a new backup works).
    goc.check_output(
        "cd /tmp && su postgres -c '/opt/mailtower/venv/bin/mailtower sync goc --check'"
    )
    pair.sender.check_output(REPO.format("--type=incr backup"))
    record_figure(
        "goc_restore",
        {"restore_command_s": round(restore_s, 1), **{k: round(v, 1) for k, v in timings.items()}},
    )
