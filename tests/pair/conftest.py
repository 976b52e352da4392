"""The twin lab: towers lab-a and lab-b, linked by MX records in the lab's DNS.

Mail comes from "the internet": it is submitted to the lab's sender, a real Postfix that
finds the towers by MX lookup, and read back at the customers' mail servers.
"""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from email.utils import make_msgid

import pytest
from towerlib import (
    MAILDIR,
    ROOT,
    Hosts,
    Tower,
    psql,
    remote_python,
    start_postfix,
    stop_postfix,
    wait_for,
)

SENDER_PORT = 25
__all__ = ["ROOT", "Pair", "goc_events", "latencies", "percentile", "submit_spread", "token_of"]
CUT_TABLE = "mailtower_lab_cut"  # nftables table on the controller that cuts a site off


class Pair:
    """Both towers, the lab's internet (DNS, sender, customers) and mail through them."""

    def __init__(self) -> None:
        self.towers = {"a": Tower("lab-a"), "b": Tower("lab-b")}
        self.internet = Hosts("lab-internet")
        self.sender = self.internet.node(self.internet.inventory.groups["sender"][0].name)
        self.sender_addr = self.internet.inventory.groups["sender"][0].address
        self.dns_addr = self.internet.inventory.groups["dns"][0].address
        self.customers = self.towers["a"].settings.customers
        self.hostnames = {k: t.settings.hostname for k, t in self.towers.items()}
        # The GOC's own inventory (init's when the lab was built from it, else lab_goc.py).
        self.goc_hosts = Hosts("lab-goc")
        goc = self.goc_hosts.inventory.groups["goc"][0]
        self.goc_name, self.goc_addr = goc.name, goc.address
        self.goc_data = self.goc_hosts.inventory.group_data["goc"]["goc"]

    # -- the GOC -----------------------------------------------------------------------------

    def goc(self):
        return self.goc_hosts.node(self.goc_name)

    def goc_sql(self, query: str) -> str:
        """A query in the GOC's hub database, as postgres on the GOC."""
        return psql(self.goc(), self.goc_data.get("database", "goc"), query)

    def eye_url(self) -> str:
        """VirusEye's base URL: HTTPS only, on the port the GOC data gives it."""
        port = self.goc_data.get("eye_listen", "").rpartition(":")[2] or "8025"
        return f"https://{self.goc_addr}:{port}"

    def eye_cert(self) -> bytes:
        """The certificate VirusEye serves, read from the GOC over SSH: trusting what the TLS
        connection itself offers would trust whoever answers."""
        from mailtower.settings import GocSettings

        tls = GocSettings.model_validate(self.goc_data).eye_tls()
        assert tls is not None, "the lab GOC's VirusEye has no certificate of its own"
        return bytes(self.goc().file(tls[0]).content)

    def eye_tls(self) -> ssl.SSLContext:
        """A client context trusting VirusEye's certificate, and nothing else."""
        return ssl.create_default_context(cadata=self.eye_cert().decode())

    def eye_plain_http(self) -> bytes:
        """What VirusEye's port answers a plain-HTTP request (b'' when it hangs up)."""
        host, port = self.eye_url().removeprefix("https://").rsplit(":", 1)
        answer = b""
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(
                f"GET /login HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            try:
                while chunk := sock.recv(4096):
                    answer += chunk
            except ConnectionResetError:
                pass
        return answer

    # -- sending -----------------------------------------------------------------------------

    def rcpt(self, index: int = 0, local: str = "user") -> str:
        return f"{local}@{self.customers[index].domain}"

    @staticmethod
    def token() -> str:
        return uuid.uuid4().hex

    def message(
        self, token: str, rcpt: str, sender: str = "someone@internet.lab", body: str = ""
    ) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = rcpt
        msg["Subject"] = f"mailtower pair verification {token}"
        msg["Message-ID"] = make_msgid(idstring=token, domain="internet.lab")
        msg["X-Test-Token"] = token
        msg.set_content(f"Hello through the twin towers, {token}.\n{body}")
        return msg

    def sender_queued(self, rcpt: str) -> list[dict]:
        """The messages for ``rcpt`` still in the internet sender's queue (postqueue -j)."""
        out = self.sender.check_output("postqueue -j")
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [e for e in entries if any(r["address"] == rcpt for r in e["recipients"])]

    def submit(
        self, rcpt: str, count: int = 1, sender: str = "someone@internet.lab", body: str = ""
    ) -> list[str]:
        """Hand ``count`` messages to the internet's sender; return their tokens."""
        tokens = [self.token() for _ in range(count)]
        with smtplib.SMTP(self.sender_addr, SENDER_PORT, timeout=30) as smtp:
            smtp.ehlo("verify.internet.lab")
            for token in tokens:
                smtp.send_message(self.message(token, rcpt, sender, body), sender, [rcpt])
        return tokens

    # -- reading back ------------------------------------------------------------------------

    def customer_node(self, index: int):
        server = self.customers[index].server
        name = next(
            h.name for h in self.internet.inventory.groups["customers"] if h.address == server
        )
        return self.internet.node(name)

    def arrivals(self, index: int = 0) -> dict[str, list[dict]]:
        """Token → every copy at customer ``index``: which tower carried it, and when it landed."""
        script = (
            "import os,re,json,sys\n"
            "out=[]\n"
            f"for sub in ('new','cur'):\n"
            f" d='{MAILDIR}/'+sub\n"
            " for f in (os.listdir(d) if os.path.isdir(d) else []):\n"
            "  p=os.path.join(d,f); h=open(p,'rb').read(65536).decode('latin-1')\n"
            "  head=h.split('\\n\\n',1)[0].replace('\\n\\t',' ').replace('\\n ',' ')\n"
            "  t=re.search(r'^X-Test-Token: (\\S+)',head,re.M)\n"
            "  by=re.findall(r'by (mx\\.[a-z0-9.-]+)',head)\n"
            "  s=re.search(r'^Subject: (.*)$',head,re.M)\n"
            "  out.append({'token':t.group(1) if t else None,'by':by[-1] if by else None,"
            "'mtime':os.stat(p).st_mtime,'subject':s.group(1) if s else '','path':p})\n"
            "json.dump(out,sys.stdout)\n"
        )
        raw = remote_python(self.customer_node(index), script)
        found: dict[str, list[dict]] = {}
        for item in json.loads(raw):
            if item["token"]:
                found.setdefault(item["token"], []).append(item)
        return found

    def tower_of(self, hostname: str | None) -> str | None:
        for key, name in self.hostnames.items():
            if hostname and hostname.rstrip(".") == name:
                return key
        return None

    def wait_delivered(self, tokens: list[str], index: int = 0, timeout: float = 180) -> dict:
        def done():
            seen = self.arrivals(index)
            return seen if all(t in seen for t in tokens) else None

        return wait_for(done, timeout, f"{len(tokens)} messages at customer {index + 1}", 1)

    # -- breaking things ---------------------------------------------------------------------

    @contextmanager
    def relay_stopped(self, tower: str) -> Iterator[None]:
        """Postfix stopped on the relay: the outage begins when port 25 refuses connections."""
        relay = self.towers[tower].relay()
        settings = self.towers[tower].settings
        address = str(settings.hosts.relay)
        stop_postfix(relay, address, settings.ports.smtp)
        try:
            yield
        finally:
            start_postfix(relay, address, settings.ports.smtp)

    @contextmanager
    def site_cut(self, tower: str) -> Iterator[None]:
        """Drop every packet to and from a tower's site net on the lab bridge (a black hole)."""
        net = str(self.towers[tower].settings.hosts.relay).rsplit(".", 1)[0] + ".0/24"
        rules = (
            f"table bridge {CUT_TABLE} {{\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter; policy accept;\n"
            f"    ip saddr {net} drop\n"
            f"    ip daddr {net} drop\n"
            "  }\n"
            "}\n"
        )
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
        try:
            yield
        finally:
            subprocess.run(["nft", "delete", "table", "bridge", CUT_TABLE], check=True)


@pytest.fixture(scope="session")
def pair() -> Pair:
    subprocess.run(["nft", "delete", "table", "bridge", CUT_TABLE], capture_output=True)
    return Pair()


def token_of(message_id: str) -> str:
    """The test token in a Message-ID made by Pair.message (``<….TOKEN@internet.lab>``)."""
    return message_id.strip("<>").split("@", 1)[0].rsplit(".", 1)[-1]


def goc_events(pair: Pair, tokens: set[str]) -> list[dict]:
    """The GOC's events of these messages (sent from the internet's sender)."""
    out = pair.goc_sql(
        "SELECT event_id, tower, message_id, extract(epoch FROM scanned_at),"
        " extract(epoch FROM received_at) FROM verdict_events"
        " WHERE message_id LIKE '%@internet.lab>' AND received_at > now() - interval '2 hours'"
    )
    rows = []
    for line in out.splitlines():
        event_id, tower, message_id, scanned, received = line.split("|")
        if token_of(message_id) in tokens:
            rows.append(
                {
                    "event_id": event_id,
                    "tower": tower,
                    "token": token_of(message_id),
                    "scanned_at": float(scanned),
                    "received_at": float(received),
                }
            )
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def latencies(arrivals: dict[str, list[dict]], sent: dict[str, float]) -> list[float]:
    """Seconds from submission to arrival, per token (first copy)."""
    return [min(c["mtime"] for c in arrivals[t]) - sent[t] for t in sent if t in arrivals]


def submit_spread(pair: Pair, rcpt: str, count: int, seconds: float) -> dict[str, float]:
    """Submit ``count`` messages one by one over ``seconds``; token → time submitted."""
    sent: dict[str, float] = {}
    gap = seconds / max(count, 1)
    for _ in range(count):
        (token,) = pair.submit(rcpt)
        sent[token] = time.time()
        time.sleep(gap)
    return sent
