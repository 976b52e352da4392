"""The SQL pair's operator commands: promote the standby (failover), rebuild a standby.

Promotion is one command, run by an operator (``invoke sql.failover --tower T``), not
automatic. A pair of two servers cannot tell "the primary is dead" from "I am cut off from it":
automatic promotion needs a third voter (Patroni with an etcd/Consul quorum on three hosts),
which a tower does not have; without it, a network split makes two primaries that both take
events (split brain). The monitor alerts on a primary that stopped answering
(``SqlStandbyNotStreaming``: "the SQL primary is down or no standby streams from it"); the
relay keeps routing meanwhile (its maps read either host) and the scanners spool their events
until a primary takes them. The command:

1. finds each SQL host's role (primary / standby / down), asking it over SSH;
2. fences the old primary if it still runs (stops PostgreSQL; a down host stays down);
3. promotes the standby and waits until it takes writes;
4. re-points the sync: ``mailtower sync tower`` on the new primary (config subscription at a
   consistent point of the GOC), then ``mailtower sync goc`` at the GOC (its events
   subscription follows the new primary; the events it lacked are copied by id, none twice).

``invoke sql.rebuild --tower T --host H`` then makes the old primary a standby of the new one
(a fresh clone), and the inventory's ``sql`` order should be swapped before the next deploy
(the first host is the primary the deploy expects).

Both commands end by reloading Postfix on the tower's relay. Its maps read SQL through
proxymap, which keeps its connections open; a connection to a host that restarted fails at
its next query, and Postfix 3.7's pgsql client then keeps that host out for a fixed 60 s
(``retry_interval`` is settable only from Postfix 3.9). When both hosts restarted within that
minute (a failover, a rebuild, a switch back) every lookup failed: the relay answered 451 at
RCPT for up to a minute (seen in the pair suite). A reload starts new proxymap processes with
fresh connections and no host held out.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailtower.controller import inventory as inventory_mod
from mailtower.controller.errors import PairError

SERVICE = "postgresql@15-main"
DATA = "/var/lib/postgresql/15/main"
# Undo a restore's fence (mailtower.controller.backup.fence: PostgreSQL disabled, stopped and
# masked) on a host that is to run PostgreSQL again: rebuild, or a restore onto it.
UNFENCE = (
    f"systemctl unmask {SERVICE} && systemctl unmask --runtime {SERVICE}"
    f" && systemctl enable {SERVICE}"
)
TOOL = "/opt/mailtower/venv/bin/mailtower"

Say = Callable[[str], None]


def clone_commands(primary: str, port: int, slot: str) -> list[str]:
    """Replace this host's data with a fresh clone of ``primary``, streaming from slot ``slot``
    (the deploy's first clone of a standby and ``rebuild`` alike)."""
    return [
        f"systemctl stop {SERVICE}",
        f"rm -rf {DATA}",
        f"cd /tmp && su postgres -c 'pg_basebackup -h {primary} -p {port} -U replicator"
        f" -D {DATA} -R -X stream -c fast -C -S {slot} --no-password'",
    ]


def standby_slot(address: str) -> str:
    """The primary's physical slot for the standby at ``address`` (keeps WAL until it has it)."""
    return "standby_" + address.replace(".", "_")


@dataclass(frozen=True)
class Remote:
    """A host of an inventory, reached with the SSH settings its inventory gives."""

    address: str
    user: str = "root"
    key: str | None = None
    known_hosts: str | None = None

    @classmethod
    def of(cls, host: inventory_mod.InventoryHost) -> Remote:
        data = host.data
        return cls(
            host.address,
            str(data.get("ssh_user", "root")),
            data.get("ssh_key"),
            data.get("ssh_known_hosts_file"),
        )

    def run(self, command: str, *, timeout: float = 120, check: bool = True) -> str:
        args = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
        if self.key:
            args += ["-i", self.key]
        if self.known_hosts:
            args += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
            args += ["-o", "StrictHostKeyChecking=yes"]
        args += [f"{self.user}@{self.address}", command]
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise PairError(f"{self.address}: `{command}` took over {timeout:.0f} s") from exc
        if check and done.returncode != 0:
            raise PairError(
                f"{self.address}: `{command}` failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-800:]}"
            )
        return done.stdout.strip()

    def psql(self, query: str, database: str = "postgres") -> str:
        inner = f"psql -X -q -tA -d {database} -c {shlex.quote(query)}"
        return self.run(f"cd /tmp && su postgres -c {shlex.quote(inner)}", timeout=30)


def role_of(remote: Remote) -> str:
    """``primary``, ``standby`` or ``down`` (PostgreSQL not answering, or the host unreachable)."""
    try:
        recovery = remote.psql("SELECT pg_is_in_recovery()")
    except PairError:
        return "down"
    return "standby" if recovery == "t" else "primary"


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise PairError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


@dataclass(frozen=True)
class SqlTower:
    """A tower's SQL hosts and its GOC, from the inventories."""

    name: str
    sql: list[Remote]
    port: int
    goc: Remote | None
    relays: tuple[Remote, ...] = ()

    @classmethod
    def load(cls, inventory: Path, goc_inventory: Path | None) -> SqlTower:
        inv = inventory_mod.load(inventory)
        settings = inventory_mod.settings_of(inv)
        goc = None
        if goc_inventory is not None:
            hosts = inventory_mod.load(goc_inventory).groups.get("goc", [])
            if not hosts:
                raise PairError(f"{goc_inventory}: no host in group goc")
            goc = Remote.of(hosts[0])
        elif settings.goc is not None:
            raise PairError(
                f"tower {settings.name} syncs with the GOC {settings.goc.address}: give the GOC's"
                " inventory (--goc) so its subscription can be re-pointed"
            )
        return cls(
            settings.name,
            [Remote.of(h) for h in inv.groups["sql"]],
            settings.ports.postgres,
            goc,
            tuple(Remote.of(h) for h in inv.groups.get("relay", [])),
        )

    def roles(self) -> dict[str, str]:
        return {r.address: role_of(r) for r in self.sql}

    def renew_relay_maps(self, say: Say) -> None:
        """Reload Postfix on each relay: its SQL map connections start afresh (module doc).
        A relay that cannot be reached is said, not raised: the SQL step itself is done."""
        for relay in self.relays:
            try:
                relay.run("postfix reload", timeout=60)
            except PairError as exc:
                say(
                    f"{self.name}: WARNING: could not reload Postfix on the relay {relay.address}"
                    f" ({exc}); its SQL lookups may fail for up to 60 s: run `postfix reload`"
                    " there"
                )
            else:
                say(f"{self.name}: relay {relay.address}: Postfix reloaded (fresh SQL connections)")


def failover(tower: SqlTower, say: Say) -> dict[str, float]:
    """Promote the standby; re-point the sync. Returns the seconds each step took."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    roles = tower.roles()
    say(f"{tower.name}: SQL hosts {', '.join(f'{a} {r}' for a, r in roles.items())}")
    standbys = [r for r in tower.sql if roles[r.address] == "standby"]
    if not standbys:
        raise PairError(
            f"{tower.name}: no standby to promote ({roles}); if a promoted host already"
            " answers, run the sync steps again: invoke deploy, or `mailtower sync tower` on it"
            " and `mailtower sync goc` at the GOC"
        )
    new = standbys[0]
    for old in tower.sql:
        if old is new or roles[old.address] == "down":
            continue
        say(f"{tower.name}: fencing the old primary {old.address} (stopping PostgreSQL)")
        old.run(f"systemctl stop {SERVICE}")
        if role_of(old) != "down":
            raise PairError(f"{old.address}: PostgreSQL still answers after the stop; fence it")
    timings["fence_s"] = time.monotonic() - started
    say(f"{tower.name}: promoting {new.address}")
    new.run("pg_ctlcluster 15 main promote", timeout=60)
    _wait(lambda: role_of(new) == "primary", 60, f"{new.address} to take writes")
    timings["promoted_s"] = time.monotonic() - started
    # The relay needs only SQL: its lookups resume now, not after the sync steps (minutes with
    # many customers, and they may fail on an unreachable GOC).
    tower.renew_relay_maps(say)
    resync(tower, new, say, timings, started)
    say(
        f"{tower.name}: {new.address} is the primary ({timings['promoted_s']:.1f} s to promote,"
        f" {time.monotonic() - started:.1f} s in all). Next: invoke sql.rebuild --tower"
        f" {tower.name} --host <old primary>, and list {new.address} first in the inventory's"
        " sql group"
    )
    return timings


def resync(
    tower: SqlTower, new: Remote, say: Say, timings: dict[str, float], started: float
) -> None:
    """Re-point the sync at a new primary (a promoted standby, a restored host): the
    configuration subscription on it, then the GOC's events subscription."""
    if tower.goc is None:
        return
    say(f"{tower.name}: re-subscribing the configuration on {new.address}")
    say(new.run(f"cd /tmp && su postgres -c '{TOOL} sync tower'", timeout=300))
    timings["config_resubscribed_s"] = time.monotonic() - started
    say(f"{tower.name}: re-pointing the GOC's events subscription ({tower.goc.address})")
    say(tower.goc.run(f"cd /tmp && su postgres -c '{TOOL} sync goc'", timeout=600))
    timings["goc_repointed_s"] = time.monotonic() - started


def rebuild(tower: SqlTower, address: str, say: Say) -> float:
    """Make ``address`` a fresh standby of the current primary; returns the seconds it took."""
    started = time.monotonic()
    target = next((r for r in tower.sql if r.address == address), None)
    if target is None:
        raise PairError(f"{tower.name}: {address} is not one of its SQL hosts")
    roles = tower.roles()
    primary = next((r for r in tower.sql if roles[r.address] == "primary"), None)
    if primary is None or primary is target:
        raise PairError(
            f"{tower.name}: rebuild needs another host as the primary ({roles}); promote first"
        )
    slot = standby_slot(address)
    # A slot left from an earlier clone would make pg_basebackup -C fail; an active one is used.
    primary.psql(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
        f" WHERE slot_name = '{slot}' AND NOT active"
    )
    say(f"{tower.name}: cloning {address} from the primary {primary.address}")
    target.run(UNFENCE)  # a restore fenced it (backup.fence); it runs again as a standby
    for command in clone_commands(primary.address, tower.port, slot):
        target.run(command, timeout=600)
    target.run(f"systemctl start {SERVICE}")
    _wait(lambda: role_of(target) == "standby", 60, f"{address} to run as a standby")
    _wait(
        lambda: (
            primary.psql(
                f"SELECT count(*) FROM pg_stat_replication WHERE client_addr = '{address}'"
            )
            == "1"
        ),
        60,
        f"{address} streaming from {primary.address}",
    )
    tower.renew_relay_maps(say)
    elapsed = time.monotonic() - started
    say(f"{tower.name}: {address} streams from {primary.address} ({elapsed:.1f} s)")
    return elapsed
