"""The SQL pair's operator commands on fake hosts: which host is promoted, fenced or refused.
(The lab proves them on real PostgreSQL: tests/pair/test_60_sql_failover.py.)"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mailtower.controller import sqlpair


@dataclass(frozen=True)
class FakeHost(sqlpair.Remote):
    state: dict = field(default_factory=dict, compare=False, hash=False)

    def run(self, command: str, *, timeout: float = 120, check: bool = True) -> str:
        self.state.setdefault("log", []).append((self.address, command))
        if "systemctl stop" in command and not self.state.get("unkillable"):
            self.state[self.address] = "down"
        elif "promote" in command:
            self.state[self.address] = "primary"
        return "done"

    def psql(self, query: str, database: str = "postgres") -> str:
        role = self.state[self.address]
        if role == "down":
            raise sqlpair.PairError(f"{self.address}: psql: connection refused")
        return "t" if role == "standby" else "f"


def pair(state: dict, goc: bool = True) -> sqlpair.SqlTower:
    hosts = [FakeHost("10.0.0.12", state=state), FakeHost("10.0.0.13", state=state)]
    return sqlpair.SqlTower(
        "tower-a",
        hosts,
        5432,
        FakeHost("10.0.9.10", state=state) if goc else None,
        (FakeHost("10.0.0.10", state=state),),
    )


def commands(state: dict, address: str) -> list[str]:
    return [c for a, c in state["log"] if a == address]


def test_dead_primary_standby_promoted_and_sync_repointed() -> None:
    state = {"10.0.0.12": "down", "10.0.0.13": "standby", "10.0.9.10": "primary"}
    timings = sqlpair.failover(pair(state), lambda _: None)
    assert state["10.0.0.13"] == "primary"
    assert commands(state, "10.0.0.12") == []  # a dead host is not touched
    assert any("mailtower sync tower" in c for c in commands(state, "10.0.0.13"))
    assert any("mailtower sync goc" in c for c in commands(state, "10.0.9.10"))
    assert set(timings) == {"fence_s", "promoted_s", "config_resubscribed_s", "goc_repointed_s"}


def test_a_running_old_primary_is_fenced_first() -> None:
    state = {"10.0.0.12": "primary", "10.0.0.13": "standby", "10.0.9.10": "primary"}
    sqlpair.failover(pair(state), lambda _: None)
    assert state["10.0.0.12"] == "down" and state["10.0.0.13"] == "primary"
    first_promote = next(i for i, (_, c) in enumerate(state["log"]) if "promote" in c)
    stop = next(i for i, (a, c) in enumerate(state["log"]) if a == "10.0.0.12" and "stop" in c)
    assert stop < first_promote


def test_an_old_primary_that_cannot_be_stopped_stops_the_failover() -> None:
    state = {"10.0.0.12": "primary", "10.0.0.13": "standby", "unkillable": True}
    with pytest.raises(sqlpair.PairError, match="still answers after the stop; fence it"):
        sqlpair.failover(pair(state, goc=False), lambda _: None)
    assert state["10.0.0.13"] == "standby"  # nothing promoted: no split brain


def test_no_standby_is_refused_with_the_next_step() -> None:
    state = {"10.0.0.12": "down", "10.0.0.13": "primary"}
    with pytest.raises(sqlpair.PairError, match="no standby to promote"):
        sqlpair.failover(pair(state), lambda _: None)


def test_rebuild_refuses_the_primary_and_unknown_hosts() -> None:
    state = {"10.0.0.12": "down", "10.0.0.13": "primary"}
    with pytest.raises(sqlpair.PairError, match="rebuild needs another host as the primary"):
        sqlpair.rebuild(pair(state), "10.0.0.13", lambda _: None)
    with pytest.raises(sqlpair.PairError, match="is not one of its SQL hosts"):
        sqlpair.rebuild(pair(state), "10.0.0.99", lambda _: None)


def test_clone_commands_take_a_fresh_copy_with_its_own_slot() -> None:
    cmds = sqlpair.clone_commands("10.0.0.13", 5432, sqlpair.standby_slot("10.0.0.12"))
    assert cmds[0].startswith("systemctl stop") and cmds[1].startswith("rm -rf")
    assert "-h 10.0.0.13 -p 5432" in cmds[2] and "-S standby_10_0_0_12" in cmds[2]


def test_failover_and_rebuild_end_by_renewing_the_relays_sql_connections() -> None:
    # Postfix 3.7 keeps a failed SQL host out for 60 s: the relay is reloaded after the SQL
    # hosts changed roles, once the promotion (or the clone) is done.
    state = {"10.0.0.12": "primary", "10.0.0.13": "standby", "10.0.9.10": "primary"}
    sqlpair.failover(pair(state), lambda _: None)
    assert commands(state, "10.0.0.10") == ["postfix reload"]
    reload_at = next(i for i, (a, _) in enumerate(state["log"]) if a == "10.0.0.10")
    promote_at = next(i for i, (_, c) in enumerate(state["log"]) if "promote" in c)
    sync_at = next(i for i, (_, c) in enumerate(state["log"]) if "sync tower" in c)
    assert promote_at < reload_at < sync_at  # lookups resume before the (long) sync steps
    state["log"].clear()
    state["10.0.0.12"] = "down"

    def clone_done(self, command: str, *, timeout: float = 120, check: bool = True) -> str:
        if command.startswith("systemctl start"):
            state["10.0.0.12"] = "standby"
        return FakeHost.run(self, command, timeout=timeout, check=check)

    class Replica(FakeHost):
        run = clone_done

        def psql(self, query: str, database: str = "postgres") -> str:
            if "pg_stat_replication" in query:
                return "1"
            return FakeHost.psql(self, query, database)

    tower = pair(state)
    tower = sqlpair.SqlTower(
        tower.name,
        [Replica("10.0.0.12", state=state), Replica("10.0.0.13", state=state)],
        tower.port,
        tower.goc,
        tower.relays,
    )
    sqlpair.rebuild(tower, "10.0.0.12", lambda _: None)
    assert commands(state, "10.0.0.10") == ["postfix reload"]


def test_an_unreachable_relay_is_said_and_the_failover_still_completes() -> None:
    state = {"10.0.0.12": "down", "10.0.0.13": "standby", "10.0.9.10": "primary"}

    class DeadRelay(FakeHost):
        def run(self, command: str, *, timeout: float = 120, check: bool = True) -> str:
            raise sqlpair.PairError(f"{self.address}: ssh: connect refused")

    base = pair(state)
    tower = sqlpair.SqlTower(
        base.name, base.sql, base.port, base.goc, (DeadRelay("10.0.0.10", state=state),)
    )
    said: list[str] = []
    sqlpair.failover(tower, said.append)
    assert state["10.0.0.13"] == "primary"
    assert any("could not reload Postfix on the relay 10.0.0.10" in s for s in said)
