"""VirusEye's test hub: a throwaway PostgreSQL with the tower's verdict_events and the eye's
objects, helpers that write events the way a tower's scanners do, and ``serve_eye``: the real
``mailtower-eye serve`` over HTTPS with the certificate the GOC deploy would make."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from scand_fakes import free_port, wait_until

from mailtower.goc.eye.status import apply_schema
from roles.goc import self_signed_commands

ROOT = Path(__file__).resolve().parents[2]
TOWER_SCHEMA = ROOT / "templates/sql/etc/mailtower/sql/schema.sql.j2"
# Roles the tower schema grants to; they only need to exist here.
TOWER_ROLES = ("mailtower_relay", "mailtower_scanner", "mailtower_monitor")


@contextmanager
def goc_hub(name: str = "goc") -> Iterator[Any]:
    """A started cluster (tests/pgclusters.py) whose ``mailtower`` database has the schema."""
    import pgclusters  # tests/ is on sys.path (rootdir conftest)

    workdir = pgclusters.make_workdir("mailtower-eye-")
    cluster = pgclusters.Cluster.create(name, workdir)
    try:
        with cluster.connect() as conn:
            for role in TOWER_ROLES:
                conn.execute(f"CREATE ROLE {role}")
            conn.execute(TOWER_SCHEMA.read_text())
            apply_schema(conn)
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


# The package as this checkout has it (not a console script an older install may have left).
EYE = [sys.executable, "-m", "mailtower.goc.eye"]


@dataclass(frozen=True)
class ServedEye:
    """A running ``mailtower-eye serve``: its HTTPS base URL and the certificate it serves."""

    url: str
    cert: Path
    log: Path

    def trusted(self) -> ssl.SSLContext:
        """A client context that trusts this server's certificate and nothing else."""
        return ssl.create_default_context(cafile=str(self.cert))

    def status(self, path: str) -> tuple[int, str]:
        """(status, Location) of a GET over verified HTTPS, redirects not followed."""

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self.trusted()), NoRedirect
        )
        try:
            with opener.open(self.url + path, timeout=5) as response:
                return int(response.status), ""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Location", "")


def make_certificate(directory: Path, names: list[str]) -> tuple[Path, Path]:
    """(cert, key) made by the GOC deploy's own commands (openssl), the key 0600."""
    cert, key = directory / "tls.crt", directory / "tls.key"
    for command in self_signed_commands(names, str(cert), str(key)):
        subprocess.run(command, shell=True, check=True, capture_output=True)
    return cert, key


@contextmanager
def serve_eye(dsn: str, operator: str, password: str, *extra: str) -> Iterator[ServedEye]:
    """``mailtower-eye serve`` on 127.0.0.1 over HTTPS, as the GOC deploy runs it, with one
    operator; stopped (and its files removed) on exit."""
    etc = Path(tempfile.mkdtemp(prefix="mailtower-eye-etc-"))
    cert, key = make_certificate(etc, ["localhost", "127.0.0.1"])
    credentials = etc / "operators"
    subprocess.run(
        [*EYE, "operator", "add", operator, "--credentials", str(credentials)],
        input=password + "\n",
        text=True,
        check=True,
        capture_output=True,
    )
    port = free_port()
    # The deploy's arguments (templates/goc/etc/systemd/system/mailtower-eye.service.j2).
    argv = [*EYE, "serve", "--dsn", dsn, "--listen", f"127.0.0.1:{port}"]
    argv += ["--credentials", str(credentials), "--secret-file", str(etc / "session.key")]
    argv += ["--tls-cert", str(cert), "--tls-key", str(key), *extra]
    eye = ServedEye(f"https://127.0.0.1:{port}", cert, etc / "eye.log")
    with eye.log.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

        def healthy() -> bool:
            assert proc.poll() is None, eye.log.read_text()
            try:
                return eye.status("/healthz")[0] == 200
            except OSError:
                return False

        try:
            wait_until(healthy, 20, "mailtower-eye to answer /healthz over HTTPS")
            yield eye
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            shutil.rmtree(etc, ignore_errors=True)


def finding(engine: str, name: str, part: str | None = "message") -> dict[str, Any]:
    return {"engine": engine, "name": name, "part": part}


def add_event(
    conn: psycopg.Connection[Any],
    *,
    tower: str,
    at: datetime,
    findings: list[dict[str, Any]],
    recipients: list[str],
    verdict: str = "virus",
) -> str:
    """Insert one verdict event as a scanner would; returns its event_id."""
    event_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO verdict_events (event_id, tower, scanner, scanned_at, verdict, message_id,"
        " sender, recipients, findings, quarantine_id, size_bytes)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            event_id,
            tower,
            "10.201.1.101",
            at,
            verdict,
            f"<{event_id}@sender.example>",
            "someone@sender.example",
            recipients,
            Jsonb(findings),
            None if verdict == "clean" else f"q-{event_id[:12]}",
            2048,
        ),
    )
    return event_id
