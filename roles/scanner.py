"""Scanner: ClamAV clamd with the tower's signatures, and mailtower-scand on the filter port."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.facts.files import File, Sha256File
from pyinfra.operations import files, server, systemd

from mailtower.scand import engines, stack
from mailtower.settings import TowerSettings
from roles import _common
from roles._common import settings, template

PACKAGES = [
    "clamav-daemon",
    "c-icap",
    "libc-icap-mod-virus-scan",
    "python3-venv",
    "curl",
    "nftables",
    _common.NODE_EXPORTER,
]
ICAP_CONTROL = "/run/c-icap/c-icap.ctl"
# scand's ClamAV apply (mailtower.scand.clamav_apply): freshclam's staging directory, the
# databases kept for a rollback, freshclam's configuration.
CLAMAV_STAGED = "/var/lib/mailtower/clamav-staged"
CLAMAV_PREVIOUS = "/var/lib/mailtower/clamav-previous"
FRESHCLAM_CONF = "/etc/mailtower/freshclam.conf"
# The engines' packages (mailtower-engines-upgrade): upgraded with their restarts held back;
# the monitor's roll restarts the engines in drained windows (mailtower.scand.engines).
ENGINE_PACKAGES = [
    "clamav-daemon",
    "clamav-base",
    "clamav-freshclam",
    "c-icap",
    "libc-icap-mod-virus-scan",
]
ENGINES_UPGRADE = "/usr/local/sbin/mailtower-engines-upgrade"
# -I: as root, nothing from the working directory or PYTHON* variables on sys.path
ENGINES_REFRESH = f"{_common.VENV}/bin/python -I -m mailtower.scand.engines refresh"
# While this deploy writes what scand's digest names, scand reports nothing to roll
# (scand.stack.pending): no restart between the wheel and the settings written after it.
DEPLOYING = str(stack.DEPLOYING)


class MemTotalMib(FactBase):
    """The host's RAM as the kernel counts it (/proc/meminfo MemTotal), in MiB."""

    def command(self) -> str:
        return "awk '/^MemTotal:/ {print $2}' /proc/meminfo"

    def process(self, output):
        return int(output[0]) // 1024


@dataclass(frozen=True)
class ClamavMemory:
    ram_mib: int
    needed_mib: int  # the databases loaded once in each engine, and the working set
    concurrent_reload: bool  # clamd's ConcurrentDatabaseReload


def clamav_memory(s: TowerSettings, scanner: str, ram_mib: int, *, icap: bool) -> ClamavMemory:
    """What the official databases need on ``scanner`` with ``ram_mib`` of RAM: refused
    (DeployError) below one engine (per engine process: clamd, and c-icap's libclamav when a
    local c-icap scans) plus the working set; a concurrent reload (a second engine while the
    first serves) only when RAM holds that too ("auto"), or as forced ("yes"/"no")."""
    c = s.clamav
    assert c is not None
    copies = 2 if icap else 1
    needed = copies * c.engine_mib + c.working_set_mib
    if ram_mib < needed:
        engines = (
            f"engine {c.engine_mib}"
            if copies == 1
            else f"2 engines (clamd, c-icap) of {c.engine_mib}"
        )
        raise DeployError(
            f"scanner {scanner} has {ram_mib} MiB; the ClamAV databases need {needed} MiB "
            f"({engines} + working set {c.working_set_mib}): give it more RAM or fewer "
            f"databases (settings clamav.databases, hosts.scanner_ram_mib)"
        )
    if c.concurrent_reload == "auto":
        concurrent = ram_mib >= needed + c.engine_mib
    else:
        concurrent = c.concurrent_reload == "yes"
    return ClamavMemory(ram_mib, needed, concurrent)


def scanner_ram_mib(s: TowerSettings) -> int:
    """TowerHosts.scanner_ram_mib, else what this host has."""
    if s.hosts.scanner_ram_mib is not None:
        return s.hosts.scanner_ram_mib
    return int(host.get_fact(MemTotalMib))


class ScandHealth(FactBase):
    """The running scand, before the deploy changes anything: None (not answering),
    "stack" (its /health names what is installed: the monitor rolls new code) or
    "without-stack" (a scand from before rolling upgrades)."""

    def command(self, port: int) -> str:
        return f"curl -s -m 5 http://127.0.0.1:{port}/health || true"

    def process(self, output):
        text = "\n".join(output)
        if not text.strip():
            return None
        return "stack" if '"stack_installed"' in text else "without-stack"


def local_icap():
    """The ICAP service this scanner runs itself (c-icap on loopback), or None.

    An ``icap_url`` on another host is someone else's ICAP server (e.g. a commercial engine's
    appliance): scand only talks to it.
    """
    from mailtower.scanning.engines.icap import parse_icap_url

    s = settings()
    if "icap" not in s.engines or not s.icap_url:
        return None
    url = parse_icap_url(s.icap_url)
    return url if url.host in ("127.0.0.1", "localhost") else None


