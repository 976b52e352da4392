"""The monitor's rolling rule update, with scanners and HAProxy faked at the I/O boundary:
the first scanner alone, then batches within the capacity the load leaves; a bundle whose
canary fails is rolled back on that scanner and goes no further."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from monitor_fakes import SCANNERS, free_port, tower

from mailtower import bundles
from mailtower.monitor import health
from mailtower.monitor import rollout as rollout_mod
from mailtower.monitor.rollout import canary
from mailtower.monitor.service import Monitor
from mailtower.scanning import testdata
from mailtower.settings import Bundles

BAD = 99  # the version whose rules turn every message into a virus
PEM = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
    "-----END PUBLIC KEY-----\n"
)


class FakeScanners:
    """What each scanner's HTTP API and canary answer, and the record of it."""

    def __init__(self, version: int) -> None:
        self.version = dict.fromkeys(SCANNERS, version)
        self.previous: dict[str, int] = {}
        self.applying: set[str] = set()
        self.most_at_once = 0
        self.order: list[tuple[str, str, int | None]] = []  # (address, action, version)

    async def request(self, host, port, method, path, body=b"", headers=None, timeout_s=5.0):
        if path == "/health":
            return 200, {"status": "ok", "in_flight": 0, "rules_bundle": self.version[host]}
        assert headers == {"X-Mailtower-Token": "c" * 16}
        if path == "/rules/apply":
            wanted = int(body.decode().split(":")[1].strip(" }"))
            self.applying.add(host)
            self.most_at_once = max(self.most_at_once, len(self.applying))
            await asyncio.sleep(0.05)  # others may start meanwhile
            self.applying.discard(host)
            self.previous[host] = self.version[host]
            self.version[host] = wanted
            self.order.append((host, "apply", wanted))
            return 200, {"status": "ok", "rules_bundle": wanted}
        if path == "/rules/rollback":
            self.version[host] = self.previous[host]
            self.order.append((host, "rollback", self.version[host]))
            return 200, {"status": "ok", "rules_bundle": self.version[host]}
        raise AssertionError(path)

    def canary(self, address, port, raw):
        assert raw.startswith(b"X-Mailtower-Canary: " + b"c" * 16)
        running = self.version[address]
        verdict = "virus" if running == BAD or testdata.eicar() in raw else "clean"
        return f"250 2.0.0 canary verdict={verdict} rules_bundle={running} findings=-"


class FakeHAProxy:
    def __init__(self, sessions: int = 0) -> None:
        self.state = {f"s{i + 1:02d}": "ready" for i in range(len(SCANNERS))}
        self.sessions_now = sessions
        self.open: dict[str, int] = {}  # server → sessions still open to it
        self.maint_at_once = 0

    async def set_state(self, server, state, backend="scanners"):
        self.state[server] = state
        self.maint_at_once = max(
            self.maint_at_once, sum(1 for v in self.state.values() if v == "maint")
        )

    async def sessions(self, backend="scanners"):
        return self.sessions_now

    async def server_sessions(self, backend="scanners"):
        return {name: self.open.get(name, 0) for name in self.state}


def make(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    version: int,
    sessions: int = 0,
    mirrored: tuple[int, ...] = (1, 2, BAD),
) -> tuple[rollout_mod.Rollout, FakeScanners, FakeHAProxy]:
    base = tower(free_port(), free_port())
    settings = base.model_copy(
        update={
            "rules_dir": "/var/lib/mailtower/rules",
            "secrets": base.secrets.model_copy(update={"canary": "c" * 16}),
            "bundles": Bundles(public_key=PEM, source="http://127.0.0.1:9", batch=4, spare=1),
        }
    )
    monitor = Monitor(settings, rules_mirror=tmp_path / "mirror")
    scanners, haproxy = FakeScanners(version), FakeHAProxy(sessions)
    monitor.haproxy = haproxy  # type: ignore[assignment]
    monkeypatch.setattr(health, "request", scanners.request)
    monkeypatch.setattr(canary, "send_canary", scanners.canary)
    for s in monitor.pool.scanners:
        s.enabled, s.healthy, s.rules_bundle = True, True, version
    mirror = tmp_path / "mirror"  # what the monitor mirrored (names only matter here)
    mirror.mkdir()
    for v in mirrored:
        (mirror / f"rules-{v}.tar.gz").write_bytes(b"")
    rollout = rollout_mod.Rollout(monitor, mirror)
    monitor.rollout = rollout
    return rollout, scanners, haproxy


def test_first_scanner_alone_then_batches_within_capacity(tmp_path, monkeypatch) -> None:
    rollout, scanners, haproxy = make(tmp_path, monkeypatch, version=1)
    rollout.state.target = 2
    asyncio.run(rollout.roll())
    assert scanners.version == dict.fromkeys(SCANNERS, 2)
    assert scanners.order[0][0] == SCANNERS[0]  # the canary scanner went first…
    assert scanners.most_at_once == 2  # …then 2 at once: 3 in service − 1 spare
    assert haproxy.maint_at_once <= 2
    assert set(haproxy.state.values()) == {"ready"}  # all back in service
    assert all(s.rules_bundle == 2 and not s.held for s in rollout.monitor.pool.scanners)
    assert rollout.behind() == []


