"""The TCP paths the design needs open between hosts: one list, from the typed settings, that
the preflight probes and docs/first-real-pair.md shows (a test keeps the two equal).

A path is checked from its source host: the preflight of a tower probes what its hosts open
(to each other and to the GOC); the GOC's preflight what the GOC and its backup host open.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from mailtower.settings import Backup, Goc, GocSettings, TowerSettings

_BACKUP_PORT = Backup.model_fields["port"].default


@dataclass(frozen=True)
class PortRule:
    """From hosts of one role to hosts of another, one port, and what uses it."""

    src: str
    dst: str
    port: Callable[[TowerSettings], int | None]  # None: not needed by these settings
    why: str


def _backup_port(s: TowerSettings) -> int | None:
    return s.backup.port if s.backup else None


def _goc_port(s: TowerSettings) -> int | None:
    return s.goc.port if s.goc else None


# Roles: relay, monitor, sql, scanners (a tower's); goc, goc_backup (the GOC's inventory).
TOWER_RULES = (
    PortRule("relay", "scanners", lambda s: s.ports.filter, "the scan hop: HAProxy to scand"),
    PortRule("scanners", "relay", lambda s: s.ports.reinject, "scanned mail back to the relay"),
    PortRule("relay", "sql", lambda s: s.ports.postgres, "Postfix's maps, the orderer"),
    PortRule("scanners", "sql", lambda s: s.ports.postgres, "verdict events, the quarantine"),
    PortRule("monitor", "sql", lambda s: s.ports.postgres, "replication state, the quarantine"),
    PortRule("sql", "sql", lambda s: s.ports.postgres, "streaming replication (either way)"),
    PortRule("scanners", "monitor", lambda s: s.ports.mirror_http, "signature and rule mirror"),
    PortRule("monitor", "relay", lambda s: s.ports.haproxy_runtime, "draining scanners"),
    PortRule("monitor", "relay", lambda s: s.ports.haproxy_stats, "HAProxy metrics"),
    PortRule("monitor", "relay", lambda s: s.ports.relay_exporter, "queue metrics"),
    PortRule("monitor", "relay", lambda s: s.ports.reinject, "quarantine releases"),
    PortRule("monitor", "scanners", lambda s: s.ports.scanner_http, "health checks, metrics"),
    PortRule(
        "monitor",
        "scanners",
        lambda s: s.ports.filter if (s.bundles or s.clamav) else None,
        "canary messages",
    ),
    PortRule("monitor", "relay", lambda s: s.ports.node_exporter, "host metrics"),
    PortRule("monitor", "scanners", lambda s: s.ports.node_exporter, "host metrics"),
    PortRule("monitor", "sql", lambda s: s.ports.node_exporter, "host metrics"),
    PortRule("monitor", "sql", _backup_port, "pgBackRest: backups"),
    PortRule("sql", "monitor", _backup_port, "pgBackRest: WAL archiving"),
    PortRule("sql", "goc", _goc_port, "config subscription (customers down)"),
    PortRule("monitor", "goc", _goc_port, "the tower's status row"),
    PortRule("monitor", "goc", lambda s: s.goc.bundle_port if s.goc else None, "bundles, ClamAV"),
    PortRule(
        "monitor",
        "goc_backup",
        lambda s: s.goc_backup_metrics.port if s.goc_backup_metrics else None,
        "the GOC backup host's metrics",
    ),
)
GOC_RULES = (
    ("goc", "sql", "events subscription (verdicts up)"),
    ("goc", "goc_backup", "pgBackRest: the GOC's backups"),
    ("goc_backup", "goc", "pgBackRest: the GOC's WAL"),
)


@dataclass(frozen=True)
class Probe:
    """One TCP connect to make from ``src`` (an address) to ``dst``:``port``."""

    src: str
    dst: str
    port: int
    why: str


def tower_probes(s: TowerSettings) -> list[Probe]:
    """Every path a tower's hosts must be able to open."""
    hosts: dict[str, list[IPv4Address]] = {
        "relay": [s.hosts.relay],
        "monitor": [s.hosts.monitor],
        "sql": list(s.hosts.sql),
        "scanners": list(s.hosts.scanners),
        "goc": [s.goc.address] if s.goc else [],
        "goc_backup": [s.goc_backup_metrics.address] if s.goc_backup_metrics else [],
    }
    out = []
    for rule in TOWER_RULES:
        port = rule.port(s)
        if port is None:
            continue
        for src in hosts[rule.src]:
            out += [
                Probe(str(src), str(dst), port, rule.why) for dst in hosts[rule.dst] if dst != src
            ]
    return out


def goc_probes(g: GocSettings, goc: str, backup: str | None) -> list[Probe]:
    """Every path the GOC (and its backup host) must be able to open."""
    out = [
        Probe(goc, str(ip), 5432, GOC_RULES[0][2]) for t in g.towers for ip in t.sql
    ]  # a tower's SQL port is the default: the GOC's settings do not hold it
    if g.backup is not None and backup:
        out.append(Probe(goc, backup, g.backup.port, GOC_RULES[1][2]))
        out.append(Probe(backup, goc, g.backup.port, GOC_RULES[2][2]))
    return out


def matrix() -> list[tuple[str, str, int, str]]:
    """(from, to, port, what uses it) with the default ports, as the guide shows them."""
    rows = [(rule.src, rule.dst, _default_port(rule), rule.why) for rule in TOWER_RULES]
    rows.append(("goc", "sql", 5432, GOC_RULES[0][2]))
    rows += [(src, dst, _BACKUP_PORT, why) for src, dst, why in GOC_RULES[1:]]
    return rows


def _default_port(rule: PortRule) -> int:
    """The rule's port in a tower with every optional part (GOC, bundles, backups) set."""
    from mailtower.settings import Bundles, GocBackupMetrics, Secrets

    sample = TowerSettings.model_construct(
        ports=TowerSettings.model_fields["ports"].default,
        goc=Goc.model_construct(**{k: f.default for k, f in Goc.model_fields.items()}),
        bundles=Bundles.model_construct(),
        clamav=None,
        backup=Backup.model_construct(port=_BACKUP_PORT),
        goc_backup_metrics=GocBackupMetrics.model_construct(port=9100),
        secrets=Secrets.model_construct(),
    )
    port = rule.port(sample)
    assert port is not None
    return port


def markdown_matrix() -> str:
    rows = ["| from | to | TCP port | for |", "|---|---|---|---|"]
    rows += [f"| {src} | {dst} | {port} | {why} |" for src, dst, port, why in matrix()]
    return "\n".join(rows)
