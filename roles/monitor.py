"""Monitor: health-checks the scanners and drains/enables them in the relay's HAProxy; serves
the tower's signature mirror; Prometheus with the tower's alert rules."""

from __future__ import annotations

import hashlib
import json

from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd

from mailtower import testdata
from roles import _common
from roles._common import put_text, template

MIRROR = "/srv/mailtower/mirror"


PACKAGES = ["prometheus", "nginx-light", "python3-venv", "curl"]


def install():
    _common.service_user()
    return _common.install_stack()


def _mirror():
    """The tower's ClamAV mirror. In the lab (and until a real mirror is configured) it holds
    mailtower's own test signatures; a real tower mirrors the official databases (cvdupdate)."""
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
    ops["settings"] = [_common.write_settings()]
    _mirror()
    files.link(
        name="Remove nginx's default site", path="/etc/nginx/sites-enabled/default", present=False
    )
    ops["nginx"] = [template("monitor/etc/nginx/sites-enabled/mailtower-mirror")]
    ops["prometheus"] = [
        template("monitor/etc/prometheus/prometheus.yml"),
        template("monitor/etc/prometheus/rules/mailtower.yml"),
        template("monitor/etc/default/prometheus"),
    ]
    ops["monitor"] = [template("monitor/etc/systemd/system/mailtower-monitor.service")]
    return ops


def activate(ops, install_op):
    changed = {k: (lambda v=v: any(op.did_change() for op in v)) for k, v in ops.items()}
    server.shell(
        name="Check the nginx configuration (nginx -t)",
        commands=["nginx -t -q"],
        _if=changed["nginx"],
    )
    systemd.service(
        name="Reload nginx",
        service="nginx",
        running=True,
        enabled=True,
        reloaded=True,
        _if=changed["nginx"],
    )
    systemd.service(name="Ensure nginx runs", service="nginx", running=True, enabled=True)
    server.shell(
        name="Check the Prometheus configuration (promtool)",
        commands=[
            "promtool check config --syntax-only /etc/prometheus/prometheus.yml"
            " >/dev/null && promtool check rules /etc/prometheus/rules/mailtower.yml"
            " >/dev/null"
        ],
        _if=changed["prometheus"],
    )
    systemd.service(
        name="Restart Prometheus",
        service="prometheus",
        running=True,
        enabled=True,
        restarted=True,
        _if=changed["prometheus"],
    )
    systemd.service(name="Ensure Prometheus runs", service="prometheus", running=True, enabled=True)
    systemd.service(
        name="Restart mailtower-monitor",
        service="mailtower-monitor",
        running=True,
        enabled=True,
        restarted=True,
        daemon_reload=True,
        _if=lambda: changed["monitor"]() or changed["settings"]() or install_op.did_change(),
    )
    systemd.service(
        name="Ensure mailtower-monitor runs",
        service="mailtower-monitor",
        running=True,
        enabled=True,
    )


@deploy("mailtower monitor")
def deploy_monitor():
    install_op = install()
    activate(configure(), install_op)