def test_no_room_no_update(tmp_path, monkeypatch) -> None:
    # 8 sessions at 4 per scanner need 2 scanners, plus 1 spare: all 3 must stay in service.
    rollout, scanners, haproxy = make(tmp_path, monkeypatch, version=1, sessions=8)
    rollout.state.target = 2
    asyncio.run(rollout.roll())
    assert scanners.order == [] and set(haproxy.state.values()) == {"ready"}
    haproxy.sessions_now = 4  # the load falls: one may go
    asyncio.run(rollout.roll())
    assert scanners.version == dict.fromkeys(SCANNERS, 2)
    assert scanners.most_at_once == 1


def test_a_bundle_failing_its_canary_is_rolled_back_and_rejected(tmp_path, monkeypatch) -> None:
    rollout, scanners, haproxy = make(tmp_path, monkeypatch, version=2)
    rollout.state.target = BAD
    asyncio.run(rollout.roll())
    first = SCANNERS[0]
    assert scanners.order == [(first, "apply", BAD), (first, "rollback", 2)]
    assert scanners.version == dict.fromkeys(SCANNERS, 2)  # nobody runs the bad one
    assert rollout.state.rejected == {BAD} and rollout.state.target == 2
    assert set(haproxy.state.values()) == {"ready"}
    assert rollout.behind() == []
    # The rejection survives a monitor restart.
    again = rollout_mod.Rollout(rollout.monitor, tmp_path / "mirror")
    assert again.state.rejected == {BAD}


def test_room_counts_only_scanners_in_service(tmp_path, monkeypatch) -> None:
    rollout, _, _ = make(tmp_path, monkeypatch, version=1)
    pool = rollout.monitor.pool.scanners
    assert rollout.room(0) == 2
    pool[0].healthy = False  # down: neither in service nor behind
    assert rollout.room(0) == 1
    rollout.state.target = 2
    assert [s.name for s in rollout.behind()] == ["s02", "s03"]


def test_a_scanner_that_fails_waits_and_the_others_go_on(tmp_path, monkeypatch) -> None:
    rollout, scanners, haproxy = make(tmp_path, monkeypatch, version=1)
    broken = SCANNERS[2]
    apply = scanners.request

    async def refusing(host, port, method, path, body=b"", headers=None, timeout_s=5.0):
        if host == broken and path == "/rules/apply":
            return 409, {"status": "refused", "reason": "clamd did not take RELOAD"}
        return await apply(host, port, method, path, body, headers, timeout_s)

    monkeypatch.setattr(health, "request", refusing)
    rollout.state.target = 2
    asyncio.run(rollout.roll())
    asyncio.run(rollout.roll())  # the broken one is not drained again at once
    assert scanners.version == {SCANNERS[0]: 2, SCANNERS[1]: 2, broken: 1}
    assert set(haproxy.state.values()) == {"ready"}  # back in service with its old rules
    assert rollout.state.rejected == set() and rollout.state.target == 2
    assert "clamd did not take RELOAD" in (rollout.state.last_error or "")
    assert rollout.behind() == []  # waiting out RETRY_AFTER_S
    rollout._retry_at[rollout.monitor.pool.scanners[2].name] = 0.0
    assert [s.address for s in rollout.behind()] == [broken]


def test_a_bundle_whose_own_sample_fails_is_rejected(tmp_path, monkeypatch) -> None:
    """The new rule should catch the bundle's sample; it does not (the fake calls it clean)."""
    rollout, scanners, haproxy = make(tmp_path, monkeypatch, version=1, mirrored=(1, 2))
    sample = bundles.Canary("virus-new-dropper.eml", "virus", b"Subject: x\r\n\r\ndropper\r\n")
    monkeypatch.setattr(rollout, "samples", lambda version: [sample] if version == 2 else [])
    rollout.state.target = 2
    asyncio.run(rollout.roll())
    first = SCANNERS[0]
    assert scanners.order == [(first, "apply", 2), (first, "rollback", 1)]
    assert rollout.state.rejected == {2} and rollout.state.target == 1
    assert "virus-new-dropper.eml came back clean, not virus" in (rollout.state.last_error or "")
    assert set(haproxy.state.values()) == {"ready"}


def test_samples_come_from_the_mirrored_bundle(tmp_path, monkeypatch) -> None:
    from bundle_builders import make_keys, rules_copy

    rollout, _, _ = make(tmp_path, monkeypatch, version=1)
    keys = make_keys(tmp_path / "keys")
    rollout.public_key = keys.public
    bundles.build(
        rules_copy(tmp_path / "rules"), keys.private, 3, rollout.mirror_dir / "rules-3.tar.gz"
    )
    assert [(c.name, c.expect) for c in rollout.samples(3)] == [
        ("clean-hello.eml", "clean"),
        ("virus-eicar.eml", "virus"),
    ]
    assert rollout.samples(4) == []  # not in the mirror: only the built-in canaries
    assert rollout.samples(None) == []


