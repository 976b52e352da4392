"""Real pgBackRest against real PostgreSQL 15 clusters on this machine, with the configuration
the deploy writes (mailtower.controller.backup): a database host and a repository host, each
its own ``pgbackrest server`` with the backup CA's certificates, admitting only the other for
the stanza. A full backup, rows written in two batches, then a point-in-time restore into a
new data directory to a moment between them gives exactly the first batch; a restore to the
end of the archive gives both."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import missing
from pgclusters import _AS_POSTGRES, Cluster, _chown, free_port, make_workdir, wait_until

from mailtower import backup_metrics
from mailtower.controller import backup

pytestmark = pytest.mark.integration

STANZA = "lab-x"
PGBACKREST = shutil.which("pgbackrest")


def _run(*args: str, config: Path, timeout: float = 120) -> str:
    assert PGBACKREST is not None
    done = subprocess.run(
        [PGBACKREST, f"--config={config}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **_AS_POSTGRES,
    )
    assert done.returncode == 0, f"pgbackrest {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


class Side:
    """One host's pgBackRest files in a directory of its own (certificates, config, logs)."""

    def __init__(self, base: Path, pki: Path, name: str) -> None:
        self.dir = base / name
        self.tls = self.dir / "tls"
        self.tls.mkdir(parents=True)
        shutil.copy(pki / "ca.crt", self.tls / "ca.crt")
        shutil.copy(pki / f"{name}.crt", self.tls / "host.crt")
        shutil.copy(pki / f"{name}.key", self.tls / "host.key")
        for path in [self.dir, self.tls, *self.tls.iterdir()]:
            _chown(path)
        self.config = self.dir / "pgbackrest.conf"

    def write(self, sections: backup.Sections) -> None:
        for key in ("log-path", "lock-path"):
            (self.dir / key).mkdir(exist_ok=True)
            _chown(self.dir / key)
            sections["global"][key] = str(self.dir / key)
        self.config.write_text(backup.render(sections, "test"))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def server(side: Side, port: int) -> Iterator[None]:
    assert PGBACKREST is not None
    proc = subprocess.Popen(
        [PGBACKREST, f"--config={side.config}", "server"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **_AS_POSTGRES,
    )
    try:
        wait_until(lambda: _listening(port) or proc.poll() is not None, 15, "pgbackrest server")
        assert proc.poll() is None, f"pgbackrest server exited: {proc.stderr.read()!r}"  # type: ignore[union-attr]
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def test_pitr_restore_into_a_new_data_directory_has_exactly_the_rows_before_the_target() -> None:
    if PGBACKREST is None:
        missing("pgbackrest", module=False)
    work = make_workdir("mailtower-backup-")
    pki = work / "pki"
    backup.ensure_pki(pki, {"db": "127.0.0.1", "repo": "127.0.0.1", "stranger": "127.0.0.1"})
    db, repo, stranger = Side(work, pki, "db"), Side(work, pki, "repo"), Side(work, pki, "stranger")
    db_port, repo_port = free_port(), free_port()
    repo_path = work / "repository"
    repo_path.mkdir()
    _chown(repo_path)

    primary = Cluster.create("primary", work)
    restored: list[Cluster] = []
    try:
        pg = backup.PgHost(
            "db", "127.0.0.1", db_port, str(primary.data), primary.port, str(primary.base)
        )
        db.write(
            backup.db_sections(
                STANZA,
                pg,
                "repo",
                "127.0.0.1",
                repo_port,
                tls=str(db.tls),
                repo_path=str(repo_path),
            )
        )
        repo.write(
            backup.repo_sections(
                STANZA,
                [pg],
                "127.0.0.1",
                repo_port,
                repo_path=str(repo_path),
                retention_full=2,
                retention_diff=3,
                tls=str(repo.tls),
            )
        )
        command = f"{PGBACKREST} --config={db.config} --stanza={STANZA} archive-push %p"
        with primary.connect("postgres") as conn:
            conn.execute("ALTER SYSTEM SET archive_mode = on")
            conn.execute(f"ALTER SYSTEM SET archive_command = '{command}'")
        primary.stop()
        primary.start()
        with server(db, db_port), server(repo, repo_port):
            _run(f"--stanza={STANZA}", "stanza-create", config=repo.config)
            _run(f"--stanza={STANZA}", "check", config=repo.config)
            _run(f"--stanza={STANZA}", "--type=full", "backup", config=repo.config)
            status, sets = backup.parse_info(
                _run(f"--stanza={STANZA}", "--output=json", "info", config=db.config), STANZA
            )
            assert status == "ok" and [s.kind for s in sets] == ["full"]

            # A certificate of the same CA that the repository does not name is refused.
            pg_x = backup.PgHost("stranger", "127.0.0.1", free_port())
            stranger.write(
                backup.db_sections(
                    STANZA,
                    pg_x,
                    "repo",
                    "127.0.0.1",
                    repo_port,
                    tls=str(stranger.tls),
                    repo_path=str(repo_path),
                )
            )
            refused = subprocess.run(
                [PGBACKREST, f"--config={stranger.config}", f"--stanza={STANZA}", "info"],
                capture_output=True,
                text=True,
                timeout=60,
                **_AS_POSTGRES,
            )
            # (info exits 0 and reports the stanza's error)
            assert "access denied" in refused.stdout + refused.stderr, refused.stdout

            with primary.connect() as conn:
                conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
                conn.execute("INSERT INTO t SELECT generate_series(1, 5)")
            time.sleep(1.1)  # commit timestamps before and after the target, apart
            target = str(primary.scalar("SELECT clock_timestamp()::text"))
            time.sleep(1.1)
            with primary.connect() as conn:
                conn.execute("INSERT INTO t SELECT generate_series(6, 9)")
                conn.execute("SELECT pg_switch_wal()")
            # check: the current segment reaches the repository (archive-push works)
            _run(f"--stanza={STANZA}", "check", config=db.config)

            # The repository host's metrics (mailtower.backup_metrics) from what it holds now.
            info = _run("--output=json", "info", config=repo.config)
            if os.environ.get("CAPTURE_INFO"):
                Path(os.environ["CAPTURE_INFO"]).write_text(info)
            (found,) = backup_metrics.parse(info)
            pushed = backup_metrics.archived_times([found], str(repo_path))
            newest = max(p.stat().st_mtime for p in (repo_path / "archive").rglob("0*-*"))
            assert (found.name, found.status_code) == (STANZA, 0)
            assert found.counts["full"] == 1 and found.last_full == found.last_backup > 0
            assert pushed == {STANZA: newest} and time.time() - newest < 120

            def restore_to(name: str, target_time: str | None) -> Cluster:
                base = work / name
                base.mkdir()
                _chown(base)
                cluster = Cluster(name, base, extra_conf={"archive_mode": "off"})
                side = db  # the restored host: the database host's certificate
                conf = work / f"{name}.conf"
                sections = backup.db_sections(
                    STANZA,
                    backup.PgHost("db", "127.0.0.1", db_port, str(cluster.data)),
                    "repo",
                    "127.0.0.1",
                    repo_port,
                    tls=str(side.tls),
                    repo_path=str(repo_path),
                )
                for key in ("log-path", "lock-path"):
                    sections["global"][key] = str(side.dir / key)
                conf.write_text(backup.render(sections, "restore"))
                cmd = shlex.split(backup.restore_command(STANZA, target_time))
                assert cmd[0] == backup.BIN
                done = subprocess.run(
                    [PGBACKREST, f"--config={conf}", *cmd[1:]],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    **_AS_POSTGRES,
                )
                assert done.returncode == 0, done.stdout + done.stderr
                cluster.start()
                restored.append(cluster)
                wait_until(lambda: not cluster.in_recovery(), 120, f"{name} out of recovery")
                return cluster

            pitr = restore_to("pitr", target.replace("'", ""))
            assert pitr.scalar("SELECT array_agg(id ORDER BY id) FROM t") == [1, 2, 3, 4, 5]
            latest = restore_to("latest", None)
            assert latest.scalar("SELECT count(*) FROM t") == 9
    finally:
        for cluster in [*restored, primary]:
            cluster.destroy()
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)
