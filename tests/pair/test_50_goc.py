"""The GOC (10.201.9.10) and both towers, synced by PostgreSQL logical replication: the sync
objects the deploys made, configuration down (a customer added at the GOC is accepted by both
relays), events up (mail through the towers is counted at the GOC), and a GOC outage (the
towers keep carrying mail, the GOC catches up with every event once, none twice).

Figures: tests/output/figures.json (goc_*), copied into docs/benchmarks.md.
"""

from __future__ import annotations

import base64
import os
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import Pair, goc_events, percentile, token_of
from towerlib import record_figure, wait_for

from mailtower.goc.sync import names

TOWERS = ("a", "b")
# Messages sent for the events-up figure (MAILTOWER_GOC_EVENTS=1000 for the benchmark run).
EVENTS = int(os.environ.get("MAILTOWER_GOC_EVENTS", "100"))
CUSTOMERS_ADDED = 5


def tower_event_ids(pair: Pair, tokens: set[str]) -> set[str]:
    """Event ids of these messages at both towers' primaries."""
    ids = set()
    for key in TOWERS:
        out = pair.towers[key].psql(
            "SELECT event_id, message_id FROM verdict_events"
            " WHERE message_id LIKE '%@internet.lab>'"
            " AND scanned_at > now() - interval '2 hours'"
        )
        for line in out.splitlines():
            event_id, message_id = line.split("|")
            if token_of(message_id) in tokens:
                ids.add(event_id)
    return ids


def rcpt_answer(address: str, rcpt: str) -> int:
    with smtplib.SMTP(address, 25, timeout=10) as smtp:
        smtp.ehlo("goc-check.internet.lab")
        smtp.mail("someone@internet.lab")
        code, _ = smtp.rcpt(rcpt)
        smtp.rset()
    return code


