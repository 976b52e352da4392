"""Scanner: ClamAV clamd with the tower's signatures, and mailtower-scand on the filter port."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd

from roles import _common
from roles._common import settings, template

PACKAGES = [
    "clamav-daemon",
    "c-icap",
    "libc-icap-mod-virus-scan",
    "python3-venv",
    "curl",
    "nftables",
]
ICAP_CONTROL = "/run/c-icap/c-icap.ctl"


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


def install():
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
    if s.rules_dir:
        # scand installs rule bundles here itself, on the monitor's request (/rules/apply)
        files.directory(
            name=f"Ensure {s.rules_dir}",
            path=s.rules_dir,
            user="mailtower",
            group="mailtower",
            mode="755",
        )
    if s.bundles:
        # …and puts their ClamAV databases (mtbundle-*) beside the mirror's for clamd
        files.directory(
            name=f"Let scand add bundle databases to {s.clamav_db_dir}",
            path=s.clamav_db_dir,
            user="clamav",
            group="clamav",
            mode="2775",
        )
    ops["clamd"] = [
        template("scanner/etc/clamav/clamd.conf"),
        # Debian's unit refuses to start without the official databases; a tower has its own.
        template("scanner/etc/systemd/system/clamav-daemon.service.d/mailtower.conf"),
    ]
    icap = local_icap()
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
            icap_control=ICAP_CONTROL if icap else None,
        ),
        template("scanner/etc/systemd/system/mailtower-sigsync.timer"),
    ]
    ops["scand"] = [template("scanner/etc/systemd/system/mailtower-scand.service")]
    ops["nftables"] = [template("scanner/etc/nftables.conf")]
    return ops


def activate(ops, install_op):
    changed = {k: _common.changes(v) for k, v in ops.items()}
    stack_changed = install_op.did_change
    systemd.daemon_reload(
        name="Reload systemd units",
        _if=lambda: any(changed[k]() for k in ("clamd", "sigsync", "scand", "icap")),
    )
    _common.activate_nftables(changed["nftables"])
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
    _common.activate("clamav-daemon", changed["clamd"])
    if local_icap():
        _common.activate("c-icap", changed["icap"])
    else:
        systemd.service(
            name="Stop c-icap (no local ICAP engine)",
            service="c-icap",
            running=False,
            enabled=False,
        )
    _common.activate(
        "mailtower-scand",
        lambda: changed["scand"]() or changed["settings"]() or stack_changed(),
    )


@deploy("mailtower scanner")
def deploy_scanner():
    install_op = install()
    activate(configure(), install_op)
