"""Backups of a tower's SQL pair with pgBackRest, and the restore command.

What the deploy sets up (roles/sql.py on both SQL hosts, roles/monitor.py on the repository
host, by default the tower's monitor):

- PostgreSQL archives every WAL segment (``archive_command = pgbackrest archive-push``) on
  both hosts: a standby does not archive while it replays (``archive_mode = on``), and starts
  as soon as it is promoted, so a failover keeps archiving with no step of its own. The
  repository host's configuration names both hosts (``pg1``, ``pg2``); ``pgbackrest backup``
  finds whichever is the primary.
- Transport: pgBackRest's TLS server (``pgbackrest server``) on every host of the stanza,
  with client certificates from a backup CA the controller makes (``ensure_pki``). Each
  server admits only the certificates it names, for this stanza only (``tls-server-auth``):
  the repository host admits the two SQL hosts, they admit the repository host. Unlike the
  SSH set-up (the repository's user and postgres each logging in to the other) no host gets a
  shell on another.
- A full backup at the first deploy (``stanza-create``, then ``backup --type=full`` when the
  repository has none); afterwards systemd timers on the repository host (full weekly, diff
  daily by default, ``Backup`` in settings.py), with the retention pgBackRest applies after
  each backup (``repo1-retention-full``, ``repo1-retention-diff``).

The restore (``invoke sql.restore --tower T --host H [--target-time TIME]``):

1. checks the repository has a backup to restore (``pgbackrest info`` from the host);
2. fences every other SQL host of the tower (``fence``): reached over SSH, its PostgreSQL
   disabled, stopped and masked, so neither a reboot nor a deploy starts it as a second
   primary (writers try the SQL hosts in the inventory's order); one SSH cannot reach is
   refused unless the operator fenced it and says so (``--fenced HOST``);
3. empties the host's data directory and runs ``pgbackrest restore`` there: to the end of the
   archive, or with ``--target-time`` to that moment (``--type=time --target-action=promote``);
4. starts PostgreSQL and waits until it leaves recovery and takes writes;
5. re-points the sync exactly as a failover does (``sqlpair.resync``): ``mailtower sync tower``
   on the restored host (its restored ``mt_config_<tower>`` subscription is re-made at a
   consistent point of the GOC), then ``mailtower sync goc`` at the GOC (the events
   subscription follows the restored primary's new timeline; its slot there is new, since a
   backup holds no replication slot, and the events the GOC lacks are copied by id, none
   twice). Events that reached the GOC after the target time stay at the GOC: the GOC keeps
   what it got, the tower restarts from its restored point.

The other SQL host stays fenced; after the restored host is listed first in the inventory's
sql group, ``invoke sql.rebuild --tower T --host OTHER`` unmasks it and makes it a standby of
the restored one (a fresh clone, its physical slot re-made)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shlex
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from mailtower.controller.errors import PairError
from mailtower.controller.sqlpair import (
    DATA,
    SERVICE,
    UNFENCE,
    Remote,
    Say,
    SqlTower,
    resync,
    role_of,
)

CONF = "/etc/pgbackrest/pgbackrest.conf"
TLS = "/etc/pgbackrest/tls"  # ca.crt, host.crt, host.key (the key readable by its user only)
SOCKET = "/var/run/postgresql"
BIN = "/usr/bin/pgbackrest"

Sections = dict[str, dict[str, str | list[str]]]


# --- The configuration files -----------------------------------------------------------------


@dataclass(frozen=True)
class PgHost:
    """A PostgreSQL host of the stanza, as the repository host reaches it."""

    name: str  # its certificate's CN (the deploy: its address)
    address: str
    tls_port: int
    data: str = DATA
    port: int = 5432
    socket: str = SOCKET


def _tls_server(port: int, address: str, tls: str, clients: Mapping[str, str]) -> dict:
    return {
        "tls-server-address": address,
        "tls-server-port": str(port),
        "tls-server-ca-file": f"{tls}/ca.crt",
        "tls-server-cert-file": f"{tls}/host.crt",
        "tls-server-key-file": f"{tls}/host.key",
        # One line per client certificate's CN, each for this stanza only.
        "tls-server-auth": [f"{cn}={stanza}" for cn, stanza in sorted(clients.items())],
    }


def db_sections(
    stanza: str,
    own: PgHost,
    repo_name: str,
    repo_address: str,
    repo_port: int,
    *,
    repo_path: str = "/var/lib/pgbackrest",
    tls: str = TLS,
    archive_timeout_s: int = 60,
    compress_type: str = "zst",
) -> Sections:
    """``/etc/pgbackrest/pgbackrest.conf`` on a SQL host: its own cluster (pg1) and the
    repository host it pushes WAL to and restores from."""
    return {
        "global": {
            "repo1-host": repo_address,
            "repo1-host-type": "tls",
            "repo1-host-port": str(repo_port),
            "repo1-host-ca-file": f"{tls}/ca.crt",
            "repo1-host-cert-file": f"{tls}/host.crt",
            "repo1-host-key-file": f"{tls}/host.key",
            # The client sends its repository options to the repository's server: the path
            # must be the repository host's.
            "repo1-path": repo_path,
            "archive-timeout": str(archive_timeout_s),
            # Compression runs here, on the database host, not on the repository host.
            "compress-type": compress_type,
            "log-level-file": "detail",
            **_tls_server(own.tls_port, own.address, tls, {repo_name: stanza}),
        },
        stanza: {
            "pg1-path": own.data,
            "pg1-port": str(own.port),
            "pg1-socket-path": own.socket,
        },
    }


def repo_sections(
    stanza: str,
    pg_hosts: list[PgHost],
    own_address: str,
    own_port: int,
    *,
    repo_path: str,
    retention_full: int,
    retention_diff: int,
    tls: str = TLS,
    compress_type: str = "zst",
) -> Sections:
    """``/etc/pgbackrest/pgbackrest.conf`` on the repository host: the repository, and every
    host of the stanza (a backup finds the primary among them; after a failover it is pg2)."""
    section: dict[str, str | list[str]] = {}
    for i, pg in enumerate(pg_hosts, start=1):
        section |= {
            f"pg{i}-host": pg.address,
            f"pg{i}-host-type": "tls",
            f"pg{i}-host-port": str(pg.tls_port),
            f"pg{i}-host-ca-file": f"{tls}/ca.crt",
            f"pg{i}-host-cert-file": f"{tls}/host.crt",
            f"pg{i}-host-key-file": f"{tls}/host.key",
            f"pg{i}-path": pg.data,
            f"pg{i}-port": str(pg.port),
            f"pg{i}-socket-path": pg.socket,
        }
    return {
        "global": {
            "repo1-path": repo_path,
            "repo1-retention-full": str(retention_full),
            "repo1-retention-diff": str(retention_diff),
            # A backup starts with an immediate checkpoint instead of waiting for the next one.
            "start-fast": "y",
            "compress-type": compress_type,
            "log-level-file": "detail",
            **_tls_server(own_port, own_address, tls, {pg.name: stanza for pg in pg_hosts}),
        },
        stanza: section,
    }


def render(sections: Sections, header: str) -> str:
    lines = [f"# {header}"]
    for name, options in sections.items():
        lines += ["", f"[{name}]"]
        for key, value in options.items():
            for one in [value] if isinstance(value, str) else value:
                lines.append(f"{key}={one}")
    return "\n".join(lines) + "\n"


def archive_settings(stanza: str) -> str:
    """The postgresql.conf lines that archive WAL to the stanza (primary and standby alike)."""
    return (
        "# Continuous archiving to the pgBackRest repository (docs/runbook.md, Backups).\n"
        "# on, not always: a standby archives from the moment it is promoted.\n"
        "archive_mode = on\n"
        f"archive_command = '{BIN} --stanza={stanza} archive-push %p'\n"
    )


def switch_settings(switch_s: int) -> str:
    """The postgresql.conf line that archives a written-to segment after ``switch_s`` at the
    latest (0: PostgreSQL's default, only full segments)."""
    return (
        "# A segment with writes is archived after this at the latest (docs/runbook.md).\n"
        f"archive_timeout = {switch_s}s\n"
    )


# --- The backup CA ---------------------------------------------------------------------------


def _private_dir(directory: Path) -> None:
    """``directory`` for the CA's and the hosts' keys: made 0700 when missing; an existing one
    with any group or other permission is refused (its keys may have been read)."""
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        directory.chmod(0o700)  # mkdir's mode is masked by the umask: exact, not merely less
        return
    mode = directory.stat().st_mode & 0o777
    if mode & 0o077:
        raise PairError(
            f"{directory}: mode {mode:03o} lets others in, and it holds the backup CA's and the"
            f" hosts' private keys; `chmod 700 {directory}` (and make new keys if others may"
            " have read them: move the directory away and deploy again)"
        )


def ensure_pki(directory: Path, hosts: Mapping[str, str], days: int = 3650) -> None:
    """Make the backup CA (``ca.crt``, ``ca.key``) and a certificate for each host (``name``:
    CN, and its address as DNS and IP subject alternative names: pgBackRest matches the host
    it connects to against the DNS names) in ``directory``, where missing. Existing files are
    kept: an operator may put certificates of their own CA there."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    _private_dir(directory)
    now = dt.datetime.now(dt.UTC)

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        # Mode 0600 from the start (never readable by others for a moment, whatever the
        # umask); O_EXCL: a key is only ever made where none is.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )

    ca_crt, ca_key = directory / "ca.crt", directory / "ca.key"
    if not (ca_crt.exists() and ca_key.exists()):
        key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailtower backup CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        write_key(ca_key, key)
        ca_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    loaded = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise PairError(f"{ca_key}: the backup CA key must be an EC key; remove it to make anew")
    for name, address in hosts.items():
        crt, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        if crt.exists() and key_path.exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())

        alt: list[x509.GeneralName] = [x509.DNSName(address)]
        with contextlib.suppress(ValueError):
            alt.append(x509.IPAddress(ip_address(address)))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            # Each host is a server (its `pgbackrest server`) and a client of the others.
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(loaded, hashes.SHA256())
        )
        write_key(key_path, key)
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# --- Reading the repository ------------------------------------------------------------------


@dataclass(frozen=True)
class BackupSet:
    label: str
    kind: str  # full, diff, incr
    stop: int  # epoch seconds the backup ended


def parse_info(text: str, stanza: str) -> tuple[str, list[BackupSet]]:
    """``pgbackrest info --output=json``: the stanza's status message and its backups."""
    try:
        every = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise PairError(f"pgbackrest info: not JSON ({exc}): {text[:200]!r}") from exc
    for entry in every:
        if entry.get("name") == stanza:
            status = entry.get("status", {}).get("message", "")
            sets = [
                BackupSet(b["label"], b["type"], int(b["timestamp"]["stop"]))
                for b in entry.get("backup", [])
            ]
            return status, sets
    return "missing stanza", []


_TARGET = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d(\.\d+)?)?([+-]\d\d(:?\d\d)?|Z| UTC)?$")


