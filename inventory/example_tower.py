"""Example inventory of a real tower. Copy to inventory/<tower>.py and replace every placeholder.

    pyinfra inventory/<tower>.py deploys/tower.py
    invoke verify --tower <tower>

Host names are how pyinfra reaches each host over SSH; ``address`` is the host's address on the
tower network (what the relay, HAProxy, pg_hba and Prometheus use). Secrets are read from a file
kept outside the repository (mode 0600) with the four keys of ``mailtower.settings.Secrets``.
"""

import json
import os

_ssh = {"ssh_user": "root"}  # or a sudo user plus `_sudo: True` in group_data


def _host(name: str, address: str) -> tuple[str, dict]:
    return (name, {**_ssh, "address": address})


relay = [_host("relay.tower-x.example.net", "192.0.2.10")]
monitor = [_host("monitor.tower-x.example.net", "192.0.2.11")]
sql = [  # primary first, then the hot standby
    _host("sql1.tower-x.example.net", "192.0.2.12"),
    _host("sql2.tower-x.example.net", "192.0.2.13"),
]
scanners = [_host(f"scan{i:02d}.tower-x.example.net", f"192.0.2.{100 + i}") for i in range(1, 24)]


def _read_secrets(path: str) -> dict:
    """The secrets file, or nothing (the deploy then names each missing secret)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


_secrets_path = os.environ.get("MAILTOWER_SECRETS", "/etc/mailtower-deploy/tower-x.secrets.json")

tower = (
    relay + monitor + sql + scanners,
    {
        "mailtower": {
            "name": "tower-x",
            "hostname": "mx.tower-x.example.net",  # the name customers' MX records point at
            "customers": [{"domain": "customer.example", "server": "mail.customer.example"}],
            # Where operators and this deploy's controller are: SSH, Prometheus and the
            # monitor's API answer only these (and the tower's own hosts).
            "operator_networks": ["198.51.100.0/28"],
            # Who reads mail to the relay's postmaster and Postfix's notices (else discarded).
            "postmaster": "mail-ops@example.net",
            # Hosts sending more than the per-client rates allow, e.g. where `invoke verify`
            # runs (its end-to-end checks send 1,000 messages in a minute).
            "limits": {"client_limit_exempt": ["198.51.100.7/32"]},
            # Quarantine notices (customers' policy `notify`) come from this address and link
            # to the GOC's portal; without notice_from none are sent (docs/quarantine.md).
            "quarantine": {
                "notice_from": "quarantine@tower-x.example.net",
                "portal_url": "https://portal.example.net",
            },
            # Alerts mailed to the operators through this tower's relay and, always as well,
            # through a smarthost that does not depend on the tower (docs/runbook.md, "Alerts").
            "alerts": {
                "to": ["mail-ops@example.net"],
                # Another site's MX for the operators' domain (port 25, STARTTLS checked): it
                # takes mail for its own mailboxes without a login (no SMTP AUTH is configured).
                "fallback": {"host": "mx.example.net", "port": 25, "require_tls": True},
            },
            "secrets": _read_secrets(_secrets_path),
            # The relay's STARTTLS certificate for `hostname` (files on the controller; the key
            # beside the secrets file, mode 0600): checked before the deploy changes anything
            # (docs/runbook.md, Certificates). Without it the relay keeps a self-signed one.
            "tls": {
                "chain": "/etc/mailtower-deploy/tower-x/fullchain.pem",
                "key": "/etc/mailtower-deploy/tower-x/privkey.pem",
            },
            # pgBackRest backups of the SQL pair to the monitor (or "repo_host": another host of
            # this inventory); the backup CA and host certificates live beside the secrets.
            "backup": {"tls_dir": "/etc/mailtower-deploy/tower-x.pgbackrest-tls"},
        }
    },
)
