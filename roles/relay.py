"""Relay: Postfix on :25 → HAProxy 127.0.0.1:filter → scanner pool → re-injection :reinject."""

from __future__ import annotations

import io
import shlex

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.facts.files import File, FindInFile
from pyinfra.operations import files, server, systemd

from mailtower.controller import certs
from mailtower.controller.errors import CertificateError
from mailtower.relay import exporter
from roles import _common
from roles._common import settings, template

TLS_DIR = "/etc/mailtower/tls"
# What Postfix reads (smtpd_tls_chain_files): the key, then the chain, in one file replaced
# whole, so no smtpd ever starts with a new key and an old certificate. Root only.
TLS_PEM = f"{TLS_DIR}/relay.pem"
# The chain alone, readable by all: the exporter's expiry metric, and operators' openssl.
CERT = str(exporter.CERTIFICATE)
# The key of a self-signed certificate the relay made itself (no ``tls`` given).
KEY = f"{TLS_DIR}/relay.key"
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
    _common.NODE_EXPORTER,
    "python3-venv",
    "socat",  # operators talk to HAProxy's admin socket with it (docs/runbook.md)
    "iproute2",  # ss: mailtower-relay-upgrade waits for the filter hop's connections to end
]
# The relay's own packages (mailtower-relay-upgrade): upgraded with their restarts held back,
# then HAProxy reloaded (hitless) and Postfix restarted once the filter hop has drained.
RELAY_PACKAGES = ["postfix", "postfix-pgsql", "postfix-pcre", "haproxy"]
RELAY_UPGRADE = "/usr/local/sbin/mailtower-relay-upgrade"
RELAY_RECORD = "/var/lib/mailtower/relay-packages"
# Postfix's transport to the content filter (main.cf content_filter, master.cf): held
# (defer_transports) while Postfix restarts on new packages.
FILTER_TRANSPORT = "scan"


def install():
    _common.service_user()
    return _common.install_stack()


def given_certificate() -> certs.Given | None:
    """The operator's chain and key (the tower's ``tls`` setting), read and checked on the
    controller while the deploy is prepared, before any host is changed: DeployError naming the
    relay and every reason with its fix. None: no ``tls`` given (a warning)."""
    s = settings()
    what = f"{host.name} (relay of tower {s.name}, MX name {s.hostname})"
    if s.tls is None:
        logger.warning(
            f"{what}: no TLS certificate given (tls in the tower's inventory): the relay keeps"
            " a self-signed one, which senders that verify (DANE, MTA-STS) refuse; see"
            " docs/runbook.md, Certificates"
        )
        return None
    try:
        given = certs.given(s.tls, [s.hostname], what=what)
    except CertificateError as exc:
        raise DeployError(f"{exc}\n(checked before the deploy changed anything)") from exc
    for warning in given.report.warnings:
        logger.warning(f"{what}: {warning}")
    return given


def served_pem(given: certs.Given) -> bytes:
    """What Postfix reads (TLS_PEM): the key, then the chain, leaf first."""
    return given.key_pem.rstrip(b"\n") + b"\n" + given.chain_pem


def certificate(given: certs.Given | None) -> list:
    """Put the relay's certificate in place: the operator's (checked), or without one a
    self-signed certificate made once on the relay (its key never leaves it; a relay that
    had one before this setting existed keeps it)."""
    if given is None:
        return [
            server.shell(
                name=f"Create a self-signed TLS certificate for {settings().hostname}",
                commands=[
                    f"test -s {KEY} -a -s {CERT} || openssl req -x509 -newkey rsa:3072 -nodes"
                    f" -days 825 -subj '/CN={settings().hostname}'"
                    f" -addext 'subjectAltName=DNS:{settings().hostname}'"
                    f" -keyout {KEY} -out {CERT} 2>/dev/null",
                    f"chmod 600 {KEY} && chmod 644 {CERT}",
                    f"(umask 077 && cat {KEY} {CERT} > {TLS_PEM}.new)"
                    f" && mv {TLS_PEM}.new {TLS_PEM}",
                ],
                _if=lambda: host.get_fact(File, path=TLS_PEM) is None,
            )
        ]
    return [
        files.put(
            name=f"Upload {TLS_PEM}",
            src=io.BytesIO(served_pem(given)),
            dest=TLS_PEM,
            mode="600",
            user="root",
            group="root",
        ),
        _common.put_text(given.chain_pem.decode(), CERT),
    ]


