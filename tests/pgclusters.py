"""Throwaway PostgreSQL 15 clusters on this machine, for the sync tests and the sync benchmark.

Each cluster lives in a temporary directory (data, unix socket, log), listens on 127.0.0.1 and
a free TCP port, and runs as the ``postgres`` user when the caller is root (initdb and postgres
refuse to run as root). The superuser ``postgres`` is trusted on the unix socket and on
127.0.0.1; every other role needs its SCRAM password over TCP, so subscriptions prove their
credentials. ``initdb`` runs once per process: later clusters copy that template.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")

# Logical replication on every cluster (the GOC and the towers publish and subscribe).
BASE_CONF = """
listen_addresses = '127.0.0.1'
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
max_worker_processes = 16
max_logical_replication_workers = 8
hot_standby = on
logging_collector = off
log_min_messages = info
log_line_prefix = '%m [%p] %b '
"""

HBA = """
local   all          all                         trust
host    all          postgres      127.0.0.1/32  trust
host    replication  postgres      127.0.0.1/32  trust
host    all          all           127.0.0.1/32  scram-sha-256
"""

_AS_POSTGRES: dict[str, Any] = (
    {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
)
_template: Path | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, **_AS_POSTGRES)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        shutil.chown(path, pw.pw_uid, pw.pw_gid)


def make_workdir(prefix: str = "mailtower-sync-") -> Path:
    """A directory the postgres user may write (not pytest's tmp dir: it is private to root)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    _chown(base)
    return base


def _template_dir() -> Path:
    global _template
    if _template is None:
        base = make_workdir("mailtower-pgtemplate-")
        data = base / "data"
        _run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-N"])
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(BASE_CONF)
        (data / "pg_hba.conf").write_text(HBA)
        _template = data
        atexit.register(shutil.rmtree, base, True)
    return _template


@dataclass
class Cluster:
    """One PostgreSQL server: ``name`` for messages, its directory and its port."""

    name: str
    base: Path
    port: int = field(default_factory=free_port)
    extra_conf: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, workdir: Path, **conf: str) -> Cluster:
        """A new primary with an empty ``mailtower`` database, started."""
        base = workdir / name
        base.mkdir()
        _chown(base)
        cluster = cls(name, base, extra_conf=dict(conf))
        _run(["cp", "-a", str(_template_dir()), str(cluster.data)])
        cluster.start()
        with cluster.connect("postgres") as conn:
            conn.execute("CREATE DATABASE mailtower")
        return cluster

    def standby(self, name: str, workdir: Path) -> Cluster:
        """A hot standby of this cluster, cloned with pg_basebackup and streaming from it."""
        base = workdir / name
        base.mkdir()
        _chown(base)
        standby = Cluster(name, base, extra_conf=dict(self.extra_conf))
        slot = name.replace("-", "_")
        _run(
            [
                str(PG_BIN / "pg_basebackup"),
                *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"),
                *("-D", str(standby.data), "-R", "-X", "stream", "-c", "fast", "-C", "-S", slot),
            ]
        )
        standby.start()
        return standby

    def start(self) -> None:
        opts = [f"-c port={self.port}", f"-c unix_socket_directories={self.base}"]
        opts += [f"-c {k}={v}" for k, v in self.extra_conf.items()]
        _run(
            [
                str(PG_BIN / "pg_ctl"),
                *("-D", str(self.data), "-l", str(self.log), "-w", "-t", "60"),
                *("-o", " ".join(opts), "start"),
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed, without a shutdown checkpoint)."""
        _run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def promote(self) -> None:
        _run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "promote"])

    def pids(self) -> list[int]:
        """The postmaster and every process it started."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return []
        pids = [postmaster]
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.append(int(proc.name))
        return pids

    def freeze(self) -> None:
        """SIGSTOP every process: a hung host whose TCP connections stay open."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL every process (the host is gone); the data directory stays."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in pids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: processes survive SIGKILL")
            time.sleep(0.02)

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except RuntimeError:
                self.kill()

    # -- connections ------------------------------------------------------------------------

    def dsn(self, dbname: str = "mailtower") -> str:
        """Superuser DSN over the unix socket."""
        return f"host={self.base} port={self.port} user=postgres dbname={dbname}"

    def conninfo(self, user: str, password: str, dbname: str = "mailtower") -> str:
        """TCP conninfo for another role, as a subscription would store it."""
        return (
            f"host=127.0.0.1 port={self.port} dbname={dbname} user={user} "
            f"password={password} connect_timeout=5"
        )

    def connect(self, dbname: str = "mailtower") -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname), autocommit=True)

    def scalar(self, query: str, *params: Any) -> Any:
        with self.connect() as conn:
            row = conn.execute(query, params or None).fetchone()
        return None if row is None else row[0]

    def in_recovery(self) -> bool:
        return bool(self.scalar("SELECT pg_is_in_recovery()"))

    def current_lsn(self) -> str:
        """Where WAL is being inserted: includes asynchronous commits (subscription workers
        commit with synchronous_commit = off) that pg_current_wal_lsn() may not show yet."""
        return str(self.scalar("SELECT pg_current_wal_insert_lsn()"))

    def replayed(self, lsn: str) -> bool:
        """True once this standby has replayed the WAL up to ``lsn``."""
        return bool(self.scalar("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", lsn))

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
