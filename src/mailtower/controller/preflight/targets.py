"""What to check, from inventories: a tower's hosts (with the paths they open, the names the
relay resolves) or a GOC's (with its way out to the ClamAV upstream)."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

from mailtower.controller import inventory as inventory_mod
from mailtower.controller.errors import PreflightError
from mailtower.controller.preflight import ports
from mailtower.controller.preflight.checks import HostCheck
from mailtower.controller.preflight.runner import ScriptRunner, SshRunner
from mailtower.controller.preflight.sizing import SIZING, size_of
from mailtower.errors import SettingsError
from mailtower.settings import GocSettings, validate

# How a host is reached (its inventory name, its data): SshRunner.of unless a test says.
Maker = Callable[[str, dict], ScriptRunner]


def _runner(host: inventory_mod.InventoryHost, make: Maker | None = None) -> ScriptRunner:
    """SSH as the deploy (pyinfra) logs in: by the host's name, not its ``address`` (which
    only the probes use)."""
    return (make or SshRunner.of)(host.name, host.data)


def _sizing(host: inventory_mod.InventoryHost, path: Path) -> str:
    profile = str(host.data.get("preflight_sizing", "production"))
    if profile not in SIZING:
        raise PreflightError(
            f"{path}: host {host.name}: preflight_sizing {profile!r} is not one of {sorted(SIZING)}"
        )
    return profile


def tower_targets(path: Path, make: Maker | None = None) -> tuple[list[HostCheck], dict[str, str]]:
    """The tower's hosts to check, and its relay's MX name → address."""
    try:
        inv = inventory_mod.load(path)
        s = inventory_mod.settings_of(inv)
    except SettingsError as exc:
        raise PreflightError(f"{path}: {exc}") from exc
    probes = ports.tower_probes(s)
    names = [c.server for c in s.customers if not _is_ip(c.server)]
    targets = []
    for role in inventory_mod.TOWER_GROUPS:
        for host in inv.groups.get(role, []):
            targets.append(
                HostCheck(
                    host.address,
                    role,
                    size_of(_sizing(host, path), role),
                    _runner(host, make),
                    [p for p in probes if p.src == host.address],
                    # the relay delivers to customers' servers by name
                    names if role == "relay" else [],
                )
            )
    return targets, {s.hostname: str(s.hosts.relay)}


def goc_targets(
    path: Path, make: Maker | None = None, towers: set[str] | None = None
) -> list[HostCheck]:
    """The GOC and its backup repository host; ``towers``: the towers whose SQL it probes
    (None: every tower of its data; a lab of one tower has no other's hosts)."""
    try:
        inv = inventory_mod.load(path)
    except SettingsError as exc:
        raise PreflightError(str(exc)) from exc
    hosts = inv.groups.get("goc") or []
    if not hosts:
        raise PreflightError(f"{path}: no host in group goc")
    goc_host = hosts[0]
    data = inv.group_data.get("goc", {}).get("goc") or goc_host.data.get("goc")
    try:
        g = validate(GocSettings, data, f"{path}: 'goc' data")
    except SettingsError as exc:
        raise PreflightError(str(exc)) from exc
    if towers is not None:
        g = g.model_copy(update={"towers": [t for t in g.towers if t.name in towers]})
    backups = inv.groups.get("goc_backup", [])
    backup = backups[0].address if backups else None
    probes = ports.goc_probes(g, goc_host.address, backup)
    targets = [
        HostCheck(
            goc_host.address,
            "goc",
            size_of(_sizing(goc_host, path), "goc"),
            _runner(goc_host, make),
            [p for p in probes if p.src == goc_host.address],
            way_out=g.clamav.url if g.clamav else None,
        )
    ]
    for host in backups:
        targets.append(
            HostCheck(
                host.address,
                "goc_backup",
                size_of(_sizing(host, path), "goc_backup"),
                _runner(host, make),
                [p for p in probes if p.src == host.address],
            )
        )
    return targets


def targets_of(
    paths: list[Path], make: Maker | None = None, goc_towers: set[str] | None = None
) -> tuple[list[HostCheck], dict[str, str]]:
    """Every host of these inventories (towers and GOCs), and the relays' MX names;
    ``goc_towers``: the towers a GOC's probes reach (None: all of its data's)."""
    targets: list[HostCheck] = []
    mx: dict[str, str] = {}
    for path in paths:
        try:
            inv = inventory_mod.load(path)
        except SettingsError as exc:
            raise PreflightError(
                f"{exc}; fix: --tower names inventory/<tower>.py (dashes as underscores), a"
                " tower's or a GOC's inventory that loads (`mailtower init` writes them)"
            ) from exc
        if inv.groups.get("goc"):
            targets += goc_targets(path, make, goc_towers)
        elif not any(inv.groups.get(g) for g in inventory_mod.TOWER_GROUPS):
            raise PreflightError(
                f"{path}: neither a tower's inventory (groups"
                f" {', '.join(inventory_mod.TOWER_GROUPS)}) nor a GOC's (group goc); fix: give"
                " --tower a tower's or a GOC's name"
            )
        else:
            more, names = tower_targets(path, make)
            targets += more
            mx.update(names)
    return targets, mx


def _is_ip(value: str) -> bool:
    try:
        IPv4Address(value)
    except ValueError:
        return False
    return True
