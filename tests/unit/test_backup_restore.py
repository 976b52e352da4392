"""The restore command on fake hosts: what it fences, what it runs where, what it refuses.
(Real pgBackRest: tests/unit/test_backup_pgbackrest.py; the lab: tests/pair/test_95_backup.py.)"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailtower.controller import backup, sqlpair

INFO = json.dumps(
    [
        {
            "name": "tower-a",
            "status": {"code": 0, "message": "ok"},
            "backup": [
                {"label": "20261207-010000F", "type": "full", "timestamp": {"start": 1, "stop": 2}},
                {
                    "label": "20261207-010000F_20261208-010000D",
                    "type": "diff",
                    "timestamp": {"start": 3, "stop": 4},
                },
            ],
        }
    ]
)


@dataclass(frozen=True)
class FakeHost(sqlpair.Remote):
    state: dict = field(default_factory=dict, compare=False, hash=False)

    def run(self, command: str, *, timeout: float = 120, check: bool = True) -> str:
        if self.address in self.state.get("unreachable", ()):
            raise sqlpair.PairError(f"{self.address}: ssh: connect to host: No route to host")
        self.state.setdefault("log", []).append((self.address, command))
        masked = self.state.setdefault("masked", set())
        if "info" in command and "pgbackrest" in command:
            return self.state.get("info", INFO)
        if "systemctl is-active" in command:
            return "inactive" if self.state[self.address] == "down" else "active"
        stops = "systemctl stop" in command or "disable --now" in command
        if stops and not self.state.get("unkillable"):
            self.state[self.address] = "down"
        if f"systemctl mask {sqlpair.SERVICE}" in command:
            masked.add(self.address)
        if f"systemctl unmask {sqlpair.SERVICE}" in command:
            masked.discard(self.address)
        if "systemctl start" in command:
            # A masked unit does not start (what keeps a fenced old primary down).
            if self.address in masked:
                raise sqlpair.PairError(f"{self.address}: Unit {sqlpair.SERVICE} is masked")
            self.state[self.address] = "primary"
        return "done"

    def psql(self, query: str, database: str = "postgres") -> str:
        role = self.state[self.address]
        if role == "down":
            raise sqlpair.PairError(f"{self.address}: psql: connection refused")
        return "t" if role == "standby" else "f"


def tower(state: dict) -> sqlpair.SqlTower:
    return sqlpair.SqlTower(
        "tower-a",
        [FakeHost("10.0.0.12", state=state), FakeHost("10.0.0.13", state=state)],
        5432,
        FakeHost("10.0.9.10", state=state),
        (FakeHost("10.0.0.10", state=state),),
    )


def commands(state: dict, address: str) -> list[str]:
    return [c for a, c in state["log"] if a == address]


def test_restore_fences_both_hosts_restores_then_resyncs_the_goc() -> None:
    state = {"10.0.0.12": "primary", "10.0.0.13": "standby", "10.0.9.10": "primary"}
    timings = backup.restore(
        tower(state), "10.0.0.13", lambda _: None, target_time="2026-12-07 13:05:00+00"
    )
    assert state["10.0.0.12"] == "down" and state["10.0.0.13"] == "primary"
    target = commands(state, "10.0.0.13")
    stop, wipe = (
        target.index("systemctl stop postgresql@15-main"),
        target.index(f"rm -rf {sqlpair.DATA}"),
    )
    restore = next(i for i, c in enumerate(target) if "restore" in c and "pgbackrest" in c)
    start = next(i for i, c in enumerate(target) if "systemctl start postgresql@15-main" in c)
    assert stop < wipe < restore < start
    assert "systemctl unmask" in target[start]  # a host fenced before may be restored onto
    assert "--type=time" in target[restore] and "--target-action=promote" in target[restore]
    assert "2026-12-07 13:05:00+00" in target[restore]
    assert any("mailtower sync tower" in c for c in target[start:])
    assert any("mailtower sync goc" in c for c in commands(state, "10.0.9.10"))
    assert "postfix reload" in commands(state, "10.0.0.10")
    assert set(timings) >= {"fenced_s", "restored_s", "primary_s", "goc_repointed_s"}


def test_restore_to_the_end_of_the_archive_has_no_target() -> None:
    state = {"10.0.0.12": "down", "10.0.0.13": "down", "10.0.9.10": "primary"}
    backup.restore(tower(state), "10.0.0.12", lambda _: None)
    restore = next(c for c in commands(state, "10.0.0.12") if " restore" in c)
    assert "--type" not in restore and "--target" not in restore


def test_every_other_host_is_fenced_for_good_even_one_already_down() -> None:
    """A host whose PostgreSQL is down is still disabled and masked: a reboot or a deploy
    would otherwise start it as a second primary."""
    state = {"10.0.0.12": "down", "10.0.0.13": "standby", "10.0.9.10": "primary"}
    said: list[str] = []
    backup.restore(tower(state), "10.0.0.13", said.append)
    old = commands(state, "10.0.0.12")
    assert f"systemctl disable --now {sqlpair.SERVICE} && systemctl mask {sqlpair.SERVICE}" in old
    assert state["masked"] == {"10.0.0.12"}
    with pytest.raises(sqlpair.PairError, match="masked"):  # what a reboot or deploy meets
        tower(state).sql[0].run(f"systemctl start {sqlpair.SERVICE}")
    assert any(
        "10.0.0.13 first in the inventory's sql group" in s
        and "invoke sql.rebuild --tower tower-a --host 10.0.0.12" in s
        for s in said
    )


def test_an_unreachable_host_is_refused_before_anything_is_stopped() -> None:
    state = {"10.0.0.12": "primary", "10.0.0.13": "standby", "unreachable": {"10.0.0.12"}}
    with pytest.raises(
        sqlpair.PairError, match=r"cannot reach 10\.0\.0\.12.*--fenced 10\.0\.0\.12"
    ):
        backup.restore(tower(state), "10.0.0.13", lambda _: None)
    assert state["10.0.0.13"] == "standby"
    assert not any("systemctl" in c or "rm -rf" in c for _, c in state["log"])


def test_an_unreachable_host_the_operator_fenced_is_passed_over() -> None:
    state = {"10.0.0.12": "primary", "10.0.0.13": "standby", "unreachable": {"10.0.0.12"}}
    state["10.0.9.10"] = "primary"
    backup.restore(tower(state), "10.0.0.13", lambda _: None, fenced=["10.0.0.12"])
    assert state["10.0.0.13"] == "primary"


def test_fenced_names_only_another_sql_host() -> None:
    state = {"10.0.0.12": "primary", "10.0.0.13": "standby"}
    for wrong in ("10.0.0.13", "10.0.0.99"):
        with pytest.raises(sqlpair.PairError, match="not another SQL host of the tower"):
            backup.restore(tower(state), "10.0.0.13", lambda _: None, fenced=[wrong])
    assert not any("systemctl" in c for _, c in state["log"])


def test_rebuild_unmasks_the_fenced_host_before_it_clones(monkeypatch) -> None:
    state = {"10.0.0.12": "down", "10.0.0.13": "primary", "masked": {"10.0.0.12"}}
    host = tower(state).sql[0]
    monkeypatch.setattr(sqlpair, "_wait", lambda *_: None)  # the fake does not stream
    sqlpair.rebuild(tower(state), "10.0.0.12", lambda _: None)
    done = commands(state, "10.0.0.12")
    unmask = next(i for i, c in enumerate(done) if f"systemctl unmask {sqlpair.SERVICE}" in c)
    clone = next(i for i, c in enumerate(done) if "pg_basebackup" in c)
    assert unmask < clone and host.address not in state["masked"]


def test_no_backup_in_the_repository_stops_before_anything_is_stopped() -> None:
    state = {"10.0.0.12": "primary", "10.0.0.13": "standby", "info": "[]"}
    with pytest.raises(sqlpair.PairError, match="finds no backup"):
        backup.restore(tower(state), "10.0.0.13", lambda _: None)
    assert state["10.0.0.12"] == "primary" and state["10.0.0.13"] == "standby"


def test_a_malformed_target_time_is_refused_before_any_stop() -> None:
    state = {"10.0.0.12": "primary", "10.0.0.13": "standby"}
    with pytest.raises(sqlpair.PairError, match="PostgreSQL timestamp with its zone"):
        backup.restore(tower(state), "10.0.0.13", lambda _: None, target_time="yesterday; rm")
    assert state["10.0.0.12"] == "primary"


def test_an_unstoppable_host_stops_the_restore() -> None:
    state = {"10.0.0.12": "primary", "10.0.0.13": "standby", "unkillable": True}
    with pytest.raises(sqlpair.PairError, match="PostgreSQL still runs after"):
        backup.restore(tower(state), "10.0.0.13", lambda _: None)
    assert not any("rm -rf" in c for _, c in state["log"])


def test_a_host_outside_the_tower_is_refused() -> None:
    with pytest.raises(sqlpair.PairError, match="is not one of its SQL hosts"):
        backup.restore(tower({}), "10.0.0.99", lambda _: None)


def test_parse_info_reads_the_stanza_and_its_backups() -> None:
    status, sets = backup.parse_info(INFO, "tower-a")
    assert status == "ok" and [s.kind for s in sets] == ["full", "diff"]
    assert backup.parse_info(INFO, "tower-b") == ("missing stanza", [])


def test_each_host_admits_only_the_other_side_for_its_stanza() -> None:
    pgs = [
        backup.PgHost("10.0.0.12", "10.0.0.12", 8432),
        backup.PgHost("10.0.0.13", "10.0.0.13", 8432),
    ]
    repo = backup.render(
        backup.repo_sections(
            "tower-a", pgs, "10.0.0.11", 8432, repo_path="/r", retention_full=2, retention_diff=6
        ),
        "t",
    )
    assert "tls-server-auth=10.0.0.12=tower-a\ntls-server-auth=10.0.0.13=tower-a\n" in repo
    assert "pg2-host=10.0.0.13\n" in repo and "repo1-retention-full=2\n" in repo
    db = backup.render(backup.db_sections("tower-a", pgs[0], "10.0.0.11", "10.0.0.11", 8432), "t")
    assert "tls-server-auth=10.0.0.11=tower-a\n" in db and "repo1-host=10.0.0.11\n" in db
    assert "pg2" not in db


def test_backup_keys_are_never_readable_by_others(tmp_path, monkeypatch) -> None:
    """Each key has mode 0600 from its creation, whatever the umask (not a chmod after a
    write that left it 0644 for a moment); the directory made 0700."""
    before_chmod = []
    chmod = Path.chmod

    def spy(self: Path, mode: int, **kwargs) -> None:
        if self.suffix == ".key":
            before_chmod.append((self.name, self.stat().st_mode & 0o777))
        chmod(self, mode, **kwargs)

    monkeypatch.setattr(Path, "chmod", spy)
    old = os.umask(0o022)
    try:
        backup.ensure_pki(tmp_path / "deploy" / "tls", {"10.0.0.12": "10.0.0.12"})
    finally:
        os.umask(old)
    tls = tmp_path / "deploy" / "tls"
    assert tls.stat().st_mode & 0o777 == 0o700
    for key in ("ca.key", "10.0.0.12.key"):
        assert (tls / key).stat().st_mode & 0o777 == 0o600
    assert all(mode == 0o600 for _, mode in before_chmod), before_chmod


def test_a_backup_tls_dir_open_to_others_is_refused(tmp_path) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    tls.chmod(0o750)
    with pytest.raises(sqlpair.PairError, match=r"mode 750 lets others in.*chmod 700"):
        backup.ensure_pki(tls, {"10.0.0.12": "10.0.0.12"})
    assert list(tls.iterdir()) == []
    tls.chmod(0o700)
    backup.ensure_pki(tls, {"10.0.0.12": "10.0.0.12"})
    assert (tls / "10.0.0.12.key").exists()
