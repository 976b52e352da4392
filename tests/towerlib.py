"""What verification knows about a built tower: its inventory, settings and SSH access."""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import paramiko
import pytest
import testinfra

from mailtower.controller import inventory as inventory_mod
from mailtower.settings import TowerSettings

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``condition`` until it is truthy; at the deadline fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def smtp_answers(address: str, port: int = 25) -> bool:
    """Does ``address:port`` accept a TCP connection right now?"""
    try:
        with socket.create_connection((address, port), 2):
            return True
    except OSError:
        return False


def stop_postfix(node, address: str, port: int = 25) -> None:
    """Stop Postfix on ``node`` and wait until its SMTP port refuses connections:
    `postfix stop` returns before the master has closed its listeners."""
    node.check_output("systemctl stop postfix")
    wait_for(lambda: not smtp_answers(address, port), 30, f"{address}:{port} to refuse SMTP")


def start_postfix(node, address: str, port: int = 25) -> None:
    node.check_output("systemctl start postfix")
    wait_for(lambda: smtp_answers(address, port), 30, f"{address}:{port} to answer SMTP")


class Hosts:
    """The hosts of an inventory, with SSH (testinfra) access to them."""

    def __init__(self, name: str) -> None:
        from mailtower.controller.firstpair import lab

        self.name = name
        # the lab's: init's inventories when `invoke lab` deployed from them (.lab/inventory/),
        # completed with what only the lab's checks read (container names, customer servers)
        self.inventory_path = (
            Path(name).resolve()
            if name.endswith(".py")  # an inventory file (init's --inventory-dir elsewhere)
            else lab.lab_inventory(ROOT, f"{name.replace('-', '_')}.py")
        )
        self.inventory = lab.complete(inventory_mod.load(self.inventory_path))
        self._nodes: dict[str, testinfra.host.Host] = {}

    def hosts(self, group: str) -> list[inventory_mod.InventoryHost]:
        return self.inventory.groups.get(group, [])

    def entry(self, address: str) -> inventory_mod.InventoryHost:
        for hosts in self.inventory.groups.values():
            for h in hosts:
                if h.address == address or h.name == address:
                    return h
        raise KeyError(address)

    def node(self, name: str) -> testinfra.host.Host:
        """A testinfra host over paramiko that checks the host key against known_hosts.

        One connection per host, made again when it died (a host stopped and started)."""
        host = self._nodes.get(name)
        transport = host.backend.client.get_transport() if host else None
        if host is None or transport is None or not transport.is_active():
            host = self._nodes[name] = self._connect(name)
        return host

    def _connect(self, name: str) -> testinfra.host.Host:
        entry = self.entry(name)
        data = entry.data
        host = testinfra.get_host(f"paramiko://{data.get('ssh_user', 'root')}@{entry.name}")
        client = paramiko.SSHClient()
        known = data.get("ssh_known_hosts_file")
        if known:
            client.load_host_keys(known)
        else:
            client.load_system_host_keys()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            entry.name,
            username=data.get("ssh_user", "root"),
            key_filename=data.get("ssh_key"),
            timeout=10,
            # as pyinfra and the preflight: the inventory's key when it gives one (only that
            # key), else the operator's SSH agent and default keys
            allow_agent=not data.get("ssh_key"),
            look_for_keys=not data.get("ssh_key"),
        )
        host.backend.__dict__["client"] = client  # testinfra's client is a cached_property
        return host


class Tower(Hosts):
    """A tower as its inventory describes it, with SSH (testinfra) access to its hosts."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.settings: TowerSettings = inventory_mod.settings_of(self.inventory)
        self.is_lab = name.startswith("lab-")

    def relay(self) -> testinfra.host.Host:
        return self.node(self.hosts("relay")[0].name)

    def monitor(self) -> testinfra.host.Host:
        return self.node(self.hosts("monitor")[0].name)

    def sql_primary(self) -> testinfra.host.Host:
        return self.node(self.hosts("sql")[0].name)

    def psql(self, query: str, host: testinfra.host.Host | None = None) -> str:
        """Run a query on the primary (or ``host``) as postgres; return unaligned output."""
        return psql(host or self.sql_primary(), self.settings.sql_database, query)

    def pool_doc(self) -> dict:
        """The monitor's /pool answer: every scanner's state, and the rule rollout's."""
        out = self.monitor().check_output(
            f"curl -fsS http://127.0.0.1:{self.settings.ports.monitor_http}/pool"
        )
        return json.loads(out)

    def pool(self) -> dict[str, dict]:
        """The monitor's view of the scanner pool: name → state."""
        return {s["name"]: s for s in self.pool_doc()["scanners"]}

    def haproxy_states(self) -> dict[str, int]:
        """srv_admin_state of every scanner in the relay's HAProxy, read via the monitor."""
        s = self.settings
        script = (
            "import socket;c=socket.create_connection(('%s',%d),3);"
            "c.sendall(b'show servers state scanners\\n');d=b''\n"
            "while True:\n b=c.recv(65536)\n if not b: break\n d+=b\nprint(d.decode())"
        ) % (s.hosts.relay, s.ports.haproxy_runtime)
        out = self.monitor().check_output(f'python3 -c "{script}"')
        states: dict[str, int] = {}
        header: list[str] = []
        for line in out.splitlines():
            if line.startswith("#"):
                header = line[1:].split()
            elif header and line.strip():
                row = dict(zip(header, line.split(), strict=False))
                states[row["srv_name"]] = int(row["srv_admin_state"])
        return states


