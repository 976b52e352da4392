"""PostgresSink against a real, private PostgreSQL with the verdict_events table."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from scand_fakes import free_port, make_settings, wait_until

from mailtower.scand.events import Event, EventSpool, Flusher, PostgresSink

pytestmark = pytest.mark.integration

PG_BIN = Path("/usr/local/bin")
TABLE = """
CREATE TABLE verdict_events (
  event_id uuid PRIMARY KEY, tower text NOT NULL, scanner text NOT NULL,
  scanned_at timestamptz NOT NULL, verdict text NOT NULL, message_id text,
  sender text, recipients text[] NOT NULL, findings jsonb NOT NULL DEFAULT '[]',
  quarantine_id text, size_bytes integer NOT NULL);
"""


# initdb and postgres refuse to run as root.
_AS_POSTGRES: dict[str, Any] = (
    {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
)


@pytest.fixture(scope="module")
def pg() -> Iterator[tuple[str, int]]:
    """A cluster on 127.0.0.3 (the settings' first SQL host); yields (superuser dsn, port)."""
    # Not under pytest's tmp dir: that is private to root, and postgres runs as its own user.
    base = Path(tempfile.mkdtemp(prefix="mailtower-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chmod(base, 0o755)
        shutil.chown(base, pw.pw_uid, pw.pw_gid)
    subprocess.run(
        [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
        **_AS_POSTGRES,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            str(PG_BIN / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.3",
            "-c",
            f"unix_socket_directories={base}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **_AS_POSTGRES,
    )
    admin = f"host=127.0.0.3 port={port} user=postgres dbname=postgres"

    def up() -> bool:
        try:
            psycopg.connect(admin, connect_timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False

    try:
        wait_until(up, 30, "PostgreSQL to accept connections")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE mailtower")
        with psycopg.connect(
            admin.replace("dbname=postgres", "dbname=mailtower"), autocommit=True
        ) as conn:
            conn.execute(TABLE)
            conn.execute("CREATE ROLE mailtower_scanner LOGIN PASSWORD 'ssssssssssssssss'")
            # ON CONFLICT (event_id) needs SELECT on the conflict column, not only INSERT.
            conn.execute("GRANT INSERT, SELECT (event_id) ON verdict_events TO mailtower_scanner")
        yield admin.replace("dbname=postgres", "dbname=mailtower"), port
    finally:
        proc.send_signal(signal.SIGINT)  # "fast" shutdown
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def test_flush_inserts_once_even_when_resent(pg: tuple[str, int], tmp_path: Path) -> None:
    admin, port = pg
    settings = make_settings(tmp_path, reinject_port=1, postgres_port=port)
    sink = PostgresSink(
        settings.sql_dsn("mailtower_scanner", settings.secrets.sql_scanner, writable=True)
    )
    spool = EventSpool(tmp_path / "events")
    event = Event(
        tower="tower-t",
        scanner="127.0.0.5",
        verdict="virus",
        sender="a@example.org",
        recipients=["b@example.com", "c@example.com"],
        size_bytes=1234,
        message_id="<x@y>",
        findings=[{"engine": "clamd", "name": "Mailtower.Test.EICAR", "part": None}],
        quarantine_id="20261126T190501Z-0123456789ab",
    )
    spool.add(event)
    sink([event])  # as if a previous flush committed, then crashed before deleting the file
    assert Flusher(spool, sink).flush_once() == 1
    sink.close()
    assert spool.count() == 0
    with psycopg.connect(admin) as conn:
        rows = conn.execute(
            "SELECT verdict, recipients, findings, quarantine_id, size_bytes "
            "FROM verdict_events WHERE event_id = %s",
            (event.event_id,),
        ).fetchall()
    assert rows == [
        (
            "virus",
            ["b@example.com", "c@example.com"],
            event.findings,
            "20261126T190501Z-0123456789ab",
            1234,
        )
    ]


def test_sql_down_keeps_the_spool(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, reinject_port=1)  # nothing listens on its SQL port
    sink = PostgresSink(settings.sql_dsn("mailtower_scanner", "x" * 16, writable=True))
    spool = EventSpool(tmp_path / "events")
    spool.add(
        Event(tower="t", scanner="s", verdict="clean", sender=None, recipients=[], size_bytes=1)
    )
    with pytest.raises(psycopg.OperationalError):
        Flusher(spool, sink).flush_once()
    assert spool.count() == 1
