"""Read a pyinfra inventory file of a tower without pyinfra: its groups, hosts and settings.

Used by verification (testinfra) and tools; the deploy reads the same file through pyinfra.
Both turn it into settings with :func:`tower_settings`, so they cannot disagree.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mailtower.errors import SettingsError
from mailtower.settings import TowerSettings, from_data

TOWER_GROUPS = ("relay", "monitor", "sql", "scanners")


@dataclass(frozen=True)
class InventoryHost:
    """A host as the inventory names it, with its data."""

    name: str
    data: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return str(self.data.get("address") or self.name)


@dataclass
class Inventory:
    path: Path
    groups: dict[str, list[InventoryHost]]
    group_data: dict[str, dict]

    def group(self, name: str) -> list[InventoryHost]:
        if name not in self.groups:
            raise SettingsError(
                f"{self.path}: no group {name!r} (a tower needs {', '.join(TOWER_GROUPS)})"
            )
        return self.groups[name]

    def mailtower_data(self) -> dict:
        for data in self.group_data.values():
            if "mailtower" in data:
                return dict(data["mailtower"])
        for hosts in self.groups.values():
            for h in hosts:
                if "mailtower" in h.data:
                    return dict(h.data["mailtower"])
        raise SettingsError(f"{self.path}: no 'mailtower' data in any group or host")


def tower_settings(mailtower: dict, addresses: dict[str, list[str]]) -> TowerSettings:
    """Settings of a tower: its ``mailtower`` data plus the addresses of its groups."""
    for group in ("relay", "monitor"):
        if len(addresses.get(group, [])) != 1:
            raise SettingsError(
                f"a tower has exactly one {group} host (found {len(addresses.get(group, []))})"
            )
    data = dict(mailtower)
    data["hosts"] = {
        "relay": addresses["relay"][0],
        "monitor": addresses["monitor"][0],
        "sql": addresses.get("sql", []),
        "scanners": addresses.get("scanners", []),
    }
    return from_data(data)


def load(path: Path) -> Inventory:
    """Execute an inventory file and collect its groups (lists of hosts or (hosts, data))."""
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_mt_inventory_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SettingsError(f"{path}: cannot be loaded as a Python inventory")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise SettingsError(f"{path}: the inventory fails to load: {exc}") from exc
    groups: dict[str, list[InventoryHost]] = {}
    group_data: dict[str, dict] = {}
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        data: dict = {}
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
            value, data = value
        if not isinstance(value, list):
            continue
        hosts = []
        for entry in value:
            if isinstance(entry, str):
                hosts.append(InventoryHost(entry))
            elif isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
                hosts.append(InventoryHost(entry[0], dict(entry[1])))
        groups[name] = hosts
        group_data[name] = data
    return Inventory(path, groups, group_data)


def settings_of(inv: Inventory) -> TowerSettings:
    return tower_settings(
        inv.mailtower_data(),
        {g: [h.address for h in inv.groups.get(g, [])] for g in TOWER_GROUPS},
    )