def http_status(url: str, tls: ssl.SSLContext) -> tuple[int, str, dict[str, str]]:
    """(status, Location, headers) of a GET over verified HTTPS, redirects not followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=tls), NoRedirect)
    try:
        with opener.open(url, timeout=5) as response:
            return int(response.status), "", dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location", ""), dict(exc.headers)


# -- what the deploys made ---------------------------------------------------------------------


def test_goc_publishes_config_and_follows_both_towers(pair: Pair) -> None:
    goc = pair.goc()
    assert goc.service("postgresql@15-main").is_running
    assert pair.goc_sql("SHOW wal_level") == "logical"
    tables = pair.goc_sql(
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables"
        f" WHERE pubname = '{names.CONFIG_PUBLICATION}'"
    )
    assert tables == ",".join(sorted(names.CONFIG_TABLES))
    for key in TOWERS:
        tower = pair.towers[key].settings
        sub = names.events_subscription(tower.name)
        row = pair.goc_sql(
            "SELECT s.subenabled, st.pid IS NOT NULL, s.subconninfo LIKE"
            f" '%host={tower.sql_primary} %' FROM pg_subscription s"
            f" JOIN pg_stat_subscription st ON st.subid = s.oid WHERE s.subname = '{sub}'"
        )
        assert row == "t|t|t", f"GOC subscription {sub}: enabled|worker|follows primary = {row}"
    # A second apply would change nothing: the deploy's own check says so.
    check = goc.run(
        "cd /tmp && su postgres -c '/opt/mailtower/venv/bin/mailtower sync goc --check'"
    )
    assert check.rc == 0, check.stdout + check.stderr


@pytest.mark.parametrize("key", TOWERS)
def test_tower_publishes_events_and_subscribes_config(pair: Pair, key: str) -> None:
    tower = pair.towers[key]
    s = tower.settings
    assert (
        tower.psql(
            f"SELECT 1 FROM pg_publication WHERE pubname = '{names.EVENTS_PUBLICATION}'"
            " AND pubinsert AND NOT pubdelete AND NOT pubupdate"
        )
        == "1"
    )
    sub = names.config_subscription(s.name)
    row = tower.psql(
        "SELECT s.subenabled, st.pid IS NOT NULL FROM pg_subscription s"
        f" JOIN pg_stat_subscription st ON st.subid = s.oid WHERE s.subname = '{sub}'"
    )
    assert row == "t|t", f"{s.name}: config subscription enabled|worker = {row}"
    for entry in tower.hosts("sql"):  # primary and standby alike: nothing left to do
        check = tower.node(entry.name).run(
            "cd /tmp && su postgres -c '/opt/mailtower/venv/bin/mailtower sync tower --check'"
        )
        assert check.rc == 0, f"{entry.name}: {check.stdout}{check.stderr}"
    # The customers are the GOC's (the towers no longer load their own list).
    goc_domains = pair.goc_sql("SELECT string_agg(name, ',' ORDER BY name) FROM domains")
    assert tower.psql("SELECT string_agg(name, ',' ORDER BY name) FROM domains") == goc_domains


def test_viruseye_is_served_from_the_goc_to_operators_only(pair: Pair) -> None:
    assert pair.goc().service("mailtower-eye").is_running
    url, tls = pair.eye_url(), pair.eye_tls()  # verified against the GOC's own certificate
    status, location, headers = http_status(f"{url}/", tls)
    assert status in (302, 303) and location.endswith("/login")
    assert headers.get("Strict-Transport-Security", "").startswith("max-age=")
    assert http_status(f"{url}/api/snapshot", tls)[0] == 401
    assert http_status(f"{url}/events", tls)[0] == 401


def test_viruseye_answers_no_plain_http(pair: Pair) -> None:
    """HTTPS only (issue 15): plain HTTP to the port gets no page, so no session cookie."""
    answer = pair.eye_plain_http()
    assert b"HTTP/" not in answer and b"Set-Cookie" not in answer, answer[:200]


# -- configuration down ------------------------------------------------------------------------


def add_customer_at_goc(pair: Pair, domain: str, server: str) -> None:
    pair.goc_sql(
        "BEGIN; INSERT INTO customers (name) VALUES ('%s');"
        " INSERT INTO domains (name, customer_id) SELECT '%s', id FROM customers"
        " WHERE name = '%s'; INSERT INTO routes (domain, transport)"
        " VALUES ('%s', 'smtp:[%s]:25'); COMMIT;" % (domain, domain, domain, domain, server)
    )


def seconds_until_accepted(relays: dict[str, str], rcpt: str, started: float) -> dict[str, float]:
    """Each relay's seconds from ``started`` to answering 250 to ``rcpt`` (within 60 s)."""
    accepted: dict[str, float] = {}

    def watch(key: str) -> None:
        while time.monotonic() - started < 60:
            if rcpt_answer(relays[key], rcpt) == 250:
                accepted[key] = time.monotonic() - started
                return
            time.sleep(0.05)

    watchers = [threading.Thread(target=watch, args=(key,)) for key in relays]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join()
    return accepted


