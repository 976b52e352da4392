"""Inventory files are read the way pyinfra reads them; broken ones fail with a clear error."""

from __future__ import annotations

import pytest

from mailtower.controller import inventory
from mailtower.errors import SettingsError

GOOD = """
SECRETS = {k: "x" * 20 for k in ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication")}
relay = [("relay.t", {"address": "10.0.1.10"})]
monitor = ["10.0.1.11"]
sql = ["10.0.1.12", "10.0.1.13"]
scanners = [f"10.0.1.{100 + i}" for i in range(1, 4)]
tower = (relay + monitor + sql + scanners, {"mailtower": {
    "name": "t", "hostname": "mx.t.example", "secrets": SECRETS}})
"""


def write(tmp_path, text):
    path = tmp_path / "inventory" / "t.py"
    path.parent.mkdir()
    path.write_text(text)
    return path


def test_reads_groups_addresses_and_settings(tmp_path):
    inv = inventory.load(write(tmp_path, GOOD))
    assert [h.address for h in inv.groups["relay"]] == ["10.0.1.10"]
    assert inv.groups["relay"][0].name == "relay.t"
    s = inventory.settings_of(inv)
    assert [str(ip) for ip in s.hosts.scanners] == ["10.0.1.101", "10.0.1.102", "10.0.1.103"]


def test_syntax_error_is_reported(tmp_path):
    with pytest.raises(SettingsError, match="fails to load"):
        inventory.load(write(tmp_path, "relay = [\n"))


def test_missing_group_is_reported(tmp_path):
    inv = inventory.load(write(tmp_path, GOOD.replace('monitor = ["10.0.1.11"]', "monitor = []")))
    with pytest.raises(SettingsError, match="exactly one monitor"):
        inventory.settings_of(inv)


def test_missing_mailtower_data_is_reported(tmp_path):
    inv = inventory.load(write(tmp_path, "relay = ['10.0.0.1']\n"))
    with pytest.raises(SettingsError, match="no 'mailtower' data"):
        inventory.settings_of(inv)


def test_the_example_inventory_is_a_valid_tower(monkeypatch, tmp_path):
    import json
    from pathlib import Path

    secrets = tmp_path / "s.json"
    secrets.write_text(
        json.dumps(
            {k: "y" * 20 for k in ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication")}
        )
    )
    monkeypatch.setenv("MAILTOWER_SECRETS", str(secrets))
    root = Path(__file__).resolve().parents[2]
    s = inventory.settings_of(inventory.load(root / "inventory" / "example_tower.py"))
    assert len(s.hosts.scanners) == 23
