"""Relay: Postfix on :25 → HAProxy 127.0.0.1:filter → scanner pool → re-injection :reinject."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd

from roles import _common
from roles._common import settings, template

CERT = "/etc/mailtower/tls/relay.crt"
KEY = "/etc/mailtower/tls/relay.key"


PACKAGES = [
    "postfix",
    "postfix-pgsql",
    "haproxy",
    "nftables",
    "openssl",
    "python3-venv",
    "socat",  # operators talk to HAProxy's admin socket with it (docs/runbook.md)
]


def install():
    _common.service_user()
    _common.install_stack()


def configure():
    s = settings()
    ops = {}
    _common.write_settings()
    # A per-tower certificate for STARTTLS, made once on the relay (the key never leaves it).
    files.directory(name="Ensure /etc/mailtower/tls", path="/etc/mailtower/tls", mode="755")
    server.shell(
        name=f"Create the TLS certificate of {s.hostname}",
        commands=[
            f"openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj '/CN={s.hostname}' "
            f"-addext 'subjectAltName=DNS:{s.hostname}' -keyout {KEY} -out {CERT} 2>/dev/null "
            f"&& chmod 600 {KEY}"
        ],
        _if=lambda: host.get_fact(File, path=CERT) is None,
    )
    ops["postfix"] = [
        template("relay/etc/postfix/main.cf", cert=CERT, key=KEY),
        template("relay/etc/postfix/master.cf"),
        template("relay/etc/postfix/pgsql/relay_domains.cf", mode="640", group="postfix"),
        template("relay/etc/postfix/pgsql/transport.cf", mode="640", group="postfix"),
    ]
    ops["haproxy"] = [template("relay/etc/haproxy/haproxy.cfg")]
    ops["nftables"] = [template("relay/etc/nftables.conf")]
    ops["exporter"] = [
        template("relay/etc/systemd/system/mailtower-relay-exporter.service"),
    ]
    return ops


def activate(ops):
    changed = {k: (lambda v=v: any(op.did_change() for op in v)) for k, v in ops.items()}
    # Refuse to restart on a configuration Postfix itself finds wrong.
    server.shell(
        name="Check the Postfix configuration (postfix check)",
        commands=["postfix check"],
        _if=changed["postfix"],
    )
    systemd.service(
        name="Restart Postfix",
        service="postfix",
        running=True,
        enabled=True,
        restarted=True,
        _if=changed["postfix"],
    )
    systemd.service(name="Ensure Postfix runs", service="postfix", running=True, enabled=True)
    server.shell(
        name="Check the HAProxy configuration (haproxy -c)",
        commands=["haproxy -c -q -f /etc/haproxy/haproxy.cfg"],
        _if=changed["haproxy"],
    )
    # Reload keeps established filter sessions; the server-state file keeps the monitor's
    # maintenance marks across it.
    systemd.service(
        name="Reload HAProxy",
        service="haproxy",
        running=True,
        enabled=True,
        reloaded=True,
        _if=changed["haproxy"],
    )
    systemd.service(name="Ensure HAProxy runs", service="haproxy", running=True, enabled=True)
    _common.activate_nftables(changed["nftables"])
    systemd.service(
        name="Restart mailtower-relay-exporter",
        service="mailtower-relay-exporter",
        running=True,
        enabled=True,
        restarted=True,
        daemon_reload=True,
        _if=changed["exporter"],
    )
    systemd.service(
        name="Ensure mailtower-relay-exporter runs",
        service="mailtower-relay-exporter",
        running=True,
        enabled=True,
    )


@deploy("mailtower relay")
def deploy_relay():
    install()
    activate(configure())
