"""Relay: Postfix on :25 → HAProxy 127.0.0.1:filter → scanner pool → re-injection :reinject."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import File, FindInFile
from pyinfra.operations import files, server

from roles import _common
from roles._common import settings, template

CERT = "/etc/mailtower/tls/relay.crt"
KEY = "/etc/mailtower/tls/relay.key"
# main.cf's listening lines as the template renders them (tests/deploy checks they agree):
# Postfix applies a change of these only on a restart, everything else on a reload.
LISTENING = ["inet_interfaces = all", "inet_protocols = ipv4"]


PACKAGES = [
    "postfix",
    "postfix-pgsql",
    "postfix-pcre",  # the address syntax and scan status tables
    "haproxy",
    "nftables",
    "openssl",
    "python3-venv",
    "socat",  # operators talk to HAProxy's admin socket with it (docs/runbook.md)
]


def install():
    _common.service_user()
    return _common.install_stack()


def configure():
    s = settings()
    ops = {}
    ops["settings"] = [_common.write_settings("relay")]
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
        template("relay/etc/postfix/address_syntax.pcre"),
        template("relay/etc/postfix/scan_status.pcre"),
        template("relay/etc/postfix/pgsql/relay_domains.cf", mode="640", group="postfix"),
        template("relay/etc/postfix/pgsql/transport.cf", mode="640", group="postfix"),
        template("relay/etc/postfix/pgsql/relay_recipients.cf", mode="640", group="postfix"),
        template("relay/etc/postfix/pgsql/recipient_check.cf", mode="640", group="postfix"),
    ]
    ops["haproxy"] = [template("relay/etc/haproxy/haproxy.cfg")]
    ops["nftables"] = [template("relay/etc/nftables.conf")]
    ops["exporter"] = [
        template("relay/etc/systemd/system/mailtower-relay-exporter.service"),
    ]
    ops["order"] = [template("relay/etc/systemd/system/mailtower-relay-order.service")]
    return ops


def activate(ops, install_op):
    changed = {k: _common.changes(v) for k, v in ops.items()}
    # A reload keeps the queue and the SMTP sessions in progress; only the listening
    # addresses (inet_interfaces, inet_protocols) need a restart, i.e. on the first deploy.
    listening = host.get_fact(FindInFile, path="/etc/postfix/main.cf", pattern=r"^inet_")
    first = sorted(listening or []) != LISTENING
    _common.activate("postfix", changed["postfix"], check="postfix check", reload=not first)
    # A reload keeps established filter sessions; the server-state file keeps the monitor's
    # maintenance marks across it.
    _common.activate(
        "haproxy",
        changed["haproxy"],
        check="haproxy -c -q -f /etc/haproxy/haproxy.cfg",
        reload=True,
    )
    _common.activate_nftables(changed["nftables"])
    # The exporter runs mailtower's code with the tower's settings: new code or settings,
    # new process.
    _common.activate(
        "mailtower-relay-exporter",
        lambda: changed["exporter"]() or changed["settings"]() or install_op.did_change(),
        daemon_reload=True,
    )
    # Same for the orderer; a restart gives back what it held and takes it again in order.
    _common.activate(
        "mailtower-relay-order",
        lambda: changed["order"]() or changed["settings"]() or install_op.did_change(),
        daemon_reload=True,
    )


@deploy("mailtower relay")
def deploy_relay():
    install_op = install()
    activate(configure(), install_op)
