"""A GOC and towers as local PostgreSQL clusters, with the tower schema of the real template;
used by tests/unit/test_sync_*.py and tests/bench/sync_bench.py."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pgclusters import Cluster, make_workdir

from mailtower.goc.sync import (
    ensure_goc,
    ensure_goc_subscription,
    ensure_tower,
    names,
    wait_ready,
)
from mailtower.scand.events import Event, PostgresSink

TOWER_SCHEMA = Path(__file__).resolve().parents[1] / "templates/sql/etc/mailtower/sql/schema.sql.j2"
GOC_SYNC_PASSWORD = "goc-sync-password-0123"
TOWER_SYNC_PASSWORD = "tower-sync-password-0123"
SCANNER_PASSWORD = "scanner-password-0123"


def apply_tower_schema(cluster: Cluster) -> None:
    """The tower's schema exactly as roles/sql.py applies it (with the roles it grants to)."""
    with cluster.connect() as conn:
        for role in ("mailtower_relay", "mailtower_scanner", "mailtower_monitor"):
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{SCANNER_PASSWORD}'")
        conn.execute(TOWER_SCHEMA.read_text())


@dataclass
class Tower:
    name: str
    primary: Cluster
    standby: Cluster | None = None

    def conninfo(self, cluster: Cluster | None = None) -> str:
        """The (current) primary as the GOC reaches it, as mt_sync."""
        return (cluster or self.primary).conninfo(names.SYNC_ROLE, TOWER_SYNC_PASSWORD)

    def scanner_dsn(self) -> str:
        """What a scanner's PostgresSink uses: both SQL hosts, the writable one wins."""
        hosts = [self.primary] + ([self.standby] if self.standby else [])
        return (
            f"host={','.join('127.0.0.1' for _ in hosts)}"
            f" port={','.join(str(c.port) for c in hosts)} dbname=mailtower"
            f" user=mailtower_scanner password={SCANNER_PASSWORD}"
            " target_session_attrs=read-write connect_timeout=2"
        )


@dataclass
class SyncLab:
    workdir: Path
    goc: Cluster
    towers: dict[str, Tower] = field(default_factory=dict)

    @classmethod
    def create(
        cls, tower_names: Sequence[str], *, standby_for: Sequence[str] = (), **conf: str
    ) -> SyncLab:
        workdir = make_workdir()
        lab = cls(workdir, Cluster.create("goc", workdir, **conf))
        try:
            for name in tower_names:
                primary = Cluster.create(f"{name}-sql1", workdir, **conf)
                apply_tower_schema(primary)
                tower = Tower(name, primary)
                if name in standby_for:
                    tower.standby = primary.standby(f"{name}-sql2", workdir)
                lab.towers[name] = tower
        except BaseException:
            lab.destroy()
            raise
        return lab

    def goc_conninfo(self) -> str:
        return self.goc.conninfo(names.SYNC_ROLE, GOC_SYNC_PASSWORD)

    def ensure_all(self) -> None:
        """Every sync object, then wait until every subscription copied its tables."""
        ensure_goc(self.goc.dsn(), sync_password=GOC_SYNC_PASSWORD)
        for tower in self.towers.values():
            ensure_tower(
                tower.primary.dsn(),
                self.goc_conninfo(),
                tower.name,
                sync_password=TOWER_SYNC_PASSWORD,
            )
            ensure_goc_subscription(self.goc.dsn(), tower.name, tower.conninfo())
        for tower in self.towers.values():
            wait_ready(tower.primary.dsn(), names.config_subscription(tower.name), timeout_s=30)
            wait_ready(self.goc.dsn(), names.events_subscription(tower.name), timeout_s=30)

    def destroy(self) -> None:
        clusters = [self.goc] + [
            c for t in self.towers.values() for c in (t.primary, t.standby) if c is not None
        ]
        for cluster in clusters:
            cluster.destroy()
        shutil.rmtree(self.workdir, ignore_errors=True)


def make_events(tower: str, count: int, *, scanner: str = "s01") -> list[Event]:
    return [
        Event(
            tower=tower,
            scanner=scanner,
            verdict="virus" if i % 10 == 0 else "clean",
            sender=f"sender{i}@example.org",
            recipients=[f"rcpt{i}@customer.example"],
            size_bytes=1000 + i,
            message_id=f"<{uuid.uuid4()}@example.org>",
            findings=[{"engine": "clamd", "name": "Eicar-Test-Signature"}] if i % 10 == 0 else [],
        )
        for i in range(count)
    ]


def flush_events(tower: Tower, events: Sequence[Event], *, batch: int = 500) -> None:
    """Store events the way scanners do (PostgresSink: one transaction per batch)."""
    sink = PostgresSink(tower.scanner_dsn())
    try:
        for start in range(0, len(events), batch):
            sink(events[start : start + batch])
    finally:
        sink.close()


def add_customer(goc: Cluster, domain: str, server: str = "192.0.2.25") -> int:
    """A customer with one domain, its route, a policy and a recipient, at the GOC; returns
    its id."""
    with goc.connect() as conn, conn.transaction():
        row = conn.execute(
            "INSERT INTO customers (name) VALUES (%s) RETURNING id", (domain,)
        ).fetchone()
        assert row is not None
        conn.execute("INSERT INTO domains (name, customer_id) VALUES (%s, %s)", (domain, row[0]))
        conn.execute(
            "INSERT INTO routes (domain, transport) VALUES (%s, %s)",
            (domain, f"smtp:[{server}]:25"),
        )
        conn.execute(
            "INSERT INTO policies (customer_id, policy) VALUES (%s, %s)",
            (row[0], '{"ban_extensions": ["exe", "scr"]}'),
        )
        conn.execute(
            "INSERT INTO recipients (address, domain) VALUES (%s, %s)", (f"user@{domain}", domain)
        )
    return int(row[0])


def route_of(cluster: Cluster, domain: str) -> str | None:
    value = cluster.scalar("SELECT transport FROM routes WHERE domain = %s", domain)
    return None if value is None else str(value)
