"""VirusEye's aggregations against a real PostgreSQL holding the tower's verdict_events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from eye_fixtures import add_event, finding, goc_hub

from mailtower.goc.eye import queries
from mailtower.goc.eye.status import (
    TowerStatus,
    apply_schema,
    missing_columns,
    upsert_tower_status,
)

pytestmark = pytest.mark.integration

NOW = datetime(2026, 5, 20, 12, 0, 0, tzinfo=UTC)
WINDOW = queries.TimeWindow()


@pytest.fixture(scope="module")
def hub() -> Iterator[Any]:
    with goc_hub() as cluster:
        yield cluster


@pytest.fixture
def conn(hub: Any) -> Iterator[psycopg.Connection[Any]]:
    with hub.connect() as conn:
        conn.execute("TRUNCATE verdict_events, tower_status")
        yield conn


def ago(**delta: float) -> datetime:
    return NOW - timedelta(**delta)


@pytest.fixture
def outbreak_events(conn: psycopg.Connection[Any]) -> None:
    """Three outbreaks in the window, one that ended before it, and non-virus noise."""
    alpha = finding("clamd", "Win.Worm.Alpha")
    add_event(conn, tower="tower-a", at=ago(days=5), findings=[alpha], recipients=["x@old.example"])
    add_event(
        conn,
        tower="tower-a",
        at=ago(hours=3),
        findings=[alpha],
        recipients=["a@cust1.example", "b@Cust2.EXAMPLE"],
    )
    add_event(
        conn, tower="tower-b", at=ago(minutes=30), findings=[alpha], recipients=["c@cust1.example"]
    )
    add_event(
        conn,
        tower="tower-a",
        at=ago(minutes=10),
        findings=[
            alpha,
            finding("icap", "W32/Alpha.worm"),
            finding("policy", "policy.banned-extension.exe"),
            finding("skeptic", "skeptic.double-extension"),
            finding("mime", "mime.header-obfuscation"),
        ],
        recipients=["d@cust3.example"],
    )
    add_event(
        conn,
        tower="tower-b",
        at=ago(minutes=90),
        findings=[finding("clamd", "Win.Trojan.Beta"), finding("clamd", "Heuristics.Phishing")],
        recipients=["e@cust1.example"],
    )
    add_event(
        conn,
        tower="tower-b",
        at=ago(minutes=5),
        findings=[finding("skeptic", "skeptic.known-worm.mydoom")],
        recipients=["f@cust4.example"],
    )
    add_event(
        conn,
        tower="tower-a",
        at=ago(hours=30),
        findings=[finding("clamd", "Old.Gone")],
        recipients=["g@cust1.example"],
    )
    # Not virus verdicts, or from a tower whose clock is an hour fast: not counted.
    for verdict, findings in [
        ("banned", [finding("policy", "policy.banned-extension.exe")]),
        ("suspicious", [finding("skeptic", "skeptic.obfuscated-script")]),
        ("clean", []),
    ]:
        add_event(
            conn,
            tower="tower-a",
            at=ago(minutes=1),
            findings=findings,
            recipients=["h@x.example"],
            verdict=verdict,
        )
    add_event(
        conn,
        tower="tower-a",
        at=NOW + timedelta(hours=1),
        findings=[finding("clamd", "From.The.Future")],
        recipients=["j@x.example"],
    )


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


@pytest.mark.usefixtures("outbreak_events")
def test_outbreaks_current_only_busiest_first(conn: psycopg.Connection[Any]) -> None:
    rows = queries.outbreaks(conn, NOW, WINDOW)
    # Alpha: 2 in the last hour; mydoom: 1 in the last hour; Beta: none in the last hour.
    assert [r["name"] for r in rows] == [
        "Win.Worm.Alpha",
        "skeptic.known-worm.mydoom",
        "Win.Trojan.Beta",
    ]


@pytest.mark.usefixtures("outbreak_events")
def test_outbreak_row(conn: psycopg.Connection[Any]) -> None:
    alpha = by_name(queries.outbreaks(conn, NOW, WINDOW))["Win.Worm.Alpha"]
    assert datetime.fromisoformat(alpha["first_seen"]) == ago(days=5)  # ever, not in the window
    assert datetime.fromisoformat(alpha["last_seen"]) == ago(minutes=10)
    assert alpha["detections"] == 3  # in the window
    assert (alpha["last_hour"], alpha["previous_hour"]) == (2, 0)
    assert alpha["towers"] == ["tower-a", "tower-b"]
    assert alpha["customers_count"] == 3
    assert alpha["customers"] == ["cust1.example", "cust2.example", "cust3.example"]
    assert alpha["first_engine"] == "clamd"
    assert alpha["new"] is False


@pytest.mark.usefixtures("outbreak_events")
def test_engines_of_an_outbreak_are_virus_class_only(conn: psycopg.Connection[Any]) -> None:
    rows = by_name(queries.outbreaks(conn, NOW, WINDOW))
    alpha = [
        (e["engine"], datetime.fromisoformat(e["first_at"]))
        for e in rows["Win.Worm.Alpha"]["engines"]
    ]
    # policy, mime and an informational Skeptic rule on the same message are not catches.
    assert alpha == [("clamd", ago(hours=3)), ("icap", ago(minutes=10))]
    assert [e["engine"] for e in rows["Win.Trojan.Beta"]["engines"]] == ["clamd"]
    mydoom = rows["skeptic.known-worm.mydoom"]
    assert mydoom["first_engine"] == "skeptic"
    assert [e["engine"] for e in mydoom["engines"]] == ["skeptic"]
    assert mydoom["new"] is True


@pytest.mark.usefixtures("outbreak_events")
def test_engine_catch_counts(conn: psycopg.Connection[Any]) -> None:
    counts = {e["engine"]: e for e in queries.engines(conn, NOW, WINDOW)}
    assert set(counts) == {"clamd", "icap", "skeptic"}
    # clamd: Alpha ×3 + Beta (its heuristic on the same message is not a second catch).
    assert counts["clamd"] == {"engine": "clamd", "catches": 4, "last_hour": 2, "alone": 3}
    assert counts["icap"] == {"engine": "icap", "catches": 1, "last_hour": 1, "alone": 0}
    assert counts["skeptic"] == {"engine": "skeptic", "catches": 1, "last_hour": 1, "alone": 1}


@pytest.mark.usefixtures("outbreak_events")
def test_totals(conn: psycopg.Connection[Any]) -> None:
    assert queries.totals(conn, NOW, WINDOW) == {"virus_window": 5, "virus_last_hour": 3}


def test_shorter_window_drops_older_outbreaks(conn: psycopg.Connection[Any]) -> None:
    add_event(
        conn, tower="t", at=ago(hours=2), findings=[finding("clamd", "A")], recipients=["a@b.c"]
    )
    add_event(
        conn, tower="t", at=ago(minutes=2), findings=[finding("clamd", "B")], recipients=["a@b.c"]
    )
    window = queries.TimeWindow(outbreaks=timedelta(hours=1))
    assert [r["name"] for r in queries.outbreaks(conn, NOW, window)] == ["B"]


def test_a_slightly_fast_tower_clock_still_counts(conn: psycopg.Connection[Any]) -> None:
    now = NOW - timedelta(minutes=1)  # the event below falls in the bucket after now's
    ahead = now + WINDOW.clock_skew - timedelta(seconds=1)
    add_event(conn, tower="t", at=ahead, findings=[finding("clamd", "Fast")], recipients=["a@b.c"])
    (row,) = queries.outbreaks(conn, now, WINDOW)
    assert (row["name"], row["last_hour"]) == ("Fast", 1)
    assert queries.totals(conn, now, WINDOW)["virus_last_hour"] == 1
    assert [e["catches"] for e in queries.engines(conn, now, WINDOW)] == [1]
    assert queries.timeline(conn, now, WINDOW)["towers"]["t"][-1] == 1  # the current bucket


def test_customer_domains_from_odd_recipients(conn: psycopg.Connection[Any]) -> None:
    add_event(
        conn,
        tower="tower-a",
        at=ago(minutes=1),
        findings=[finding("clamd", "Odd")],
        recipients=["<x@Example.ORG>", "postmaster", '"a@b"@c.example', "y@example.org"],
    )
    (row,) = queries.outbreaks(conn, NOW, WINDOW)
    assert row["customers"] == ["c.example", "example.org"]
    assert row["customers_count"] == 2


def test_customers_listed_are_capped_but_counted(conn: psycopg.Connection[Any]) -> None:
    recipients = [f"u@d{i:02}.example" for i in range(30)]
    add_event(
        conn,
        tower="t",
        at=ago(minutes=1),
        findings=[finding("clamd", "Wide")],
        recipients=recipients,
    )
    (row,) = queries.outbreaks(conn, NOW, WINDOW)
    assert row["customers_count"] == 30
    assert row["customers"] == [f"d{i:02}.example" for i in range(WINDOW.max_customers)]


def test_timeline_buckets_per_tower(conn: psycopg.Connection[Any]) -> None:
    virus = [finding("clamd", "T")]
    bucket = WINDOW.bucket
    # NOW is on a bucket boundary: the last bucket is [NOW, NOW + 5 min).
    add_event(conn, tower="tower-a", at=NOW, findings=virus, recipients=["a@b.c"])
    add_event(
        conn,
        tower="tower-a",
        at=NOW - bucket + timedelta(seconds=1),
        findings=virus,
        recipients=["a@b.c"],
    )
    add_event(conn, tower="tower-a", at=NOW - bucket, findings=virus, recipients=["a@b.c"])
    add_event(conn, tower="tower-b", at=NOW - 3 * bucket, findings=virus, recipients=["a@b.c"])
    add_event(
        conn, tower="tower-b", at=NOW - timedelta(hours=7), findings=virus, recipients=["a@b.c"]
    )
    add_event(
        conn, tower="tower-b", at=NOW - bucket, findings=[], recipients=["a@b.c"], verdict="clean"
    )
    chart = queries.timeline(conn, NOW, WINDOW)
    count = chart["count"]
    assert (chart["bucket_s"], count) == (300, 72)
    assert chart["start"] == NOW.timestamp() - (count - 1) * 300
    assert set(chart["towers"]) == {"tower-a", "tower-b"}
    a, b = chart["towers"]["tower-a"], chart["towers"]["tower-b"]
    assert len(a) == len(b) == count
    assert a[-1] == 1 and a[-2] == 2 and sum(a) == 3
    assert b[-4] == 1 and sum(b) == 1  # 7 h ago is outside the 6 h chart


def test_tower_status_upsert_and_staleness(hub: Any, conn: psycopg.Connection[Any]) -> None:
    upsert_tower_status(conn, TowerStatus("tower-a", 20, 23, 5, 0.4))
    upsert_tower_status(conn, TowerStatus("tower-a", 23, 23, 7, None))  # replaces, not adds
    upsert_tower_status(conn, TowerStatus("tower-b", 23, 23, 0, 0.1))
    conn.execute(
        "UPDATE tower_status SET updated_at = now() - interval '5 minutes' WHERE tower = 'tower-b'"
    )
    now = queries.db_now(conn)
    towers = {t["tower"]: t for t in queries.towers(conn, now, WINDOW, {"tower-c"})}
    assert set(towers) == {"tower-a", "tower-b", "tower-c"}
    a = towers["tower-a"]
    assert (a["scanners_up"], a["scanners_total"], a["queue_size"]) == (23, 23, 7)
    assert a["replication_lag_s"] is None
    assert a["stale"] is False and 0 <= a["age_s"] < 5
    assert towers["tower-b"]["stale"] is True and towers["tower-b"]["age_s"] >= 300
    # Seen in events but never reported: stale, with nothing to show.
    assert towers["tower-c"]["stale"] is True and towers["tower-c"]["scanners_up"] is None


def test_tower_status_carries_rule_bundle_versions(hub: Any, conn: psycopg.Connection[Any]) -> None:
    upsert_tower_status(conn, TowerStatus("tower-a", 23, 23, 0, 0.1))  # callers before bundles
    upsert_tower_status(
        conn,
        TowerStatus("tower-b", 23, 23, 0, 0.1, rules_bundle=7, rules_target=8, scanners_behind=3),
    )
    now = queries.db_now(conn)
    towers = {t["tower"]: t for t in queries.towers(conn, now, WINDOW, {"tower-c"})}
    rules = {
        name: (t["rules_bundle"], t["rules_target"], t["scanners_behind"])
        for name, t in towers.items()
    }
    assert rules == {"tower-a": (None, None, 0), "tower-b": (7, 8, 3), "tower-c": (None, None, 0)}
    upsert_tower_status(conn, TowerStatus("tower-b", 23, 23, 0, 0.1, 8, 8, 0))  # caught up
    (row,) = conn.execute(
        "SELECT rules_bundle, rules_target, scanners_behind FROM tower_status"
        " WHERE tower = 'tower-b'"
    ).fetchall()
    assert row == (8, 8, 0)
    with pytest.raises(psycopg.errors.CheckViolation):
        upsert_tower_status(conn, TowerStatus("tower-b", 23, 23, 0, 0.1, 8, 8, -1))


def test_tower_status_carries_the_clamav_mirror(hub: Any, conn: psycopg.Connection[Any]) -> None:
    mirror = {
        "databases": {
            "daily": {"version": 27500, "built_at": 1765000000.0, "behind": 2},
            "main": {"version": 62, "built_at": None, "behind": 0},
        },
        "upstream_last_ok": 1765003600.0,
        "scanners_behind": 2,
        "rejected": False,
    }
    upsert_tower_status(conn, TowerStatus("tower-a", 23, 23, 0, 0.1))  # takes no databases
    upsert_tower_status(conn, TowerStatus("tower-b", 23, 23, 0, 0.1, clamav=mirror))
    now = queries.db_now(conn)
    towers = {t["tower"]: t for t in queries.towers(conn, now, WINDOW, {"tower-c"})}
    assert {name: t["clamav"] for name, t in towers.items()} == {
        "tower-a": None,
        "tower-b": mirror,
        "tower-c": None,
    }
    json.dumps(queries.snapshot(conn))  # the page gets it as JSON
    with pytest.raises(psycopg.errors.CheckViolation):  # an object, or nothing
        conn.execute("UPDATE tower_status SET clamav = '[1]' WHERE tower = 'tower-b'")


def test_schema_adds_the_bundle_columns_to_an_older_tower_status(hub: Any) -> None:
    """A GOC made before rule bundles: its tower_status gains the columns, rows kept."""
    with hub.connect() as conn:
        conn.execute("CREATE DATABASE old_goc")
    try:
        with hub.connect("old_goc") as old:
            old.execute(
                "CREATE TABLE verdict_events (scanned_at timestamptz, verdict text, findings jsonb)"
            )
            old.execute(
                "CREATE TABLE tower_status (tower text PRIMARY KEY, scanners_up integer NOT NULL,"
                " scanners_total integer NOT NULL, queue_size integer NOT NULL,"
                " replication_lag_s real, updated_at timestamptz NOT NULL DEFAULT now())"
            )
            old.execute("INSERT INTO tower_status VALUES ('tower-a', 23, 23, 0, NULL, now())")
            assert missing_columns(old) == [
                "rules_bundle",
                "rules_target",
                "scanners_behind",
                "clamav",
            ]
            apply_schema(old)
            assert missing_columns(old) == []
            row = old.execute(
                "SELECT scanners_up, rules_bundle, rules_target, scanners_behind FROM tower_status"
            ).fetchone()
            assert row == (23, None, None, 0)
            upsert_tower_status(old, TowerStatus("tower-a", 22, 23, 1, None, 3, 4, 1))
            apply_schema(old)  # idempotent: nothing added twice, nothing lost
            row = old.execute(
                "SELECT scanners_up, rules_bundle, rules_target, scanners_behind FROM tower_status"
            ).fetchone()
            assert row == (22, 3, 4, 1)
    finally:
        with hub.connect() as conn:
            conn.execute("DROP DATABASE old_goc")


def test_snapshot_is_json_and_covers_every_tower(conn: psycopg.Connection[Any]) -> None:
    upsert_tower_status(conn, TowerStatus("tower-quiet", 23, 23, 0, 0.0))
    at = queries.db_now(conn) - timedelta(minutes=1)
    add_event(
        conn, tower="tower-busy", at=at, findings=[finding("clamd", "S")], recipients=["a@b.c"]
    )
    snap = json.loads(json.dumps(queries.snapshot(conn)))
    assert [o["name"] for o in snap["outbreaks"]] == ["S"]
    assert [t["tower"] for t in snap["towers"]] == ["tower-busy", "tower-quiet"]
    # The chart has a line for the quiet tower too, all zeros.
    assert set(snap["timeline"]["towers"]) == {"tower-busy", "tower-quiet"}
    assert sum(snap["timeline"]["towers"]["tower-quiet"]) == 0
    assert snap["totals"]["virus_last_hour"] == 1


def test_schema_is_idempotent(conn: psycopg.Connection[Any]) -> None:
    apply_schema(conn)
    apply_schema(conn)
    indexes = {
        row[0]
        for row in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'verdict_events'"
        ).fetchall()
    }
    assert {"verdict_events_virus_at", "verdict_events_virus_name"} <= indexes


def test_first_seen_uses_the_name_index(conn: psycopg.Connection[Any]) -> None:
    """The per-name probe must match the index expression (schema.sql) or it scans every event."""
    conn.execute("SET enable_seqscan = off")
    try:
        plan = conn.execute(
            f"EXPLAIN SELECT min(scanned_at) FROM verdict_events "
            f"WHERE verdict = 'virus' AND {queries.OUTBREAK_NAME} = 'x'"
        ).fetchall()
    finally:
        conn.execute("RESET enable_seqscan")
    assert "verdict_events_virus_name" in "\n".join(row[0] for row in plan)


def test_schema_command(hub: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from mailtower.goc.eye.__main__ import main

    assert main(["schema", "--dsn", hub.dsn()]) == 0
    assert "schema in place" in capsys.readouterr().out
    assert main(["schema", "--dsn", "host=/nonexistent dbname=x connect_timeout=1"]) == 1
