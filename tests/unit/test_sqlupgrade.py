"""A PostgreSQL minor upgrade of the SQL pair on fake hosts: the standby first, a clean stop of
the primary, a switchover only once the standby has its last checkpoint, the old primary
cloned as a standby before its packages change."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mailtower.controller import sqlpair, sqlupgrade

PRIMARY, STANDBY, GOC, RELAY = "10.0.0.12", "10.0.0.13", "10.0.9.10", "10.0.0.10"


@dataclass(frozen=True)
class FakeHost(sqlpair.Remote):
    state: dict = field(default_factory=dict, compare=False, hash=False)

    def run(self, command: str, *, timeout: float = 120, check: bool = True) -> str:
        s, me = self.state, self.address
        s.setdefault("log", []).append((me, command))
        if "apt-get install" in command:
            s.setdefault("upgraded", []).append(me)
            s[f"version:{me}"] = "15.9"
        elif command.startswith("dpkg-query"):
            return f"postgresql-15={s.get(f'version:{me}', '15.8')} "
        elif "stop -m fast" in command:
            s[me] = "down"
            s["clean"] = me
        elif "systemctl stop" in command:
            s[me] = "down"
        elif "pg_basebackup" in command:
            s[f"clone:{me}"] = True
        elif "systemctl start" in command:
            if s.get(f"clone:{me}"):
                s[me] = "standby"
            elif s[me] == "down":
                s[me] = "primary"  # a stopped primary starts as a primary again
                s.setdefault("restarted", []).append(me)
        elif "promote" in command:
            s[me] = "primary"
        elif "pg_controldata" in command:
            state = "shut down" if s.get("clean") == me else "in production"
            return (
                f"Database cluster state:               {state}\n"
                "Latest checkpoint location:           0/3000060\n"
            )
        return "done"

    def psql(self, query: str, database: str = "postgres") -> str:
        s, me = self.state, self.address
        if s.get(me, "primary") == "down":
            raise sqlpair.PairError(f"{me}: psql: connection refused")
        if "pg_is_in_recovery" in query:
            return "t" if s[me] == "standby" else "f"
        if "pg_stat_replication" in query:
            other = next(a for a in (PRIMARY, STANDBY) if a != me)
            return "1" if s.get(other) == "standby" and s.get("streaming", True) else "0"
        if "pg_last_wal_replay_lsn" in query:
            return "t" if s.get("replayed", True) else "f"
        return ""


def tower(state: dict) -> sqlpair.SqlTower:
    return sqlpair.SqlTower(
        "tower-a",
        [FakeHost(PRIMARY, state=state), FakeHost(STANDBY, state=state)],
        5432,
        FakeHost(GOC, state=state),
        (FakeHost(RELAY, state=state),),
    )


def index(state: dict, address: str, words: str) -> int:
    return next(i for i, (a, c) in enumerate(state["log"]) if a == address and words in c)


def test_standby_first_then_a_clean_switchover_then_the_old_primary_as_standby() -> None:
    state = {PRIMARY: "primary", STANDBY: "standby", GOC: "primary"}
    said: list[str] = []
    timings = sqlupgrade.upgrade(tower(state), said.append)
    assert state[STANDBY] == "primary" and state[PRIMARY] == "standby"
    assert state["upgraded"] == [STANDBY, PRIMARY]
    standby_upgraded = index(state, STANDBY, "apt-get install")
    stopped = index(state, PRIMARY, "stop -m fast")
    promoted = index(state, STANDBY, "promote")
    cloned = index(state, PRIMARY, "pg_basebackup")
    primary_upgraded = index(state, PRIMARY, "apt-get install")
    assert standby_upgraded < stopped < promoted < cloned < primary_upgraded
    assert "restarted" not in state  # the old primary never ran as a primary again
    assert any("mailtower sync goc" in c for a, c in state["log"] if a == GOC)
    assert any("postfix reload" in c for a, c in state["log"] if a == RELAY)
    assert set(timings) >= {"standby_upgraded_s", "switched_over_s", "done_s"}
    assert any("15.8" in line for line in said) and any("15.9" in line for line in said)


def test_a_standby_that_has_not_caught_up_switches_nothing() -> None:
    state = {PRIMARY: "primary", STANDBY: "standby", GOC: "primary", "replayed": False}
    with pytest.raises(sqlpair.PairError, match="did not replay the primary's last checkpoint"):
        sqlupgrade.upgrade(tower(state), lambda _: None, catch_up_s=0.2)
    assert state[PRIMARY] == "primary" and state[STANDBY] == "standby"  # started again
    assert not any("promote" in c for _, c in state["log"])


def test_no_streaming_standby_is_refused_before_anything_changes() -> None:
    state = {PRIMARY: "primary", STANDBY: "standby", "streaming": False}
    with pytest.raises(sqlpair.PairError, match="invoke sql.rebuild"):
        sqlupgrade.upgrade(tower(state), lambda _: None)
    assert "upgraded" not in state


def test_upgrade_command_touches_only_installed_packages() -> None:
    command = sqlupgrade.upgrade_command(("postgresql-15", "libpq5"))
    assert "--only-upgrade" in command and "postgresql-15 libpq5" in command
    assert "--force-confold" in command  # the deploy's configuration files stay
