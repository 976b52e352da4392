"""The verification's SSH login (tests/towerlib.py) uses the inventory's key alone when it
gives one, else the operator's SSH agent, as pyinfra and the preflight do."""

from __future__ import annotations

import sys
from pathlib import Path

import paramiko
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import towerlib  # noqa: E402


class _Client:
    seen: dict = {}

    def load_host_keys(self, path):  # type: ignore[no-untyped-def]
        pass

    def load_system_host_keys(self):  # type: ignore[no-untyped-def]
        pass

    def set_missing_host_key_policy(self, policy):  # type: ignore[no-untyped-def]
        pass

    def connect(self, hostname, **kw):  # type: ignore[no-untyped-def]
        _Client.seen = {"hostname": hostname, **kw}


class _Entry:
    def __init__(self, data: dict) -> None:
        self.name = "relay.example.net"
        self.data = data


@pytest.mark.parametrize(
    ("data", "agent"),
    [({"ssh_key": "/keys/id_ed25519"}, False), ({}, True)],
)
def test_the_inventorys_key_alone_else_the_agent(monkeypatch, data, agent) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(paramiko, "SSHClient", _Client)
    hosts = towerlib.Hosts.__new__(towerlib.Hosts)
    monkeypatch.setattr(hosts, "entry", lambda name: _Entry(data), raising=False)
    hosts._connect("relay.example.net")
    assert _Client.seen["allow_agent"] is agent
    assert _Client.seen["look_for_keys"] is agent
    assert _Client.seen["key_filename"] == data.get("ssh_key")
