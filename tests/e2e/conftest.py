"""End to end: real SMTP from this controller to the tower's relay, read back at the customer."""

from __future__ import annotations

import base64
import json
import smtplib
import uuid
from collections import Counter
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest
from towerlib import ROOT, Tower

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

    def fetch(self, token: str) -> bytes | None:
        out = self.server.run(f"grep -rl -m1 '^X-Test-Token: {token}' {MAILDIR}/new {MAILDIR}/cur")
        files = out.stdout.split()
        if not files:
            return None
        return base64.b64decode(self.server.check_output(f"base64 -w0 {files[0]}"))


@pytest.fixture(scope="session")
def mail(tower) -> Mail:
    return Mail(tower)


@pytest.fixture(scope="session")
def workdir() -> Path:
    path = ROOT / "tests" / "output"
    path.mkdir(parents=True, exist_ok=True)
    return path
