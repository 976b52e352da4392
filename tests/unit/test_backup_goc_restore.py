"""The GOC's restore command on fake hosts: the order at the GOC, the sync re-made at the GOC
and on each tower's primary, what it refuses before stopping anything. (The sync steps on
real PostgreSQL: test_sync_goc_restore.py; the lab: tests/pair/test_96_goc_backup.py.)"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from mailtower.controller import backup, sqlpair

INFO = json.dumps(
    [
        {
            "name": "goc",
            "status": {"code": 0, "message": "ok"},
            "backup": [
                {"label": "20261207-010000F", "type": "full", "timestamp": {"start": 1, "stop": 2}}
            ],
        }
    ]
)
GOC, A1, A2, B1 = "10.0.9.10", "10.0.1.12", "10.0.1.13", "10.0.2.12"


@dataclass(frozen=True)
class FakeHost(sqlpair.Remote):
    state: dict = field(default_factory=dict, compare=False, hash=False)

    def run(self, command: str, *, timeout: float = 120, check: bool = True) -> str:
        self.state.setdefault("log", []).append((self.address, command))
        if "info" in command and "pgbackrest" in command:
            return self.state.get("info", INFO)
        if "systemctl stop" in command and not self.state.get("unkillable"):
            self.state[self.address] = "down"
        elif "systemctl start" in command:
            self.state[self.address] = "primary"
        return "done"

    def psql(self, query: str, database: str = "postgres") -> str:
        role = self.state.get(self.address, "down")
        if role == "down":
            raise sqlpair.PairError(f"{self.address}: psql: connection refused")
        return "t" if role == "standby" else "f"


def hosts(state: dict) -> tuple[FakeHost, dict[str, list[sqlpair.Remote]]]:
    return FakeHost(GOC, state=state), {
        "tower-a": [FakeHost(A1, state=state), FakeHost(A2, state=state)],
        "tower-b": [FakeHost(B1, state=state)],
    }


def commands(state: dict, address: str) -> list[str]:
    return [c for a, c in state.get("log", []) if a == address]


def test_goc_restore_stops_restores_then_remakes_the_sync_everywhere() -> None:
    state = {GOC: "primary", A1: "standby", A2: "primary", B1: "primary"}
    goc, towers = hosts(state)
    timings = backup.restore_goc(goc, towers, lambda _: None, target_time="2026-12-07 13:05:00Z")
    at_goc = commands(state, GOC)
    stop = at_goc.index("systemctl stop postgresql@15-main")
    wipe = at_goc.index(f"rm -rf {sqlpair.DATA}")
    restore = next(i for i, c in enumerate(at_goc) if "pgbackrest" in c and " restore" in c)
    start = at_goc.index("systemctl start postgresql@15-main")
    resync = next(i for i, c in enumerate(at_goc) if "sync goc --after-restore" in c)
    assert stop < wipe < restore < start < resync
    assert "--stanza=goc" in at_goc[restore] and "--type=time" in at_goc[restore]
    # The config subscription again on each tower's primary, never on a standby.
    assert any("sync tower" in c for c in commands(state, A2))
    assert any("sync tower" in c for c in commands(state, B1))
    assert not any("sync tower" in c for c in commands(state, A1))
    # No tower host is stopped: only the GOC was lost.
    assert state[A2] == state[B1] == "primary" and state[A1] == "standby"
    assert set(timings) >= {"restored_s", "primary_s", "events_repointed_s"}


def test_a_goc_already_down_is_restored_to_the_end_of_the_archive() -> None:
    state = {A2: "primary", B1: "primary"}
    goc, towers = hosts(state)
    backup.restore_goc(goc, towers, lambda _: None)
    restore = next(c for c in commands(state, GOC) if " restore" in c)
    assert "--type" not in restore and "--target" not in restore
    assert not any("systemctl stop" in c for c in commands(state, GOC))


@pytest.mark.parametrize(
    ("extra", "target", "error"),
    [
        ({"info": "[]"}, None, "finds no backup"),
        ({}, "yesterday; rm -rf /", "PostgreSQL timestamp with its zone"),
    ],
)
def test_refused_before_the_goc_is_stopped(extra: dict, target: str | None, error: str) -> None:
    state = {GOC: "primary", A2: "primary", **extra}
    goc, towers = hosts(state)
    with pytest.raises(sqlpair.PairError, match=error):
        backup.restore_goc(goc, towers, lambda _: None, target_time=target)
    assert state[GOC] == "primary"
    assert not any("systemctl stop" in c or "rm -rf" in c for _, c in state["log"])


def test_a_tower_without_a_primary_is_named_after_the_goc_is_restored() -> None:
    state = {GOC: "primary", A1: "down", A2: "down", B1: "primary"}
    goc, towers = hosts(state)
    with pytest.raises(sqlpair.PairError, match=r"no SQL primary of tower-a answered"):
        backup.restore_goc(goc, towers, lambda _: None)
    assert state[GOC] == "primary"
    assert any("sync tower" in c for c in commands(state, B1))


@pytest.mark.parametrize(("flag", "restored"), [([], False), (["--after-restore"], True)])
def test_sync_goc_after_restore_reaches_the_re_point(monkeypatch, capsys, flag, restored) -> None:
    from mailtower import cli
    from mailtower.goc.sync import deployed
    from mailtower.goc.sync.changes import Changes

    seen = []

    def goc_apply(side, *, restored: bool = False):
        seen.append(restored)
        return deployed.GocReport(Changes("goc"), {"tower-a": "10.0.1.12"})

    monkeypatch.setattr(deployed, "load", lambda path, model: object())
    monkeypatch.setattr(deployed, "goc_apply", goc_apply)
    assert cli.main(["sync", "goc", *flag]) == 0
    assert seen == [restored]
    assert "tower-a: events followed from its primary 10.0.1.12" in capsys.readouterr().out


def test_goc_restore_onto_another_address_is_refused_with_the_fix() -> None:
    assert backup.goc_restore_host(GOC, "") == GOC
    assert backup.goc_restore_host(GOC, GOC) == GOC
    with pytest.raises(
        sqlpair.PairError,
        match=r"admits only 10\.0\.9\.10's certificate.*"
        r"Give the new host the address 10\.0\.9\.10",
    ):
        backup.goc_restore_host(GOC, "10.0.9.11")


def test_the_goc_restore_task_refuses_another_host(monkeypatch) -> None:
    import invoke

    import tasks
    from mailtower.controller import inventory as inventory_mod

    goc = inventory_mod.load(tasks.inventory_path("lab-goc")).groups["goc"][0].address
    ran = []
    monkeypatch.setattr(backup, "restore_goc", lambda *a, **k: ran.append(a))
    with pytest.raises(invoke.Exit, match=f"the GOC's address is {goc}"):
        tasks.goc_restore(invoke.Context(), goc="lab-goc", host="10.201.9.99")
    assert ran == []