def configure():
    ops = {}
    ops["settings"] = [_common.write_settings("relay")]
    files.directory(name=f"Ensure {TLS_DIR}", path=TLS_DIR, mode="755")
    ops["tls"] = certificate(given_certificate())
    ops["postfix"] = [
        template("relay/etc/postfix/main.cf", tls_pem=TLS_PEM),
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
    ops["node_exporter"] = [_common.node_exporter_config()]
    ops["exporter"] = [
        template("relay/etc/systemd/system/mailtower-relay-exporter.service"),
    ]
    ops["order"] = [template("relay/etc/systemd/system/mailtower-relay-order.service")]
    template(
        f"relay{RELAY_UPGRADE}",
        mode="755",
        packages=RELAY_PACKAGES,
        record=RELAY_RECORD,
        transport=FILTER_TRANSPORT,
        drain_s=settings().upgrade.relay_drain_s,
    )
    return ops


def upgrade_command(given) -> str:
    """The relay's upgrade as the deploy runs it (``--data upgrade_relay_packages=…``: true
    for the packages' upgrades, or a JSON list of apt-get install arguments)."""
    if given is True:
        return RELAY_UPGRADE
    if isinstance(given, list) and given and all(isinstance(a, str) for a in given):
        return shlex.join([RELAY_UPGRADE, *given])
    raise DeployError(
        f"{host.name}: upgrade_relay_packages={given!r}: give true or a JSON list of apt-get"
        ' install arguments, e.g. \'["--reinstall", "postfix", "haproxy"]\''
        " (invoke deploy --relay-packages)"
    )


def activate(ops, install_op):
    changed = {k: _common.changes(v) for k, v in ops.items()}
    # A reload keeps the queue and the SMTP sessions in progress; only the listening
    # addresses (inet_interfaces, inet_protocols) need a restart, i.e. on the first deploy.
    listening = host.get_fact(FindInFile, path="/etc/postfix/main.cf", pattern=r"^inet_")
    first = sorted(listening or []) != LISTENING
    _common.activate("postfix", changed["postfix"], check="postfix check", reload=not first)
    # A new certificate alone needs no restart: after a reload every new smtpd and tlsproxy
    # reads it (sessions in progress finish with the old one).
    systemd.service(
        name="Reload postfix for its new TLS certificate",
        service="postfix",
        running=True,
        reloaded=True,
        _if=lambda: changed["tls"]() and not changed["postfix"](),
    )
    # A reload keeps established filter sessions; the server-state file keeps the monitor's
    # maintenance marks across it.
    _common.activate(
        "haproxy",
        changed["haproxy"],
        check="haproxy -c -q -f /etc/haproxy/haproxy.cfg",
        reload=True,
    )
    _common.activate_nftables(changed["nftables"])
    _common.activate_node_exporter(changed["node_exporter"])
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
    if settings().tls is not None:
        # A self-signed certificate's key from before: not served since Postfix restarted.
        files.file(name=f"Remove {KEY}", path=KEY, present=False)
    given = host.data.get("upgrade_relay_packages")
    if given:
        # `invoke deploy --relay-packages`: after the configuration above, which the packages'
        # scripts keep (--force-confold), with Postfix and HAProxy running it.
        server.shell(
            name="Upgrade the relay's packages (HAProxy reloaded, Postfix restarted drained)",
            commands=[upgrade_command(given)],
        )
