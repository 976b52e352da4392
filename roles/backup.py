"""pgBackRest backups of a stanza: a tower's SQL pair, or the GOC (mailtower.controller.backup
has the design). One code path for both, parametrised by a ``Stanza``: its name, its
database hosts and its repository host.

The database hosts (``db_*``; roles/sql.py on a tower's SQL hosts, roles/goc.py at the GOC):
pgbackrest.conf naming the repository host, WAL archiving in PostgreSQL's conf.d, their
certificate, and Debian's ``pgbackrest`` service (``pgbackrest server``, as postgres) for the
repository host's backups.

The repository host (``repo_*``; roles/monitor.py on a tower's monitor, the default
``backup.repo_host``; roles/goc.py ``deploy_goc_repository`` on the GOC's, a host of the
inventory's goc_backup group): user pgbackrest owning the repository, the same service
running as that user, the stanza and a first full backup when the repository has none, the
full and differential backup timers, and the metrics timer (mailtower.backup_metrics: a
node-exporter textfile the backup alerts read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase
from pyinfra.api.exceptions import DeployError
from pyinfra.operations import files, server, systemd

from mailtower import backup_metrics
from mailtower.controller import backup
from mailtower.settings import Backup, GocSettings
from roles import _common
from roles._common import put_text, settings

PACKAGES = ["pgbackrest"]
SERVICE = "pgbackrest"  # Debian's unit: `pgbackrest server`
POSTGRES = "postgresql@15-main"
ARCHIVE_CONF = "/etc/postgresql/15/main/conf.d/backup.conf"
# archive_timeout, apart from archive_mode: a reload applies it (no restart of PostgreSQL).
SWITCH_CONF = "/etc/postgresql/15/main/conf.d/backup-switch.conf"
METRICS_SCRIPT = "/usr/local/lib/mailtower/backup-metrics"
METRICS_UNIT = "mailtower-backup-metrics"
# prometheus-node-exporter's textfile collector reads *.prom here (its Debian default).
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
HEADER = "Managed by mailtower (roles/backup.py)."


@dataclass(frozen=True)
class Stanza:
    """What the deploy needs to back up one stanza."""

    name: str  # the stanza: the tower's name, or "goc"
    backup: Backup
    pg_hosts: tuple[backup.PgHost, ...]  # the database hosts, primary first
    repo: str  # the repository host's address

    @property
    def hosts(self) -> list[str]:
        return [p.address for p in self.pg_hosts] + [self.repo]


def tower_stanza() -> Stanza:
    """The tower's SQL pair, backed up to ``backup.repo_host`` (default: its monitor)."""
    s = settings()
    assert s.backup is not None and s.backup_repo is not None
    hosts = tuple(
        backup.PgHost(str(a), str(a), s.backup.port, port=s.ports.postgres) for a in s.hosts.sql
    )
    return Stanza(s.name, s.backup, hosts, str(s.backup_repo))


GOC_STANZA = "goc"


def goc_stanza(g: GocSettings, goc_address: str) -> Stanza:
    """The GOC's PostgreSQL, backed up to ``g.backup.repo_host``."""
    assert g.backup is not None and g.backup.repo_host is not None
    pg = backup.PgHost(goc_address, goc_address, g.backup.port, port=g.port)
    return Stanza(GOC_STANZA, g.backup, (pg,), str(g.backup.repo_host))


def is_repo_host() -> bool:
    s = settings()
    return s.backup is not None and _common.address(host) == str(s.backup_repo)


def _certificates(st: Stanza, user: str) -> list:
    """This host's certificate and key and the backup CA (made on the controller if missing)."""
    me = _common.address(host)
    directory = Path(st.backup.tls_dir)
    backup.ensure_pki(directory, {a: a for a in st.hosts})
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


def db_configure(st: Stanza) -> list:
    b = st.backup
    me = _common.address(host)
    own = next(p for p in st.pg_hosts if p.address == me)
    conf = backup.db_sections(
        st.name,
        own,
        st.repo,
        st.repo,
        b.port,
        repo_path=b.repo_path,
        archive_timeout_s=b.archive_timeout_s,
        compress_type=b.compress_type,
    )
    ops = _certificates(st, "postgres")
    ops.append(
        put_text(
            backup.render(conf, HEADER),
            backup.CONF,
            mode="640",
            user="postgres",
            group="postgres",
        )
    )
    ops.append(put_text(backup.switch_settings(b.archive_switch_s), SWITCH_CONF))
    return ops


