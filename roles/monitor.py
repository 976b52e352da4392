"""Monitor: health-checks the scanners and drains/enables them in the relay's HAProxy; serves
the tower's signature mirror; Prometheus with the tower's alert rules."""

from __future__ import annotations

import hashlib
import json

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.operations import apt, files, server, systemd

from mailtower.scanning import testdata
from roles import _common, backup
from roles._common import put_text, template

MIRROR = "/srv/mailtower/mirror"


PACKAGES = [
    "prometheus",
    "prometheus-alertmanager",  # with amtool, which checks its configuration
    "nginx-light",
    "python3-venv",
    "curl",
    "nftables",
    _common.NODE_EXPORTER,
    *backup.PACKAGES,
]


def install():
    _common.service_user()
    if _common.settings().clamav:
        # sigtool, with which mailtower.clamavdb checks every CVD and CDIFF it pulls from the
        # GOC. Without recommends: no clamd here (the package does not depend on it); freshclam
        # comes with it (a dependency) and must not run: the monitor talks to the GOC only.
        apt.packages(
            name="Install clamav (sigtool checks the GOC's ClamAV databases)",
            packages=["clamav"],
            no_recommends=True,
        )
        systemd.service(
            name="Disable clamav-freshclam",
            service="clamav-freshclam",
            running=False,
            enabled=False,
        )
    return _common.install_stack()


def _mirror():
    """The tower's ClamAV mirror: mailtower's own signatures (in the lab, and until a real
    mirror is configured) under /clamav; with ``clamav`` set, the official databases the
    monitor's service pulls from the GOC under /official (its own: the service's user writes
    it; freshclam on the scanners reads it)."""
    if _common.settings().clamav:
        files.directory(
            name=f"Ensure {MIRROR}/official",
            path=f"{MIRROR}/official",
            user="mailtower",
            group="mailtower",
            mode="755",
        )
    files.directory(name=f"Ensure {MIRROR}/clamav", path=f"{MIRROR}/clamav", mode="755")
    ops = []
    index = {}
    for name, text in sorted(testdata.clamav_signatures().items()):
        ops.append(put_text(text, f"{MIRROR}/clamav/{name}"))
        index[name] = hashlib.sha256(text.encode()).hexdigest()
    ops.append(
        put_text(json.dumps({"files": index}, indent=2) + "\n", f"{MIRROR}/clamav/index.json")
    )
    return ops


def configure():
    ops = {}
    ops["settings"] = [_common.write_settings("monitor")]
    _mirror()
    if _common.settings().bundles:
        # The monitor's copy of the GOC's bundles (mailtower.monitor.rollout), served to the
        # scanners under <mirror>/rules.
        files.directory(
            name=f"Ensure {MIRROR}/rules",
            path=f"{MIRROR}/rules",
            user="mailtower",
            group="mailtower",
            mode="755",
        )
    files.link(
        name="Remove nginx's default site", path="/etc/nginx/sites-enabled/default", present=False
    )
    ops["nginx"] = [template("monitor/etc/nginx/sites-enabled/mailtower-mirror")]
    ops["prometheus"] = [
        template("monitor/etc/prometheus/prometheus.yml"),
        template("monitor/etc/prometheus/rules/mailtower.yml"),
        template("monitor/etc/prometheus/rules/hosts.yml"),
        template("monitor/etc/default/prometheus"),
    ]
    if _common.settings().backup is not None:
        # The backups' alerts, on the repository host's textfile metrics (roles/backup.py).
        ops["prometheus"].append(
            template("monitor/etc/prometheus/rules/backup.yml", backup=_common.settings().backup)
        )
    alerts = _common.settings().alerts
    ops["alertmanager"] = (
        [
            template("monitor/etc/prometheus/alertmanager.yml", alerts=alerts),
            template("monitor/etc/prometheus/alertmanager_templates/mailtower.tmpl"),
            template("monitor/etc/default/prometheus-alertmanager"),
            template("monitor/etc/amtool/config.yml"),
        ]
        if alerts
        else []
    )
    ops["monitor"] = [template("monitor/etc/systemd/system/mailtower-monitor.service")]
    ops["nftables"] = [template("monitor/etc/nftables.conf")]
    # The SQL pair's backup repository (the default repository host: the tower's monitor).
    ops["backup"] = backup.repo_configure(backup.tower_stanza()) if backup.is_repo_host() else []
    ops["node_exporter"] = [_common.node_exporter_config()]
    return ops


def activate(ops, install_op):
    changed = {k: _common.changes(v) for k, v in ops.items()}
    _common.activate_nftables(changed["nftables"])
    _common.activate_node_exporter(changed["node_exporter"])
    _common.activate("nginx", changed["nginx"], check="nginx -t -q", reload=True)
    _common.activate(
        "prometheus",
        changed["prometheus"],
        check="promtool check config --syntax-only /etc/prometheus/prometheus.yml >/dev/null"
        " && promtool check rules /etc/prometheus/rules/mailtower.yml"
        " /etc/prometheus/rules/hosts.yml"
        + (" /etc/prometheus/rules/backup.yml" if _common.settings().backup else "")
        + " >/dev/null",
    )
    if _common.settings().alerts:
        # amtool parses the routes, receivers and the mail templates as Alertmanager does.
        _common.activate(
            "prometheus-alertmanager",
            changed["alertmanager"],
            check="amtool check-config /etc/prometheus/alertmanager.yml >/dev/null",
        )
    else:
        # Debian starts it on install with its example configuration: no alerts, no mail.
        systemd.service(
            name="Stop prometheus-alertmanager (no alerts settings)",
            service="prometheus-alertmanager",
            running=False,
            enabled=False,
        )
    _common.activate(
        "mailtower-monitor",
        lambda: changed["monitor"]() or changed["settings"]() or install_op.did_change(),
        daemon_reload=True,
    )
    if backup.is_repo_host():
        backup.repo_activate(backup.tower_stanza(), changed["backup"])


UPGRADE = f"{_common.VENV}/bin/mailtower-monitor upgrade"


class ScannersBehind(FactBase):
    """Scanners running other code than is installed on them, or kept out by a failed check of
    the rolling upgrade (mailtower-monitor upgrade status); None when it cannot tell."""

    def command(self) -> str:
        return f"{UPGRADE} status || true"

    def process(self, output):
        last = output[-1].strip() if output else ""
        return int(last) if last.isdigit() else None


def wait_for_upgrade():
    """After the scanners got new code: wait until the monitor has rolled it across the pool
    (mailtower.monitor.rollout.stack); fails naming the scanner kept out, its check and the
    fix. An unchanged tower has nothing behind: no operation runs."""
    server.shell(
        name="Wait for the rolling upgrade of the scanners",
        commands=[f"{UPGRADE} wait"],
        _if=lambda: host.get_fact(ScannersBehind) != 0,
    )


@deploy("mailtower monitor")
def deploy_monitor():
    install_op = install()
    activate(configure(), install_op)