def marker_needed(remote: dict[str, str | None], local: dict[str, str], left: bool) -> bool:
    """Whether this deploy marks itself in progress (DEPLOYING): a file scand's digest names
    differs on the host (``remote``, path → sha256 or None) from what it writes (``local``),
    or an interrupted deploy ``left`` the marker. Nothing to write, no marker: an unchanged
    tower's deploy reports no change."""
    return left or any(remote.get(path) != sha for path, sha in local.items())


@functools.cache
def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deploy_marked() -> bool:
    """marker_needed for this host: the wheelhouse and the settings, before either is written.
    (The units' changes wait for daemon-reload in scand.stack.pending; the engines' files are
    written one by one: a restart between two is followed by another, the roll's next.)"""
    local = {
        f"{_common.WHEELHOUSE_REMOTE}.tar": _sha256_of(_common.wheelhouse_tar()),
        _common.SETTINGS_REMOTE: hashlib.sha256(
            _common.settings_text("scanners").encode()
        ).hexdigest(),
    }
    remote = {path: host.get_fact(Sha256File, path=path) for path in local}
    return marker_needed(remote, local, host.get_fact(File, path=DEPLOYING) is not None)


def install(marked: bool = False):
    server.shell(
        name="Mark the deploy in progress (scand: nothing to roll until it is done)",
        commands=[f"mkdir -p {Path(DEPLOYING).parent} && touch {DEPLOYING}"],
        _if=lambda: marked,
    )
    # freshclam cannot reach the public signature servers from a tower: the monitor's mirror
    # is the only source of signatures.
    systemd.service(
        name="Disable clamav-freshclam", service="clamav-freshclam", running=False, enabled=False
    )
    _common.service_user()
    server.shell(
        name="Add mailtower to group clamav (clamd's socket)",
        commands=["usermod -a -G clamav mailtower"],
        _if=lambda: "clamav" not in _groups_of("mailtower"),
    )
    return _common.install_stack()


def _groups_of(user: str) -> str:
    from pyinfra.facts.server import Users

    return " ".join((host.get_fact(Users).get(user) or {}).get("groups", []))


def configure():
    s = settings()
    ops = {}
    ops["settings"] = [_common.write_settings("scanners")]
    files.directory(
        name=f"Ensure {s.spool_dir}",
        path=s.spool_dir,
        user="mailtower",
        group="mailtower",
        mode="750",
    )
    # scand writes the customers' policy snapshot here (tmp file + rename)
    files.directory(
        name=f"Ensure {s.policy_snapshot_dir}",
        path=s.policy_snapshot_dir,
        user="mailtower",
        group="mailtower",
        mode="755",
    )
    if s.rules_dir:
        # scand installs rule bundles here itself, on the monitor's request (/rules/apply)
        files.directory(
            name=f"Ensure {s.rules_dir}",
            path=s.rules_dir,
            user="mailtower",
            group="mailtower",
            mode="755",
        )
    if s.bundles or s.clamav:
        # …and puts their ClamAV databases (mtbundle-*), and the official ones, beside the
        # mirror's for clamd
        files.directory(
            name=f"Let scand add databases to {s.clamav_db_dir}",
            path=s.clamav_db_dir,
            user="clamav",
            group="clamav",
            mode="2775",
        )
    icap = local_icap()
    memory = None
    if s.clamav:
        memory = clamav_memory(s, _common.address(host), scanner_ram_mib(s), icap=bool(icap))
        for path in (CLAMAV_STAGED, CLAMAV_PREVIOUS):
            files.directory(
                name=f"Ensure {path}", path=path, user="mailtower", group="mailtower", mode="755"
            )
    ops["freshclam"] = [template("scanner/etc/mailtower/freshclam.conf")] if s.clamav else []
    ops["clamd"] = [
        template(
            "scanner/etc/clamav/clamd.conf",
            concurrent_reload=memory.concurrent_reload if memory else False,
            ram_mib=memory.ram_mib if memory else 0,
        ),
        # Debian's unit refuses to start without the official databases; a tower has its own.
        template("scanner/etc/systemd/system/clamav-daemon.service.d/mailtower.conf"),
    ]
    ops["icap"] = (
        [
            template("scanner/etc/c-icap/c-icap.conf", icap=icap, sig_dir=s.clamav_db_dir),
            template("scanner/etc/systemd/system/c-icap.service.d/mailtower.conf"),
        ]
        if icap
        else []
    )
    ops["sigsync"] = [
        template(
            "scanner/etc/systemd/system/mailtower-sigsync.service",
            # With the official databases (--no-reload) clamd reloads only in the monitor's
            # windows: sigsync only writes mailtower's own signatures for the next one to load.
            icap_control=ICAP_CONTROL if icap else None,
        ),
        template("scanner/etc/systemd/system/mailtower-sigsync.timer"),
    ]
    ops["scand"] = [template("scanner/etc/systemd/system/mailtower-scand.service", icap=icap)]
    files.template(
        name=f"Render {ENGINES_UPGRADE}",
        src=str(_common.TEMPLATES / f"scanner{ENGINES_UPGRADE}.j2"),
        dest=ENGINES_UPGRADE,
        mode="755",
        packages=ENGINE_PACKAGES,
        record=str(engines.FILES[-1]),
    )
    if host.data.get("upgrade_engines"):
        # `pyinfra … --data upgrade_engines=true` (invoke deploy --engines): new engine
        # packages from the mirror, their restarts left to the monitor's roll. After the
        # configuration above, which the packages' scripts keep (--force-confold).
        server.shell(
            name="Upgrade the engines' packages (restarts in the monitor's windows)",
            commands=["apt-get update -q", ENGINES_UPGRADE],
        )
    ops["nftables"] = [template("scanner/etc/nftables.conf")]
    ops["node_exporter"] = [_common.node_exporter_config()]
    return ops