def restore_command(stanza: str, target_time: str | None) -> str:
    """The restore, run as postgres on the host being restored (its data directory empty)."""
    args = [BIN, f"--stanza={stanza}"]
    if target_time is not None:
        if not _TARGET.match(target_time):
            raise PairError(
                f"--target-time {target_time!r}: give a PostgreSQL timestamp with its zone,"
                " e.g. '2026-12-07 13:05:00+00'"
            )
        # Replay up to the moment, then take writes (not pause: nobody would resume it).
        args += ["--type=time", f"--target={target_time}", "--target-action=promote"]
    args.append("restore")
    return " ".join(shlex.quote(a) for a in args)


def as_postgres(command: str) -> str:
    return f"cd /tmp && su postgres -c {shlex.quote(command)}"


def restore(
    tower: SqlTower,
    address: str,
    say: Say,
    *,
    target_time: str | None = None,
    fenced: Collection[str] = (),
    wait_s: float = 600,
) -> dict[str, float]:
    """Restore the tower's SQL from its pgBackRest repository onto ``address`` (one of its SQL
    hosts), make it the primary and re-point the GOC sync. ``fenced``: the other SQL hosts the
    operator has fenced themselves (unreachable over SSH, and powered off or cut off: see
    ``fence``). Returns each step's seconds."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    target = next((r for r in tower.sql if r.address == address), None)
    if target is None:
        raise PairError(
            f"{tower.name}: {address} is not one of its SQL hosts; put the new host in the"
            " inventory's sql group and deploy it first (it needs pgBackRest and its certificate)"
        )
    stanza = tower.name
    info = target.run(as_postgres(f"{BIN} --stanza={stanza} --output=json info"), check=False)
    status, sets = parse_info(info, stanza)
    if not sets:
        raise PairError(
            f"{address}: pgbackrest info --stanza={stanza} finds no backup ({status or info!r});"
            " check the repository host (`pgbackrest info` as user pgbackrest there) and that"
            f" {address}'s pgBackRest reaches it"
        )
    if target_time is not None:
        restore_command(stanza, target_time)  # refuse a malformed time before any stop
    say(
        f"{tower.name}: {len(sets)} backup(s), newest {sets[-1].label}; restoring onto {address}"
        + (f" to {target_time}" if target_time else " to the end of the WAL archive")
    )
    fence(tower, target, fenced, say)
    if role_of(target) != "down":
        say(f"{tower.name}: stopping PostgreSQL on {address} (its data is replaced)")
        target.run(f"systemctl stop {SERVICE}")
        if role_of(target) != "down":
            raise PairError(f"{address}: PostgreSQL still answers after the stop; stop it")
    timings["fenced_s"] = time.monotonic() - started
    for command in (
        f"rm -rf {DATA}",
        f"install -d -o postgres -g postgres -m 700 {DATA}",
        as_postgres(restore_command(stanza, target_time)),
    ):
        target.run(command, timeout=wait_s)
    timings["restored_s"] = time.monotonic() - started
    # (a host fenced by an earlier restore is masked: this one is the primary now)
    target.run(f"{UNFENCE} && systemctl start {SERVICE}", timeout=wait_s)
    _wait_primary(target, wait_s)
    timings["primary_s"] = time.monotonic() - started
    say(f"{tower.name}: {address} takes writes ({timings['primary_s']:.1f} s)")
    tower.renew_relay_maps(say)
    resync(tower, target, say, timings, started)
    others = [r.address for r in tower.sql if r is not target]
    say(
        f"{tower.name}: restored onto {address} ({time.monotonic() - started:.1f} s in all)."
        f" Next: list {address} first in the inventory's sql group (writers try the SQL hosts"
        " in its order; a deploy makes its first host the primary), then"
        + "".join(f" invoke sql.rebuild --tower {tower.name} --host {o};" for o in others)
        + " until then the other hosts stay fenced (PostgreSQL disabled and masked)"
    )
    return timings


def fence(tower: SqlTower, target: Remote, fenced: Collection[str], say: Say) -> None:
    """Make sure no SQL host of the tower but ``target`` runs PostgreSQL, now or after a reboot
    or a deploy: writers try the SQL hosts in the inventory's order, read-write, so an old
    primary that came back would take events the restored one never gets. Each other host is
    reached over SSH and its PostgreSQL disabled, stopped and masked (``sqlpair.rebuild``
    unmasks it when it becomes a standby); one SSH cannot reach is refused unless the operator
    names it in ``fenced`` (powered off or cut off: their word, since nothing here can check).
    Everything is checked before anything is stopped."""
    others = [r for r in tower.sql if r is not target]
    unknown = sorted(set(fenced) - {r.address for r in others})
    if unknown:
        raise PairError(
            f"{tower.name}: --fenced {', '.join(unknown)}: not another SQL host of the tower"
            f" ({', '.join(r.address for r in others) or 'none'}); name only those"
        )
    unreachable = []
    for remote in others:
        if remote.address in fenced:
            continue
        try:
            remote.run("true", timeout=30)
        except PairError as exc:
            unreachable.append((remote.address, str(exc)))
    if unreachable:
        raise PairError(
            f"{tower.name}: cannot reach {', '.join(a for a, _ in unreachable)} over SSH"
            f" ({'; '.join(e for _, e in unreachable)}), so cannot fence its PostgreSQL: a"
            " reboot or a deploy would start it as a second primary. Make it reachable, or power"
            " it off (or cut it off the network) and pass"
            + "".join(f" --fenced {a}" for a, _ in unreachable)
        )
    for remote in others:
        if remote.address in fenced:
            say(f"{tower.name}: {remote.address} fenced by the operator (--fenced)")
            continue
        say(
            f"{tower.name}: fencing {remote.address}: PostgreSQL stopped, disabled and masked"
            " until sql.rebuild"
        )
        remote.run(f"systemctl disable --now {SERVICE} && systemctl mask {SERVICE}")
        active = remote.run(f"systemctl is-active {SERVICE}", check=False).strip()
        if active in ("active", "activating", "reloading") or role_of(remote) != "down":
            raise PairError(
                f"{remote.address}: PostgreSQL still runs after `systemctl disable --now"
                f" {SERVICE}` ({active or 'answers'}); stop it there (or power the host off and"
                f" pass --fenced {remote.address})"
            )


def _wait_primary(target: Remote, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while role_of(target) != "primary":
        if time.monotonic() > deadline:
            raise PairError(
                f"{target.address}: still in recovery (or down) {timeout_s:.0f} s after the"
                " restore; see /var/log/postgresql/postgresql-15-main.log there (a target"
                " time before the backup's end cannot be reached: pick a later one)"
            )
        time.sleep(1)


# --- The GOC's restore -----------------------------------------------------------------------

GOC_STANZA = "goc"  # roles/backup.py GOC_STANZA
TOOL = "/opt/mailtower/venv/bin/mailtower"
# The GOC's daemons that hold connections to its PostgreSQL (restarted for fresh ones).
GOC_DAEMONS = ("mailtower-eye", "mailtower-portal")


def goc_restore_host(goc_address: str, host: str) -> str:
    """The host ``goc.restore`` restores onto: the GOC's address, whatever host answers there.
    Another address is refused: the GOC's repository admits only the certificate of the GOC's
    address, and the towers subscribe to that address."""
    if host and host != goc_address:
        raise PairError(
            f"--host {host}: the GOC's address is {goc_address}; its repository admits only"
            f" {goc_address}'s certificate and the towers subscribe to {goc_address}. Give the"
            f" new host the address {goc_address}, deploy it with the GOC's inventory, then run"
            " goc.restore without --host (or change goc.address in the GOC's and the towers'"
            " inventories and deploy them all first)"
        )
    return goc_address


def restore_goc(
    goc: Remote,
    towers: Mapping[str, list[Remote]],
    say: Say,
    *,
    target_time: str | None = None,
    wait_s: float = 600,
) -> dict[str, float]:
    """Restore the GOC's PostgreSQL from its pgBackRest repository onto ``goc`` (the GOC, or
    a new host deployed with the GOC's inventory at its address), then re-make the sync:
    every tower's events subscription and slot anew with the events the GOC lacks copied by
    id (``mailtower sync goc --after-restore``), and on each tower's primary its config
    subscription, whose slot at the GOC a backup does not hold (``mailtower sync tower``:
    the tower's configuration becomes the restored GOC's). Returns each step's seconds."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    info = goc.run(as_postgres(f"{BIN} --stanza={GOC_STANZA} --output=json info"), check=False)
    status, sets = parse_info(info, GOC_STANZA)
    if not sets:
        raise PairError(
            f"{goc.address}: pgbackrest info --stanza={GOC_STANZA} finds no backup"
            f" ({status or info!r}); check the GOC's repository host (`pgbackrest info` as user"
            " pgbackrest there) and that this host is deployed with the GOC's inventory"
        )
    if target_time is not None:
        restore_command(GOC_STANZA, target_time)  # refuse a malformed time before any stop
    say(
        f"GOC: {len(sets)} backup(s), newest {sets[-1].label}; restoring onto {goc.address}"
        + (f" to {target_time}" if target_time else " to the end of the WAL archive")
    )
    if role_of(goc) != "down":
        say(f"GOC: stopping PostgreSQL on {goc.address}")
        goc.run(f"systemctl stop {SERVICE}")
        if role_of(goc) != "down":
            raise PairError(f"{goc.address}: PostgreSQL still answers after the stop; stop it")
    timings["stopped_s"] = time.monotonic() - started
    for command in (
        f"rm -rf {DATA}",
        f"install -d -o postgres -g postgres -m 700 {DATA}",
        as_postgres(restore_command(GOC_STANZA, target_time)),
    ):
        goc.run(command, timeout=wait_s)
    timings["restored_s"] = time.monotonic() - started
    goc.run(f"systemctl start {SERVICE}", timeout=wait_s)
    _wait_primary(goc, wait_s)
    # (a daemon this GOC does not run is not an error: try-restart only restarts what runs)
    goc.run(f"systemctl try-restart {' '.join(GOC_DAEMONS)}", timeout=120, check=False)
    timings["primary_s"] = time.monotonic() - started
    say(f"GOC: {goc.address} takes writes ({timings['primary_s']:.1f} s)")
    say("GOC: every tower's events subscription and slot anew (mailtower sync goc --after-restore)")
    say(goc.run(as_postgres(f"{TOOL} sync goc --after-restore"), timeout=1800))
    timings["events_repointed_s"] = time.monotonic() - started
    missed = []
    for name, hosts in towers.items():
        primary = next((h for h in hosts if role_of(h) == "primary"), None)
        if primary is None:
            missed.append(name)
            continue
        say(f"{name}: configuration subscribed again on {primary.address} (mailtower sync tower)")
        say(primary.run(as_postgres(f"{TOOL} sync tower"), timeout=600))
    timings["config_resubscribed_s"] = time.monotonic() - started
    if missed:
        raise PairError(
            f"GOC restored, but no SQL primary of {', '.join(missed)} answered: run `{TOOL}"
            " sync tower` (as postgres) on its primary when it does, or deploy that tower"
        )
    say(f"GOC: restored and synced again ({timings['config_resubscribed_s']:.1f} s in all)")
    return timings