def test_a_bad_bundle_whose_rollback_fails_keeps_the_scanner_out(tmp_path, monkeypatch) -> None:
    rollout, scanners, haproxy = make(tmp_path, monkeypatch, version=2)
    answer = scanners.request
    broken = {"rollback": True}

    async def request(host, port, method, path, body=b"", headers=None, timeout_s=5.0):
        if path == "/rules/rollback" and broken["rollback"]:
            return 409, {"status": "refused", "reason": "no version before 99 is kept"}
        return await answer(host, port, method, path, body, headers, timeout_s)

    monkeypatch.setattr(health, "request", request)
    rollout.state.target = BAD
    asyncio.run(rollout.roll())
    first = rollout.monitor.pool.scanners[0]
    assert rollout.state.rejected == {BAD} and rollout.state.target == 2
    # It runs the bad rules and could not go back: out of service, not given mail.
    assert rollout.state.stuck == {first.name} and first.held
    assert haproxy.state[first.name] == "maint"
    assert scanners.version[first.address] == BAD
    assert [v for a, v in scanners.version.items() if a != first.address] == [2, 2]
    first.rules_bundle = BAD  # what its health answers say, while it is kept out
    asyncio.run(rollout.roll())  # still broken: still out, and BAD goes nowhere else
    assert haproxy.state[first.name] == "maint" and rollout.state.target == 2
    assert [v for a, v in scanners.version.items() if a != first.address] == [2, 2]

    # A restarted monitor keeps it out too, until it has checked it.
    first.held = False
    rollout = rollout_mod.Rollout(rollout.monitor, rollout.mirror_dir)
    assert first.held and rollout.state.stuck == {first.name}

    broken["rollback"] = False  # e.g. an operator freed the scanner's rules root
    asyncio.run(rollout.roll())
    assert rollout.state.stuck == set() and not first.held
    assert scanners.version[first.address] == 2 and haproxy.state[first.name] == "ready"
    assert rollout_mod.Rollout(rollout.monitor, rollout.mirror_dir).state.stuck == set()


def test_an_apply_without_answer_is_checked_before_the_scanner_serves(
    tmp_path, monkeypatch
) -> None:
    rollout, scanners, haproxy = make(tmp_path, monkeypatch, version=1)
    answer = scanners.request

    async def request(host, port, method, path, body=b"", headers=None, timeout_s=5.0):
        result = await answer(host, port, method, path, body, headers, timeout_s)
        if path == "/rules/apply" and host == SCANNERS[0]:
            raise TimeoutError  # it applied, but the answer never came
        return result

    monkeypatch.setattr(health, "request", request)
    rollout.state.target = 2
    asyncio.run(rollout.roll())
    first = rollout.monitor.pool.scanners[0]
    # Its canary of what it runs (2) passed: back in service, not stuck, not rejected.
    assert scanners.version[first.address] == 2 and first.rules_bundle == 2
    assert haproxy.state[first.name] == "ready" and rollout.state.stuck == set()
    assert rollout.state.rejected == set()
    assert "no answer" in (rollout.state.last_error or "")


def test_a_canary_without_answer_does_not_reject_the_bundle(tmp_path, monkeypatch) -> None:
    rollout, scanners, haproxy = make(tmp_path, monkeypatch, version=1)
    answer = scanners.canary
    calls = {"n": 0}

    def flaky(address, port, raw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionResetError("scanner hung up")
        return answer(address, port, raw)

    monkeypatch.setattr(canary, "send_canary", flaky)
    rollout.state.target = 2
    asyncio.run(rollout.roll())
    first = rollout.monitor.pool.scanners[0]
    # Checked again (it passed), back in service; the version is not rejected.
    assert rollout.state.rejected == set() and rollout.state.target == 2
    assert haproxy.state[first.name] == "ready" and first.rules_bundle == 2


def test_apply_waits_for_the_sessions_still_open_to_the_scanner(tmp_path, monkeypatch) -> None:
    """A session the relay opened before ``maint`` may not have reached DATA yet (scand counts
    nothing in flight): the apply waits until HAProxy has no session open to the scanner."""
    rollout, scanners, haproxy = make(tmp_path, monkeypatch, version=1)
    rollout.state.target = 2
    haproxy.open["s01"] = 1
    open_at_apply: list[int] = []
    answer = scanners.request

    async def request(host, port, method, path, body=b"", headers=None, timeout_s=5.0):
        if path == "/rules/apply" and host == SCANNERS[0]:
            open_at_apply.append(haproxy.open["s01"])
        return await answer(host, port, method, path, body, headers, timeout_s)

    monkeypatch.setattr(health, "request", request)

    async def scenario() -> None:
        async def session_ends() -> None:
            await asyncio.sleep(0.5)
            haproxy.open["s01"] = 0

        ending = asyncio.create_task(session_ends())
        await rollout.roll()
        await ending

    asyncio.run(scenario())
    assert open_at_apply == [0]
    assert scanners.version == dict.fromkeys(SCANNERS, 2)
