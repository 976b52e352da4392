"""VirusEye's aggregations over the GOC hub: one ``snapshot`` is everything the page shows.

Blocking (psycopg); the web server runs it in a thread. Every query takes the time ``now`` as
a parameter, so tests pin it and every part of one snapshot agrees on it.

An outbreak is keyed by the name of a virus event's *first* finding: the pipeline puts the
findings that decided ``virus`` first (``mailtower.scanning.pipeline``: virus, banned,
suspicious, info), so that name is the signature the tower quarantined the message for.
Other engines' findings on the same messages count as their catches when they are virus-class
(``VIRUS_FINDING``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from mailtower.scanning import pipeline
from mailtower.scanning.skeptic import Skeptic

# Must match the expression of the verdict_events_virus_name index (schema.sql).
OUTBREAK_NAME = "findings -> 0 ->> 'name'"

# Which findings (``f.value``) of a virus event are virus-class, from the pipeline's own rules:
# not a policy ban, a MIME or container anomaly, an anti-virus heuristic, nor a Skeptic rule
# other than those the policy names as known malware. A YARA rule's severity is not in the
# event, so every YARA finding of a virus event counts.
VIRUS_FINDING = """(
    f.value ->> 'engine' <> ALL (%(not_virus_engines)s)
    AND f.value ->> 'name' !~* %(heuristic_re)s
    AND (f.value ->> 'engine' <> %(skeptic)s
         OR EXISTS (SELECT 1 FROM unnest(%(virus_rules)s::text[]) AS r(rule)
                    WHERE f.value ->> 'name' = r.rule
                       OR starts_with(f.value ->> 'name', r.rule || '.')))
)"""

OUTBREAKS = f"""
WITH recent AS (
    SELECT event_id, tower, scanned_at, recipients, findings, {OUTBREAK_NAME} AS name
    FROM verdict_events
    WHERE verdict = 'virus' AND scanned_at > %(since)s AND scanned_at <= %(until)s
),
named AS (SELECT * FROM recent WHERE name IS NOT NULL),
firsts AS (  -- the oldest event under each name, ever (an index probe per name)
    SELECT n.name, o.scanned_at AS first_seen, o.findings -> 0 ->> 'engine' AS first_engine
    FROM (SELECT DISTINCT name FROM named) AS n
    CROSS JOIN LATERAL (
        SELECT e.scanned_at, e.findings FROM verdict_events e
        WHERE e.verdict = 'virus' AND e.{OUTBREAK_NAME} = n.name AND e.scanned_at <= %(until)s
        ORDER BY e.scanned_at, e.event_id LIMIT 1
    ) AS o
),
catches AS (  -- each engine that flagged this outbreak's messages, and its first time
    SELECT h.name, f.value ->> 'engine' AS engine, min(h.scanned_at) AS first_at
    FROM named h CROSS JOIN LATERAL jsonb_array_elements(h.findings) AS f(value)
    WHERE {VIRUS_FINDING}
    GROUP BY h.name, f.value ->> 'engine'
),
engines AS (
    SELECT name, jsonb_agg(jsonb_build_object('engine', engine, 'first_at', first_at)
                           ORDER BY first_at, engine) AS engines
    FROM catches GROUP BY name
),
domains AS (  -- customers hit: the recipients' domains
    SELECT h.name, count(DISTINCT d.domain) AS customers_count,
           (array_agg(DISTINCT d.domain ORDER BY d.domain))[1:%(max_customers)s] AS customers
    FROM named h
    CROSS JOIN LATERAL unnest(h.recipients) AS r(addr)
    CROSS JOIN LATERAL (SELECT lower(substring(r.addr FROM '@([^@>]+)>?$')) AS domain) AS d
    WHERE d.domain IS NOT NULL
    GROUP BY h.name
)
SELECT h.name,
       fs.first_seen,
       fs.first_engine,
       max(h.scanned_at) AS last_seen,
       count(*) AS detections,
       count(*) FILTER (WHERE h.scanned_at > %(hour_ago)s) AS last_hour,
       count(*) FILTER (WHERE h.scanned_at > %(two_hours_ago)s
                          AND h.scanned_at <= %(hour_ago)s) AS previous_hour,
       array_agg(DISTINCT h.tower ORDER BY h.tower) AS towers,
       coalesce(d.customers_count, 0) AS customers_count,
       coalesce(d.customers, '{{}}') AS customers,
       coalesce(e.engines, '[]') AS engines
