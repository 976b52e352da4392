"""Fail closed (docs/design.md invariant 2), on a real scanner: clamd down or hung means 451, and
only the relay may hand a scanner mail."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from towerlib import wait_for

SEND = r"""
import smtplib
s = smtplib.SMTP("%(host)s", %(port)d, timeout=%(timeout)d)
s.ehlo("relay.check")
try:
    s.sendmail("sender@internet.lab", ["%(rcpt)s"], b"Subject: fail-closed check\r\n\r\nhello\r\n")
    print(250)
except smtplib.SMTPResponseException as e:
    print(e.smtp_code)
"""


def _send_from_relay(tower, scanner: str, rcpt: str) -> tuple[int, float]:
    s = tower.settings
    script = SEND % {
        "host": scanner,
        "port": s.ports.filter,
        "rcpt": rcpt,
        "timeout": int(s.limits.engine_timeout_s) + 60,
    }
    started = time.monotonic()
    out = tower.relay().check_output("python3 - <<'PY'\n%s\nPY" % script)
    return int(out.strip().splitlines()[-1]), time.monotonic() - started


@pytest.fixture
def scanner(tower):
    """The third scanner, given back healthy and enabled after the test."""
    entry = tower.hosts("scanners")[2]
    node = tower.node(entry.name)
    yield entry, node
    node.run("pkill -CONT -x clamd")
    node.check_output("systemctl start clamav-daemon.socket clamav-daemon.service")
    name = tower.settings.scanner_name(2)
    wait_for(lambda: tower.pool()[name]["enabled"], 60, f"{name} back in the pool")


def test_clamd_down_means_tempfail(tower, mail, scanner):
    entry, node = scanner
    node.check_output("systemctl stop clamav-daemon.socket clamav-daemon.service")
    code, _ = _send_from_relay(tower, entry.address, mail.rcpt())
    assert code == 451


def test_clamd_hung_means_tempfail_after_the_engine_timeout(tower, mail, scanner):
    entry, node = scanner
    node.check_output("pkill -STOP -x clamd")
    code, elapsed = _send_from_relay(tower, entry.address, mail.rcpt())
    assert code == 451
    assert elapsed >= tower.settings.limits.engine_timeout_s * 0.9


def test_scanner_refuses_mail_from_anyone_but_the_relay(tower):
    address = tower.hosts("scanners")[0].address
    with (
        pytest.raises(OSError),
        socket.create_connection((address, tower.settings.ports.filter), timeout=5) as c,
    ):
        if not c.recv(100):
            raise ConnectionResetError("closed without a greeting")


def test_scanner_health_is_for_the_monitor_only(tower):
    address = tower.hosts("scanners")[0].address
    done = subprocess.run(
        ["curl", "-sS", "-m", "5", f"http://{address}:{tower.settings.ports.scanner_http}/health"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