def activate(ops, install_op, marked: bool = False):
    changed = {k: _common.changes(v) for k, v in ops.items()}
    stack_changed = install_op.did_change
    systemd.daemon_reload(
        name="Reload systemd units",
        _if=lambda: any(changed[k]() for k in ("clamd", "sigsync", "scand", "icap")),
    )
    _common.activate_nftables(changed["nftables"])
    _common.activate_node_exporter(changed["node_exporter"])
    # Signatures first: clamd will not start on an empty database directory.
    server.shell(
        name="Pull signatures from the tower's mirror",
        commands=["systemctl start mailtower-sigsync.service"],
        _if=lambda: (
            changed["sigsync"]()
            or stack_changed()
            or host.get_fact(File, path=f"{settings().clamav_db_dir}/mailtower-test.ndb") is None
        ),
    )
    systemd.service(
        name="Enable the signature sync timer",
        service="mailtower-sigsync.timer",
        running=True,
        enabled=True,
    )
    _activate_engines(lambda: changed["clamd"]() or changed["icap"]())
    if not local_icap():
        systemd.service(
            name="Stop c-icap (no local ICAP engine)",
            service="c-icap",
            running=False,
            enabled=False,
        )
    if (
        settings().secrets.canary is None
        or host.get_fact(ScandHealth, port=settings().ports.scanner_http) == "without-stack"
    ):
        # No canary secret, no monitor windows — or a running scand from before rolling
        # upgrades, which cannot name what is installed nor restart itself for the monitor
        # (once): new code restarts one scanner at a time (the relay's retries carry what it
        # had in flight), never the whole pool at once.
        systemd.service(
            name="Restart mailtower-scand (one scanner at a time)",
            service="mailtower-scand",
            running=True,
            restarted=True,
            _if=lambda: changed["scand"]() or changed["settings"]() or stack_changed(),
            _serial=True,
        )
    # With a canary secret a running scand keeps running: its /health now names new code
    # installed, and the monitor restarts the scanners a few at a time in drained windows,
    # each checked by health and canary (mailtower.monitor.rollout.stack); the deploy waits
    # for that on the monitor (roles/monitor.wait_for_upgrade). A first deploy starts it here.
    systemd.service(
        name="Ensure mailtower-scand is running",
        service="mailtower-scand",
        running=True,
        enabled=True,
    )
    # Last: what is installed is complete and loaded (daemon-reload above); the monitor rolls it.
    server.shell(
        name="Deploy done (scand: what is installed is ready to roll)",
        commands=[f"rm -f {DEPLOYING}"],
        _if=lambda: marked,
    )


def _rolled() -> bool:
    """Whether the monitor restarts this scanner's scand (and so its engines) in drained
    windows: a canary secret and a running scand that names what is installed."""
    s = settings()
    return (
        s.secrets.canary is not None
        and host.get_fact(ScandHealth, port=s.ports.scanner_http) == "stack"
    )


def _activate_engines(changed) -> None:
    """clamd and c-icap with new configuration files. On a scanner in service the monitor's
    roll restarts them (scand's ExecStartPre, mailtower.scand.engines): restarting here would
    restart every scanner's engines at once (scand answers 451). Otherwise (a first deploy,
    no canary secret, a scand from before rolling upgrades) the refresh restarts them here and
    records it, one scanner at a time when scand serves."""
    if not _rolled():
        serving = host.get_fact(ScandHealth, port=settings().ports.scanner_http) is not None
        icap = local_icap()
        refresh = f"{ENGINES_REFRESH} --clamd {settings().clamd_socket}" + (
            f" --icap {icap.host}:{icap.port}" if icap else ""
        )
        # two operations, so that each one's _serial is the same on every host
        server.shell(
            name="Restart the engines on their new configuration (one serving scanner at a time)",
            commands=[refresh],
            _if=lambda: serving and changed(),
            _serial=True,
        )
        server.shell(
            name="Start the engines on their new configuration",
            commands=[refresh],
            _if=lambda: not serving and changed(),
        )
    for service in ("clamav-daemon", "c-icap") if local_icap() else ("clamav-daemon",):
        systemd.service(
            name=f"Ensure {service} is running", service=service, running=True, enabled=True
        )


@deploy("mailtower scanner")
def deploy_scanner():
    marked = deploy_marked()
    install_op = install(marked)
    activate(configure(), install_op, marked)