def db_archive(st: Stanza) -> list:
    """archive_mode/archive_command (PostgreSQL restarts on a change: archive_mode needs it)."""
    return [put_text(backup.archive_settings(st.name), ARCHIVE_CONF)]


def db_activate(changed) -> None:
    _common.activate(SERVICE, changed)
    # archive_timeout (SWITCH_CONF) needs a reload only; nothing when PostgreSQL is not running
    # yet (its first start reads it).
    server.shell(
        name="Reload PostgreSQL (archive_timeout)",
        commands=[f"systemctl try-reload-or-restart {POSTGRES}"],
        _if=changed,
    )


def repo_configure(st: Stanza) -> list:
    b = st.backup
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
        st.name,
        list(st.pg_hosts),
        st.repo,
        b.port,
        repo_path=b.repo_path,
        retention_full=b.retention_full,
        retention_diff=b.retention_diff,
        compress_type=b.compress_type,
    )
    ops = _certificates(st, "pgbackrest")
    ops.append(
        put_text(
            backup.render(conf, HEADER),
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
    for kind, calendar in (("full", b.full_calendar), ("diff", b.diff_calendar)):
        unit = f"pgbackrest-{kind}"
        ops.append(
            put_text(
                f"# {HEADER}\n[Unit]\n"
                f"Description=pgBackRest {kind} backup of {st.name}\nAfter=network-online.target\n"
                "\n[Service]\nType=oneshot\nUser=pgbackrest\nGroup=pgbackrest\n"
                f"ExecStart={backup.BIN} --stanza={st.name} --type={kind} backup\n",
                f"/etc/systemd/system/{unit}.service",
            )
        )
        ops.append(
            put_text(
                f"# {HEADER}\n[Unit]\n"
                f"Description=pgBackRest {kind} backup of {st.name}\n\n[Timer]\n"
                f"OnCalendar={calendar}\n# A backup missed while the host was off runs at boot.\n"
                "Persistent=true\nRandomizedDelaySec=10min\n\n[Install]\nWantedBy=timers.target\n",
                f"/etc/systemd/system/{unit}.timer",
            )
        )
    ops += _metrics_files(st)
    return ops


def _metrics_files(st: Stanza) -> list:
    """The metrics timer: ``pgbackrest info`` as user pgbackrest, rendered by the stdlib-only
    module mailtower.backup_metrics (uploaded as a script: a repository host may have no
    mailtower venv), then moved into node-exporter's textfile directory as root."""
    files.directory(name="Ensure /usr/local/lib/mailtower", path="/usr/local/lib/mailtower")
    out = f"/run/{METRICS_UNIT}/pgbackrest.prom"
    dest = f"{TEXTFILE_DIR}/mailtower-backup.prom"
    return [
        put_text(Path(backup_metrics.__file__).read_text(), METRICS_SCRIPT, mode="755"),
        put_text(
            f"# {HEADER}\n[Unit]\nDescription=Backup metrics of {st.name} for node-exporter\n"
            "\n[Service]\nType=oneshot\nUser=pgbackrest\nGroup=pgbackrest\n"
            f"RuntimeDirectory={METRICS_UNIT}\n"
            f"ExecStart=/usr/bin/python3 {METRICS_SCRIPT} --repo-path {st.backup.repo_path}"
            # A quiet database is made to archive (`pgbackrest check`) well before the alert.
            f" --probe-after {st.backup.alert_archive_stall_s // 2} --output {out}\n"
            "# As root (+): the textfile directory is node-exporter's; a rename, so it never\n"
            "# reads half a file.\n"
            f"ExecStartPost=+/bin/sh -c 'install -d -m 755 {TEXTFILE_DIR}"
            f" && install -m 644 {out} {dest}.tmp && mv {dest}.tmp {dest}'\n",
            f"/etc/systemd/system/{METRICS_UNIT}.service",
        ),
        put_text(
            f"# {HEADER}\n[Unit]\nDescription=Backup metrics of {st.name} for node-exporter\n"
            "\n[Timer]\nOnActiveSec=10s\nOnUnitActiveSec=5min\n\n[Install]\n"
            "WantedBy=timers.target\n",
            f"/etc/systemd/system/{METRICS_UNIT}.timer",
        ),
    ]


# StanzaBackups's outputs besides pgbackrest's JSON.
NO_REPOSITORY = "MAILTOWER-NO-REPOSITORY-YET"
INFO_FAILED = "MAILTOWER-PGBACKREST-INFO-FAILED"
# `pgbackrest info` status codes that mean "no backup yet" (the stanza and a full backup are
# due): 1 missing stanza path, 2 no valid backups, 3 missing stanza data.
_NONE_YET = {1, 2, 3}


class StanzaBackups(FactBase):
    """How many backups the repository holds for the stanza: 0 when it holds none or is not
    set up yet (no user pgbackrest: the first deploy, which sets it up); None when
    ``pgbackrest info`` fails or reports an error (unreadable repository, a mismatch...): then
    nothing can say a first backup is due, and none is made."""

    def command(self, stanza: str) -> str:
        return (
            f"if ! id -u pgbackrest >/dev/null 2>&1; then echo {NO_REPOSITORY}; else"
            f" cd /tmp && su pgbackrest -s /bin/sh -c '{backup.BIN} --stanza={stanza}"
            f" --output=json info' 2>/dev/null || echo {INFO_FAILED}; fi"
        )

    def process(self, output):
        text = "\n".join(output).strip()
        if text == NO_REPOSITORY:
            return 0
        try:
            every = json.loads(text)
        except json.JSONDecodeError:
            return None  # INFO_FAILED, or output that is not pgBackRest's
        # Asked with --stanza: the output holds that stanza alone.
        if not isinstance(every, list) or len(every) != 1:
            return None
        count = len(every[0].get("backup", []))
        code = every[0].get("status", {}).get("code")
        if code == 0 or (code in _NONE_YET and count == 0):
            return count
        return None


def check_backups(st: Stanza, count: int | None) -> bool:
    """Whether the stanza's first full backup is due (the repository holds none); a count
    the repository host could not give fails the deploy: making a full backup on every
    deploy that meets a blip would be wrong, and so would skipping silently a stanza that
    may never have been backed up."""
    if count is None:
        raise DeployError(
            f"{st.repo}: `pgbackrest --stanza={st.name} info` (as user pgbackrest) failed or"
            " reported an error, so the deploy cannot tell whether the first full backup is"
            f" due. Run `sudo -u pgbackrest pgbackrest --stanza={st.name} info` on {st.repo}"
            " and fix what it says (the repository's path and owner, disk space, the stanza"
            " matching the database), then deploy again"
        )
    return count == 0


def repo_activate(st: Stanza, changed, *, first_backup: bool = True) -> None:
    """The server, the backup and metrics timers; then (``first_backup``) the stanza and its
    first full backup, when the database hosts already archive (else: ``repo_first_backup``
    after a barrier)."""
    _common.activate(SERVICE, changed, daemon_reload=True)
    for unit in ("pgbackrest-full.timer", "pgbackrest-diff.timer", f"{METRICS_UNIT}.timer"):
        systemd.service(
            name=f"Restart {unit}",
            service=unit,
            running=True,
            enabled=True,
            restarted=True,
            daemon_reload=True,
            _if=changed,
        )
        systemd.service(name=f"Ensure {unit} is enabled", service=unit, running=True, enabled=True)
    if first_backup:
        repo_first_backup(st)


def repo_first_backup(st: Stanza) -> None:
    due = check_backups(st, host.get_fact(StanzaBackups, stanza=st.name))
    server.shell(
        name=f"Create the stanza {st.name} and its first full backup (the repository has none)",
        commands=[
            f"cd /tmp && su pgbackrest -s /bin/sh -c"
            f" '{backup.BIN} --stanza={st.name} stanza-create'",
            f"cd /tmp && su pgbackrest -s /bin/sh -c"
            f" '{backup.BIN} --stanza={st.name} --type=full backup'",
        ],
        _if=lambda: due,
    )