FROM named h
JOIN firsts fs USING (name)
LEFT JOIN domains d USING (name)
LEFT JOIN engines e USING (name)
GROUP BY h.name, fs.first_seen, fs.first_engine, d.customers_count, d.customers, e.engines
ORDER BY last_hour DESC, last_seen DESC, h.name
LIMIT %(max_outbreaks)s
"""

TIMELINE = """
SELECT tower,
       extract(epoch FROM date_bin(%(bucket)s, scanned_at, TIMESTAMPTZ 'epoch'))::bigint AS bucket,
       count(*)
FROM verdict_events
WHERE verdict = 'virus' AND scanned_at >= %(start)s AND scanned_at <= %(until)s
GROUP BY 1, 2
"""

ENGINES = f"""
WITH recent AS (
    SELECT event_id, scanned_at, findings FROM verdict_events
    WHERE verdict = 'virus' AND scanned_at > %(since)s AND scanned_at <= %(until)s
      AND jsonb_typeof(findings) = 'array'
),
caught AS (
    SELECT DISTINCT h.event_id, h.scanned_at, f.value ->> 'engine' AS engine
    FROM recent h CROSS JOIN LATERAL jsonb_array_elements(h.findings) AS f(value)
    WHERE {VIRUS_FINDING}
),
per_event AS (SELECT event_id, count(*) AS engines FROM caught GROUP BY event_id)
SELECT c.engine,
       count(*) AS catches,
       count(*) FILTER (WHERE c.scanned_at > %(hour_ago)s) AS last_hour,
       count(*) FILTER (WHERE p.engines = 1) AS alone
FROM caught c JOIN per_event p USING (event_id)
GROUP BY c.engine
ORDER BY catches DESC, c.engine
"""

TOTALS = """
SELECT count(*), count(*) FILTER (WHERE scanned_at > %(hour_ago)s)
FROM verdict_events
WHERE verdict = 'virus' AND scanned_at > %(since)s AND scanned_at <= %(until)s
"""

TOWERS = """
SELECT tower, scanners_up, scanners_total, queue_size, replication_lag_s,
       rules_bundle, rules_target, scanners_behind, clamav, updated_at,
       extract(epoch FROM (%(now)s - updated_at))::float8 AS age_s
FROM tower_status ORDER BY tower
"""


@dataclass(frozen=True)
class Thresholds:
    """When a tower's figures turn the operator's attention (the page colours them)."""

    stale_after_s: float = 60.0  # no status update for this long: the tower is "stale"
    queue_warn: int = 1000  # messages waiting in the relay's queue
    lag_warn_s: float = 30.0  # standby replay lag


@dataclass(frozen=True)
class TimeWindow:
    """How far back each part of the page looks."""

    outbreaks: timedelta = timedelta(hours=24)  # an outbreak is "current" if seen this recently
    timeline: timedelta = timedelta(hours=6)
    bucket: timedelta = timedelta(minutes=5)
    max_outbreaks: int = 100
    max_customers: int = 12  # domains listed per outbreak (the count covers all of them)
    # Towers stamp events with their own clocks: one running this far ahead of the GOC's still
    # shows its events at once; beyond it they wait (a broken clock, not an outbreak).
    clock_skew: timedelta = timedelta(minutes=2)
    thresholds: Thresholds = field(default_factory=Thresholds)


def _params(now: datetime, window: TimeWindow) -> dict[str, Any]:
    policy = pipeline.Policy()
    return {
        "now": now,
        "until": now + window.clock_skew,
        "since": now - window.outbreaks,
        "hour_ago": now - timedelta(hours=1),
        "two_hours_ago": now - timedelta(hours=2),
        "max_outbreaks": window.max_outbreaks,
        "max_customers": window.max_customers,
        "not_virus_engines": [
            pipeline.ENGINE_POLICY,
            pipeline.ENGINE_MIME,
            pipeline.ENGINE_CONTAINER,
        ],
        "heuristic_re": pipeline._AV_HEURISTIC.pattern,
        "skeptic": Skeptic.name,
        "virus_rules": sorted(policy.virus_rules),
    }


def db_now(conn: psycopg.Connection) -> datetime:
    """The database's clock: events are stamped by towers, staleness is judged by the GOC."""
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def outbreaks(conn: psycopg.Connection, now: datetime, window: TimeWindow) -> list[dict[str, Any]]:
    """Current outbreaks, busiest in the last hour first."""
    rows = conn.execute(OUTBREAKS, _params(now, window)).fetchall()
    out = []
    for (
        name,
        first_seen,
        first_engine,
        last_seen,
        detections,
        last_hour,
        previous_hour,
        towers,
        customers_count,
        customers,
        engines,
    ) in rows:
        out.append(
            {
                "name": name,
                "first_seen": first_seen.isoformat(),
                "first_engine": first_engine,
                "last_seen": last_seen.isoformat(),
                "detections": detections,
                "last_hour": last_hour,
                "previous_hour": previous_hour,
                "towers": list(towers),
                "customers_count": customers_count,
                "customers": list(customers),
                "engines": [
                    {"engine": e["engine"], "first_at": e["first_at"]}
                    for e in engines  # first_at is already ISO text (from jsonb)
                ],
                "new": (now - first_seen) <= timedelta(hours=1),
            }
        )
    return out