def test_customers_added_at_the_goc_are_accepted_by_both_relays(pair: Pair) -> None:
    relays = {key: str(pair.towers[key].settings.hosts.relay) for key in TOWERS}
    server = pair.customers[0].server  # its lab server takes mail for new-<hex>.lab too
    domains = [f"new-{pair.token()[:12]}.lab" for _ in range(CUSTOMERS_ADDED)]
    in_sql: dict[str, list[float]] = {key: [] for key in TOWERS}
    relay_s: dict[str, list[float]] = {key: [] for key in TOWERS}  # after it was in SQL
    try:
        for domain in domains:
            rcpt = f"user@{domain}"
            # Not asked before it exists: smtpd caches an address's class (relay domain or
            # not) for the life of its process, so a refused domain could stay refused
            # for up to a minute after it is added (docs/runbook.md).
            for key in TOWERS:
                assert (
                    pair.towers[key].psql(f"SELECT count(*) FROM domains WHERE name = '{domain}'")
                    == "0"
                )
            add_customer_at_goc(pair, domain, server)
            started = time.monotonic()  # the commit returned (SSH's return trip included)
            for key in TOWERS:
                tower = pair.towers[key]
                for entry in tower.hosts("sql"):  # the relay's maps read either host
                    node = tower.node(entry.name)
                    wait_for(
                        lambda tower=tower, node=node, domain=domain: (
                            tower.psql(
                                f"SELECT count(*) FROM domains WHERE name = '{domain}'", host=node
                            )
                            == "1"
                        ),
                        30,
                        f"{domain} on {entry.name}",
                        0.05,
                    )
                in_sql[key].append(time.monotonic() - started)
            # Then both relays take its mail at once (no reload: the maps are SQL queries).
            accepted = seconds_until_accepted(relays, rcpt, time.monotonic())
            assert set(accepted) == set(TOWERS), f"{domain}: accepted by {sorted(accepted)}"
            for key, value in accepted.items():
                relay_s[key].append(value)
                assert value < 10, f"tower {key} accepted {domain} only {value:.1f} s after SQL"
        record_figure(
            "goc_config_propagation_s",
            {
                key: {
                    "customers": len(v),
                    "p50": round(percentile(v, 0.5), 2),
                    "max": round(max(v), 2),
                }
                for key, v in in_sql.items()
            },
        )
        record_figure(
            "goc_config_relay_accepts_after_sql_s",
            {
                key: {"p50": round(percentile(v, 0.5), 2), "max": round(max(v), 2)}
                for key, v in relay_s.items()
            },
        )
        # Mail to the first one, handed to each tower's relay, reaches the route the GOC gave.
        tokens = []
        for address in relays.values():
            token = pair.token()
            rcpt = f"user@{domains[0]}"
            with smtplib.SMTP(address, 25, timeout=30) as smtp:
                smtp.send_message(pair.message(token, rcpt), "someone@internet.lab", [rcpt])
            tokens.append(token)
        arrivals = pair.wait_delivered(tokens, index=0, timeout=120)
        assert {pair.tower_of(arrivals[t][0]["by"]) for t in tokens} == set(TOWERS)
    finally:
        pair.goc_sql(
            "DELETE FROM customers WHERE name IN (%s)" % ",".join(f"'{d}'" for d in domains)
        )
    # Customers removed at the GOC are gone from both towers at once. (The relays' smtpd
    # processes keep an address's class for their life: they refuse the removed domains
    # within minutes, not at once; measured in docs/benchmarks.md, runbook "customers".)
    removed = time.monotonic()
    wait_for(
        lambda: all(
            pair.towers[k].psql(
                "SELECT count(*) FROM domains WHERE name IN (%s)"
                % ",".join(f"'{d}'" for d in domains)
            )
            == "0"
            for k in TOWERS
        ),
        30,
        "the removed customers gone from both towers' SQL",
    )
    record_figure("goc_config_removal_s", round(time.monotonic() - removed, 2))


# -- events up ---------------------------------------------------------------------------------