def psql(node: testinfra.host.Host, database: str, query: str) -> str:
    """Run ``query`` on ``node`` as postgres in ``database``; return unaligned output."""
    b64 = base64.b64encode(query.encode()).decode()
    return node.check_output(
        f"echo {b64} | base64 -d | (cd /tmp && su postgres -c "
        f"'psql -X -q -tA -v ON_ERROR_STOP=1 -d {database}')"
    ).strip()


MAILDIR = "/var/mail/vhosts/catchall"
FIGURES = ROOT / "tests" / "output" / "figures.json"


def record_figure(name: str, value) -> None:
    """Keep a measured figure for docs/benchmarks.md (tests/output/figures.json)."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    figures[name] = value
    FIGURES.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


class Mail:
    """Sends test mail to the relay and finds it at the customer's server."""

    def __init__(self, tower: Tower) -> None:
        self.tower = tower
        if not tower.settings.customers:
            raise pytest.UsageError(f"tower {tower.name} has no customers to send test mail to")
        self.customer = tower.settings.customers[0]
        servers = [h for h in tower.hosts("customers") if h.address == self.customer.server]
        if not servers:
            raise pytest.UsageError(
                f"inventory {tower.inventory_path.name} has no 'customers' host at "
                f"{self.customer.server}: verification reads what the tower delivers there"
            )
        self.server = tower.node(servers[0].name)
        self.relay_addr = str(tower.settings.hosts.relay)

    def rcpt(self, local: str = "user") -> str:
        return f"{local}@{self.customer.domain}"

    @staticmethod
    def token() -> str:
        return uuid.uuid4().hex

    def message(
        self,
        token: str,
        body: str | None = None,
        attachment: tuple[str, bytes] | None = None,
        rcpt: str | None = None,
    ) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = "sender@internet.lab"
        msg["To"] = rcpt or self.rcpt()
        msg["Subject"] = f"mailtower verification {token}"
        msg["Message-ID"] = make_msgid(idstring=token, domain="internet.lab")
        msg["X-Test-Token"] = token
        msg.set_content(body if body is not None else f"Hello from the verification run {token}.\n")
        if attachment:
            name, data = attachment
            msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
        return msg

    def connect(self) -> smtplib.SMTP:
        smtp = smtplib.SMTP(self.relay_addr, self.tower.settings.ports.smtp, timeout=60)
        smtp.ehlo("verify.internet.lab")
        return smtp

    def send(self, msg: EmailMessage, rcpt: str | None = None) -> None:
        with self.connect() as smtp:
            smtp.send_message(msg, from_addr="sender@internet.lab", to_addrs=[rcpt or self.rcpt()])

    def delivered(self) -> Counter:
        """Token → how many copies are in the customer's Maildir."""
        out = self.server.run(
            f"find {MAILDIR}/new {MAILDIR}/cur -type f -print0 2>/dev/null "
            "| xargs -0 -r grep -h -m1 '^X-Test-Token: '"
        )
        return Counter(
            line.split(": ", 1)[1].strip() for line in out.stdout.splitlines() if ": " in line
        )

    def path_of(self, token: str) -> str | None:
        """The Maildir file of the first copy of ``token``'s message, found by reading only
        each file's header (grep -l reads every other file whole: the size-limit test's 50 MB
        messages made each look-up read them all)."""
        script = (
            "import os,sys\n"
            f"want=b'X-Test-Token: {token}'\n"
            "for sub in ('new','cur'):\n"
            f" d='{MAILDIR}/'+sub\n"
            " for f in sorted(os.listdir(d) if os.path.isdir(d) else []):\n"
            "  p=os.path.join(d,f); h=open(p,'rb').read(65536).split(b'\\n\\n',1)[0]\n"
            "  if any(l.rstrip(b'\\r')==want for l in h.split(b'\\n')):\n"
            "   print(p); sys.exit(0)\n"
        )
        return remote_python(self.server, script).strip() or None

    def fetch(self, token: str) -> bytes | None:
        path = self.path_of(token)
        if path is None:
            return None
        return base64.b64decode(self.server.check_output(f"base64 -w0 {path}"))

    def header_of(self, token: str) -> bytes | None:
        """Only the header of ``token``'s message (a large one is not carried over SSH)."""
        path = self.path_of(token)
        if path is None:
            return None
        return base64.b64decode(self.server.check_output(f"head -c 65536 {path} | base64 -w0"))


def remote_python(node: testinfra.host.Host, script: str) -> str:
    """Run ``script`` with the host's python3 (sent base64-encoded: no shell quoting); its
    standard output."""
    b64 = base64.b64encode(script.encode()).decode()
    return node.check_output(f"echo {b64} | base64 -d | python3 -")


def assert_secret_share(node: testinfra.host.Host, tower: Tower, role: str) -> None:
    """The host's tower.json holds the secrets its daemons read (``role``'s share), nothing of
    the rest of the tower's (issue 15: every secret on every host)."""
    doc = json.loads(node.check_output("cat /etc/mailtower/tower.json"))
    held = {name for name, value in doc["secrets"].items() if value and name != "held_by"}
    assert doc["secrets"]["held_by"] == role
    assert held == set(tower.settings.needed_secrets(role))