def timeline(conn: psycopg.Connection, now: datetime, window: TimeWindow) -> dict[str, Any]:
    """Virus detections per tower in fixed buckets (aligned to the epoch, so they do not slide)."""
    bucket_s = int(window.bucket.total_seconds())
    count = math.ceil(window.timeline.total_seconds() / bucket_s)
    last = math.floor(now.timestamp() / bucket_s) * bucket_s
    first = last - (count - 1) * bucket_s
    start = datetime.fromtimestamp(first, tz=now.tzinfo)
    rows = conn.execute(
        TIMELINE, {"bucket": window.bucket, "start": start, "until": now + window.clock_skew}
    ).fetchall()
    series: dict[str, list[int]] = {}
    for tower, bucket, n in rows:
        # A tower clock running (a little) fast: its events go in the current bucket.
        index = min((int(bucket) - first) // bucket_s, count - 1)
        if index >= 0:
            series.setdefault(tower, [0] * count)[index] += n
    return {"start": first, "bucket_s": bucket_s, "count": count, "towers": series}


def engines(conn: psycopg.Connection, now: datetime, window: TimeWindow) -> list[dict[str, Any]]:
    """Per engine: virus events it flagged in the window, in the last hour, and alone."""
    rows = conn.execute(ENGINES, _params(now, window)).fetchall()
    return [
        {"engine": engine, "catches": catches, "last_hour": last_hour, "alone": alone}
        for engine, catches, last_hour, alone in rows
    ]


def totals(conn: psycopg.Connection, now: datetime, window: TimeWindow) -> dict[str, int]:
    row = conn.execute(TOTALS, _params(now, window)).fetchone()
    assert row is not None
    return {"virus_window": row[0], "virus_last_hour": row[1]}


def towers(
    conn: psycopg.Connection, now: datetime, window: TimeWindow, seen: set[str]
) -> list[dict[str, Any]]:
    """Every tower's state; a tower seen only in events (never reported) is stale."""
    stale_after = window.thresholds.stale_after_s
    out: dict[str, dict[str, Any]] = {}
    rows = conn.execute(TOWERS, {"now": now}).fetchall()
    for tower, up, total, queue, lag, bundle, target, behind, clamav, updated_at, age_s in rows:
        out[tower] = {
            "tower": tower,
            "scanners_up": up,
            "scanners_total": total,
            "queue_size": queue,
            "replication_lag_s": lag,
            "rules_bundle": bundle,
            "rules_target": target,
            "scanners_behind": behind,
            "clamav": clamav,
            "updated_at": updated_at.isoformat(),
            "age_s": age_s,
            "stale": age_s > stale_after,
        }
    for tower in seen - out.keys():
        out[tower] = {
            "tower": tower,
            "scanners_up": None,
            "scanners_total": None,
            "queue_size": None,
            "replication_lag_s": None,
            "rules_bundle": None,
            "rules_target": None,
            "scanners_behind": 0,
            "clamav": None,
            "updated_at": None,
            "age_s": None,
            "stale": True,
        }
    return [out[name] for name in sorted(out)]


def snapshot(
    conn: psycopg.Connection, window: TimeWindow | None = None, now: datetime | None = None
) -> dict[str, Any]:
    """Everything the page shows, as one JSON-ready dict, read in one snapshot of the database."""
    window = window or TimeWindow()
    # REPEATABLE READ: every query sees the same events, so the parts of the page agree.
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        now = now or db_now(conn)
        found = outbreaks(conn, now, window)
        chart = timeline(conn, now, window)
        seen = set(chart["towers"]) | {t for o in found for t in o["towers"]}
        state = towers(conn, now, window, seen)
        for tower in state:
            chart["towers"].setdefault(tower["tower"], [0] * chart["count"])
        result = {
            "now": now.isoformat(),
            "window_s": window.outbreaks.total_seconds(),
            "thresholds": {
                "stale_after_s": window.thresholds.stale_after_s,
                "queue_warn": window.thresholds.queue_warn,
                "lag_warn_s": window.thresholds.lag_warn_s,
            },
            "totals": totals(conn, now, window),
            "outbreaks": found,
            "timeline": chart,
            "engines": engines(conn, now, window),
            "towers": state,
        }
    return result