def test_every_event_reaches_the_goc_once(pair: Pair) -> None:
    tokens: list[str] = []
    for index in range(len(pair.customers)):
        tokens += pair.submit(pair.rcpt(index), count=EVENTS // len(pair.customers))
    wanted = set(tokens)
    events = wait_for(
        lambda: (
            (rows := goc_events(pair, wanted)) and {r["token"] for r in rows} == wanted and rows
        ),
        300,
        f"the events of {len(wanted)} messages at the GOC",
        1,
    )
    assert {r["tower"] for r in events} <= {pair.towers[k].settings.name for k in TOWERS}
    # Every event at the towers is at the GOC, and nothing else.
    assert {r["event_id"] for r in events} == tower_event_ids(pair, wanted)
    lag = [r["received_at"] - r["scanned_at"] for r in events]
    by_tower = {t: sum(1 for r in events if r["tower"] == t) for t in {r["tower"] for r in events}}
    record_figure(
        "goc_event_lag_s",
        {
            "events": len(lag),
            "by_tower": by_tower,
            "p50": round(percentile(lag, 0.50), 3),
            "p99": round(percentile(lag, 0.99), 3),
            "max": round(max(lag), 3),
        },
    )
    span = max(r["received_at"] for r in events) - min(r["received_at"] for r in events)
    record_figure("goc_ingest_events_per_s_observed", round(len(events) / max(span, 0.001), 1))


# -- the GOC away ------------------------------------------------------------------------------


def test_goc_outage_towers_keep_working_and_the_goc_catches_up(pair: Pair) -> None:
    goc = pair.goc()
    goc.check_output("systemctl stop postgresql@15-main")
    try:
        tokens = []
        for index in range(len(pair.customers)):
            tokens += pair.submit(pair.rcpt(index), count=20)
        for index in range(len(pair.customers)):
            mine = tokens[index * 20 : (index + 1) * 20]
            pair.wait_delivered(mine, index=index, timeout=180)
        time.sleep(5)  # the towers' subscriptions retry the GOC meanwhile
    finally:
        goc.check_output("systemctl start postgresql@15-main")
    back = time.monotonic()
    wanted = set(tokens)
    events = wait_for(
        lambda: (
            (rows := goc_events(pair, wanted)) and {r["token"] for r in rows} == wanted and rows
        ),
        180,
        f"the GOC catching up with {len(wanted)} messages' events",
        0.5,
    )
    caught_up = time.monotonic() - back
    assert {r["event_id"] for r in events} == tower_event_ids(pair, wanted)
    assert len(events) == len({r["event_id"] for r in events})
    record_figure(
        "goc_outage",
        {"messages": len(wanted), "events_at_goc": len(events), "catch_up_s": round(caught_up, 1)},
    )


def test_the_goc_stamps_each_event_with_the_tower_that_sent_it(pair: Pair) -> None:
    """Issue 15: an event forged at lab-a's primary under lab-b's name is stored at the GOC as
    lab-a's; lab-a's scanners' SQL role cannot even store it."""
    a, b = pair.towers["a"], pair.towers["b"]
    forged = "00000000-0000-4000-8000-0000000000f5"
    insert = (
        "INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict, recipients,"
        f" size_bytes) VALUES ('{forged}', '{b.settings.name}', 'forger', now(), 'virus',"
        " ARRAY['victim@customer.lab'], 1)"
    )
    as_scanner = base64.b64encode(f"SET ROLE mailtower_scanner; {insert};".encode()).decode()
    refused = a.sql_primary().run(
        f"echo {as_scanner} | base64 -d | (cd /tmp && su postgres -c"
        f" 'psql -X -q -tA -v ON_ERROR_STOP=1 -d {a.settings.sql_database}')"
    )
    assert refused.rc != 0 and "verdict_events_own_tower" in refused.stderr, refused.stderr
    # A compromised primary: its superuser drops the CHECK and forges; the deploy restores it.
    a.psql(
        "BEGIN; ALTER TABLE verdict_events DROP CONSTRAINT verdict_events_own_tower;"
        f" {insert} ON CONFLICT DO NOTHING; COMMIT"
    )
    try:
        wait_for(
            lambda: (
                pair.goc_sql(f"SELECT tower FROM verdict_events WHERE event_id = '{forged}'") != ""
            ),
            60,
            "the forged event at the GOC",
        )
        stored = pair.goc_sql(f"SELECT tower FROM verdict_events WHERE event_id = '{forged}'")
        assert stored == a.settings.name
    finally:
        a.psql(f"DELETE FROM verdict_events WHERE event_id = '{forged}'")
        check = a.sql_primary().run(
            "cd /tmp && su postgres -c '/opt/mailtower/venv/bin/mailtower sync tower'"
        )
        assert check.rc == 0, check.stdout + check.stderr
    assert (
        a.psql("SELECT count(*) FROM pg_constraint WHERE conname = 'verdict_events_own_tower'")
        == "1"
    )
