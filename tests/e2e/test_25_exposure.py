"""Operator interfaces answer where operators are (issue 15: the monitor too open): from a
host on the internet, SSH on every kind of tower host, the monitor's Prometheus, Alertmanager,
its pool API, the mirror and the node exporters are refused; from the operator's network (this
controller) they answer, but for the mirror and node exporters (the tower's own hosts only)."""

from __future__ import annotations

import socket

import pytest


def _targets(s) -> dict[str, tuple[str, int]]:
    return {
        "relay ssh": (str(s.hosts.relay), 22),
        "monitor ssh": (str(s.hosts.monitor), 22),
        "sql ssh": (str(s.sql_primary), 22),
        "scanner ssh": (str(s.hosts.scanners[0]), 22),
        "monitor prometheus": (str(s.hosts.monitor), s.ports.prometheus),
        "monitor pool api": (str(s.hosts.monitor), s.ports.monitor_http),
        "monitor mirror": (str(s.hosts.monitor), s.ports.mirror_http),
        "monitor alertmanager": (str(s.hosts.monitor), s.ports.alertmanager),
        "relay node exporter": (str(s.hosts.relay), s.ports.node_exporter),
        "scanner node exporter": (str(s.hosts.scanners[0]), s.ports.node_exporter),
    }


TARGETS = [
    "relay ssh",
    "monitor ssh",
    "sql ssh",
    "scanner ssh",
    "monitor prometheus",
    "monitor pool api",
    "monitor mirror",
    "monitor alertmanager",
    "relay node exporter",
    "scanner node exporter",
]
# For the tower's own hosts only: the mirror (scanners), host metrics (the monitor).
NOT_FOR_OPERATORS = {"monitor mirror", "relay node exporter", "scanner node exporter"}


@pytest.fixture(scope="module")
def outsider(tower):
    """A host on the internet side that is not an operator: the lab's first customer server."""
    customers = tower.hosts("customers")
    if not customers:
        pytest.skip("the inventory has no customers group (a host outside the tower)")
    return tower.node(customers[0].name)


@pytest.mark.parametrize("what", TARGETS)
def test_refused_from_the_internet(tower, outsider, what):
    address, port = _targets(tower.settings)[what]
    if not tower.settings.operator_networks and port == 22:
        pytest.skip("the tower lists no operator networks: SSH is not restricted")
    probe = (
        f"timeout 5 bash -c 'exec 3<>/dev/tcp/{address}/{port}' 2>/dev/null "
        "&& echo open || echo closed"
    )
    assert outsider.check_output(probe) == "closed", f"{what} ({address}:{port}) answers anyone"


@pytest.mark.parametrize("what", [t for t in TARGETS if t not in NOT_FOR_OPERATORS])
def test_answers_the_operator(tower, what):
    """The mirror and the node exporters are left out: they are for the tower's own hosts."""
    if what == "monitor alertmanager" and tower.settings.alerts is None:
        pytest.skip("this tower runs no Alertmanager (no alerts settings)")
    address, port = _targets(tower.settings)[what]
    with socket.create_connection((address, port), timeout=5):
        pass
