"""pgBackRest backups of the tower's SQL pair (mailtower.controller.backup has the design).

The SQL hosts (``db_*``, from roles/sql.py): pgbackrest.conf naming the repository host,
WAL archiving in PostgreSQL's conf.d, their certificate, and Debian's ``pgbackrest`` service
(``pgbackrest server``, as postgres) for the repository host's backups.

The repository host (``repo_*``, from roles/monitor.py on the monitor, the default
``backup.repo_host``): user pgbackrest owning the repository, the same service running as
that user, the stanza and a first full backup when the repository has none, and the full and
differential backup timers.
"""

from __future__ import annotations

import json
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase
from pyinfra.operations import files, server, systemd

from mailtower.controller import backup
from mailtower.settings import Backup, TowerSettings
from roles import _common
from roles._common import put_text, settings

PACKAGES = ["pgbackrest"]
SERVICE = "pgbackrest"  # Debian's unit: `pgbackrest server`
ARCHIVE_CONF = "/etc/postgresql/15/main/conf.d/backup.conf"


def _backup() -> tuple[TowerSettings, Backup]:
    s = settings()
    assert s.backup is not None
    return s, s.backup


def is_repo_host() -> bool:
    s = settings()
    return s.backup is not None and _common.address(host) == str(s.backup_repo)


def _pg_hosts(s: TowerSettings) -> list[backup.PgHost]:
    assert s.backup is not None
    return [
        backup.PgHost(str(a), str(a), s.backup.port, port=s.ports.postgres) for a in s.hosts.sql
    ]


def _certificates(s: TowerSettings, b: Backup, user: str) -> list:
    """This host's certificate and key and the backup CA (made on the controller if missing)."""
    me = _common.address(host)
    directory = Path(b.tls_dir)
    backup.ensure_pki(directory, {str(a): str(a) for a in [*s.hosts.sql, s.backup_repo]})
    files.directory(name=f"Ensure {backup.TLS}", path=backup.TLS, mode="755")
    return [
        put_text((directory / "ca.crt").read_text(), f"{backup.TLS}/ca.crt"),
        put_text((directory / f"{me}.crt").read_text(), f"{backup.TLS}/host.crt"),
        put_text(
            (directory / f"{me}.key").read_text(),
            f"{backup.TLS}/host.key",
            mode="600",
            user=user,
            group=user,
        ),
    ]


def db_configure() -> list:
    s, b = _backup()
    me = _common.address(host)
    own = next(p for p in _pg_hosts(s) if p.address == me)
    conf = backup.db_sections(
        s.name,
        own,
        str(s.backup_repo),
        str(s.backup_repo),
        b.port,
        repo_path=b.repo_path,
        archive_timeout_s=b.archive_timeout_s,
        compress_type=b.compress_type,
    )
    ops = _certificates(s, b, "postgres")
    ops.append(
        put_text(
            backup.render(conf, "Managed by mailtower (roles/backup.py)."),
            backup.CONF,
            mode="640",
            user="postgres",
            group="postgres",
        )
    )
    return ops


def db_archive() -> list:
    """archive_mode/archive_command (PostgreSQL restarts on a change: archive_mode needs it)."""
    s, _ = _backup()
    return [put_text(backup.archive_settings(s.name), ARCHIVE_CONF)]


def db_activate(changed) -> None:
    _common.activate(SERVICE, changed)


def repo_configure() -> list:
    s, b = _backup()
    server.user(
        name="Ensure user pgbackrest (owns the backup repository)",
        user="pgbackrest",
        system=True,
        home=b.repo_path,
        shell="/usr/sbin/nologin",
        create_home=False,
    )
    for path in (b.repo_path, "/var/log/pgbackrest"):
        files.directory(
            name=f"Ensure {path}", path=path, user="pgbackrest", group="pgbackrest", mode="750"
        )
    conf = backup.repo_sections(
        s.name,
        _pg_hosts(s),
        str(s.backup_repo),
        b.port,
        repo_path=b.repo_path,
        retention_full=b.retention_full,
        retention_diff=b.retention_diff,
        compress_type=b.compress_type,
    )
    ops = _certificates(s, b, "pgbackrest")
    ops.append(
        put_text(
            backup.render(conf, "Managed by mailtower (roles/backup.py)."),
            backup.CONF,
            mode="640",
            user="pgbackrest",
            group="pgbackrest",
        )
    )
    files.directory(
        name="Ensure pgbackrest.service.d", path="/etc/systemd/system/pgbackrest.service.d"
    )
    ops.append(
        put_text(
            "# Managed by mailtower (roles/backup.py): the repository is not postgres's.\n"
            "[Service]\nUser=pgbackrest\nGroup=pgbackrest\n",
            "/etc/systemd/system/pgbackrest.service.d/mailtower.conf",
        )
    )
    timers = []
    for kind, calendar in (("full", b.full_calendar), ("diff", b.diff_calendar)):
        unit = f"pgbackrest-{kind}"
        timers.append(unit)
        ops.append(
            put_text(
                "# Managed by mailtower (roles/backup.py).\n[Unit]\n"
                f"Description=pgBackRest {kind} backup of {s.name}\nAfter=network-online.target\n"
                "\n[Service]\nType=oneshot\nUser=pgbackrest\nGroup=pgbackrest\n"
                f"ExecStart={backup.BIN} --stanza={s.name} --type={kind} backup\n",
                f"/etc/systemd/system/{unit}.service",
            )
        )
        ops.append(
            put_text(
                "# Managed by mailtower (roles/backup.py).\n[Unit]\n"
                f"Description=pgBackRest {kind} backup of {s.name}\n\n[Timer]\n"
                f"OnCalendar={calendar}\n# A backup missed while the host was off runs at boot.\n"
                "Persistent=true\nRandomizedDelaySec=10min\n\n[Install]\nWantedBy=timers.target\n",
                f"/etc/systemd/system/{unit}.timer",
            )
        )
    return ops


class StanzaBackups(FactBase):
    """How many backups the repository holds for the stanza (0: none, or no stanza yet)."""

    def command(self, stanza: str) -> str:
        return (
            f"cd /tmp && su pgbackrest -s /bin/sh -c '{backup.BIN} --stanza={stanza}"
            " --output=json info' 2>/dev/null || echo '[]'"
        )

    def process(self, output):
        # Asked with --stanza: the output holds that stanza alone.
        try:
            every = json.loads("\n".join(output) or "[]")
        except json.JSONDecodeError:
            return 0
        return sum(len(entry.get("backup", [])) for entry in every)


def repo_activate(changed) -> None:
    s, _ = _backup()
    _common.activate(SERVICE, changed, daemon_reload=True)
    for kind in ("full", "diff"):
        systemd.service(
            name=f"Ensure the {kind} backup timer runs",
            service=f"pgbackrest-{kind}.timer",
            running=True,
            enabled=True,
            daemon_reload=True,
            _if=changed,
        )
        systemd.service(
            name=f"Ensure pgbackrest-{kind}.timer is enabled",
            service=f"pgbackrest-{kind}.timer",
            running=True,
            enabled=True,
        )
    count = host.get_fact(StanzaBackups, stanza=s.name)
    server.shell(
        name=f"Create the stanza {s.name} and its first full backup (the repository has none)",
        commands=[
            f"cd /tmp && su pgbackrest -s /bin/sh -c"
            f" '{backup.BIN} --stanza={s.name} stanza-create'",
            f"cd /tmp && su pgbackrest -s /bin/sh -c"
            f" '{backup.BIN} --stanza={s.name} --type=full backup'",
        ],
        _if=lambda: not count,
    )
