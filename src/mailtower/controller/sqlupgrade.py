"""A PostgreSQL minor upgrade of a tower's SQL pair: the standby first, then a planned
switchover, then the old primary (``invoke sql.upgrade --tower T``).

1. check the pair: one primary, one standby streaming from it;
2. upgrade the standby's packages (Debian restarts it; it streams again);
3. stop the primary cleanly (``pg_ctlcluster … stop -m fast``: a shutdown checkpoint, every
   WAL record sent to the standby) and wait until the standby has replayed that checkpoint —
   nothing committed is lost; if it does not within a minute, the old primary is started
   again and the command stops;
4. promote the upgraded standby (sqlpair.failover: the relays' maps renewed, the GOC's sync
   re-pointed);
5. clone the old primary afresh as a standby of the new one (sqlpair.rebuild) — before its
   packages change, so Debian's restart can only start it as a standby, never as a second
   primary — then upgrade its packages and wait until it streams again.

The relay keeps routing through it all (its maps read either host); scanners spool their
verdict events while no primary takes them. Afterwards the inventory's ``sql`` group must
list the new primary first (the deploy expects the primary there), as after a failover.
"""

from __future__ import annotations

import shlex
import time

from mailtower.controller import sqlpair
from mailtower.controller.errors import PairError

PACKAGES = ("postgresql-15", "postgresql-client-15", "libpq5")
PG_BIN = "/usr/lib/postgresql/15/bin"
CATCH_UP_S = 60.0


def upgrade_command(packages: tuple[str, ...]) -> str:
    """Upgrade ``packages`` to the newest the host's apt sources offer (installed ones only)."""
    names = " ".join(shlex.quote(p) for p in packages)
    return (
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -q -y"
        f" --only-upgrade -o Dpkg::Options::=--force-confold {names}"
    )


def versions(remote: sqlpair.Remote, packages: tuple[str, ...]) -> str:
    query = "dpkg-query -W -f '${Package}=${Version} ' " + " ".join(packages)
    return remote.run(query, check=False) or "?"


def streaming(primary: sqlpair.Remote, standby: sqlpair.Remote) -> bool:
    count = primary.psql(
        "SELECT count(*) FROM pg_stat_replication"
        f" WHERE client_addr = '{standby.address}' AND state = 'streaming'"
    )
    return count == "1"


def checkpoint_of_stopped(remote: sqlpair.Remote) -> str:
    """The last checkpoint of a cleanly stopped cluster (pg_controldata), an LSN."""
    inner = f"{PG_BIN}/pg_controldata -D {sqlpair.DATA}"
    out = remote.run(f"cd /tmp && su postgres -c {shlex.quote(inner)}")
    state = lsn = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Database cluster state":
            state = value.strip()
        elif key.strip() == "Latest checkpoint location":
            lsn = value.strip()
    if state != "shut down" or not lsn:
        raise PairError(
            f"{remote.address}: PostgreSQL is not cleanly shut down (pg_controldata says"
            f" {state!r}); start it again (systemctl start {sqlpair.SERVICE}) and look at why"
        )
    return lsn


def upgrade(
    tower: sqlpair.SqlTower,
    say: sqlpair.Say,
    packages: tuple[str, ...] = PACKAGES,
    catch_up_s: float = CATCH_UP_S,
) -> dict[str, float]:
    """The standby, a planned switchover, the old primary (module doc). Returns timings."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    roles = tower.roles()
    primary = next((r for r in tower.sql if roles[r.address] == "primary"), None)
    standby = next((r for r in tower.sql if roles[r.address] == "standby"), None)
    if primary is None or standby is None or not streaming(primary, standby):
        raise PairError(
            f"{tower.name}: a planned upgrade needs a primary and a standby streaming from it"
            f" ({roles}); rebuild the standby first: invoke sql.rebuild --tower {tower.name}"
            " --host <standby>"
        )
    say(f"{tower.name}: standby {standby.address}: {versions(standby, packages)}")
    standby.run(upgrade_command(packages), timeout=900)
    standby.run(f"systemctl start {sqlpair.SERVICE}")
    sqlpair._wait(lambda: streaming(primary, standby), 120, f"{standby.address} streaming again")
    say(f"{tower.name}: standby {standby.address} upgraded: {versions(standby, packages)}")
    timings["standby_upgraded_s"] = time.monotonic() - started

    say(f"{tower.name}: stopping the primary {primary.address} cleanly")
    primary.run("pg_ctlcluster 15 main stop -m fast", timeout=300)
    lsn = checkpoint_of_stopped(primary)
    deadline = time.monotonic() + catch_up_s
    while standby.psql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") != "t":
        if time.monotonic() > deadline:
            primary.run(f"systemctl start {sqlpair.SERVICE}")
            raise PairError(
                f"{tower.name}: the standby {standby.address} did not replay the primary's"
                f" last checkpoint {lsn} within {catch_up_s:.0f} s; the primary"
                f" {primary.address} was started again, nothing switched. Look at the"
                " standby's log (journalctl -u postgresql@15-main) and run sql.upgrade again"
            )
        time.sleep(0.5)
    timings["primary_stopped_s"] = time.monotonic() - started
    say(f"{tower.name}: {standby.address} has everything up to {lsn}; switching over")
    sqlpair.failover(tower, say)
    timings["switched_over_s"] = time.monotonic() - started

    sqlpair.rebuild(tower, primary.address, say)
    primary.run(upgrade_command(packages), timeout=900)
    primary.run(f"systemctl start {sqlpair.SERVICE}")
    sqlpair._wait(lambda: streaming(standby, primary), 120, f"{primary.address} streaming again")
    say(f"{tower.name}: {primary.address} upgraded: {versions(primary, packages)}")
    timings["done_s"] = time.monotonic() - started
    say(
        f"{tower.name}: {standby.address} is the primary, {primary.address} its standby"
        f" ({timings['done_s']:.0f} s). Next: list {standby.address} first in the"
        " inventory's sql group"
    )
    return timings
