"""The monitor's ClamAV rollout, with the GOC's mirror (clamavdb), the scanners and HAProxy faked
at the I/O boundary: the mirror's verified set rolled window by window, sharing the pool's
capacity with the rule rollout; a set failing its canary on the first scanner rejected."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from monitor_fakes import SCANNERS, free_port, tower
from prometheus_client.parser import text_string_to_metric_families
from test_monitor_rollout import PEM, FakeHAProxy, FakeScanners

from mailtower import clamavdb
from mailtower.errors import SettingsError
from mailtower.monitor import health
from mailtower.monitor.rollout import ClamavRollout, Rollout, canary
from mailtower.monitor.service import Monitor
from mailtower.settings import Bundles, ClamavMirror, Goc, TowerSettings, from_data

OLD = {"daily": 1, "main": 1}
NEW = {"daily": 2, "main": 1}
BUILT = "22 Jun 2021 21:34 -0400"  # as a CVD header says it
BUILT_AT = datetime(2021, 6, 23, 1, 34, tzinfo=UTC).timestamp()


class FakeGoc:
    """The GOC's served ClamAV directory and clamavdb's view of the monitor's copy of it."""

    def __init__(self, versions: dict[str, int]) -> None:
        self.served = self.index_of(versions)
        self.mirror: dict[str, Any] = {}  # the monitor's index.json ({}: none yet)
        self.pulls: list[tuple[str, Path, list[str]]] = []
        self.down = False

    @staticmethod
    def index_of(versions: dict[str, int], **upstream: float) -> dict[str, Any]:
        return {
            "format": 1,
            "databases": {db: {"version": v, "built": BUILT} for db, v in versions.items()},
            "upstream": {"last_ok": time.time() - 100, "cooldown_until": 0, "refusals": 0}
            | upstream,
        }

    def pull(self, base_url: str, dest: Path, databases: list[str], timeout_s: float = 30):
        self.pulls.append((base_url, dest, databases))
        if self.down:
            raise OSError("connection refused")
        self.mirror = copy.deepcopy(self.served)
        return self.mirror_versions(dest)

    def read_index(self, directory: Path) -> dict:
        return copy.deepcopy(self.mirror)

    def mirror_versions(self, directory: Path) -> dict[str, int]:
        versions = {db: d["version"] for db, d in self.mirror.get("databases", {}).items()}
        if self.mirror.get("feeds_serial"):  # as clamavdb.mirror_versions: the feed set too
            versions["feeds"] = self.mirror["feeds_serial"]
        return versions


class FakeClamavScanners(FakeScanners):
    """The rule rollout's fake scanners, with scand's ClamAV endpoints and health fields. A set
    in ``bad`` makes clamd call every message a virus."""

    def __init__(self, rules: int, clamav: dict[str, int]) -> None:
        super().__init__(rules)
        self.clamav = {a: dict(clamav) for a in SCANNERS}
        self.clamav_previous: dict[str, dict[str, int]] = {}
        self.bad: list[dict[str, int]] = []
        self.refusing: set[str] = set()
        self.events: list[tuple[str, str]] = []  # ("start" | "end", address) of every apply
        self.overlaps: list[str] = []  # a scanner asked to apply while it already was

    async def request(self, host, port, method, path, body=b"", headers=None, timeout_s=5.0):
        if path == "/health":
            status, doc = await super().request(host, port, method, path, body, headers)
            return status, doc | {"clamav": dict(self.clamav[host]), "clamav_busy": False}
        if path.endswith("/apply"):
            if host in self.applying:
                self.overlaps.append(host)
            self.events.append(("start", host))
        try:
            return await self._answer(host, port, method, path, body, headers)
        finally:
            if path.endswith("/apply"):
                self.events.append(("end", host))

    async def _answer(self, host, port, method, path, body, headers):
        if not path.startswith("/clamav/"):
            return await super().request(host, port, method, path, body, headers)
        assert headers == {"X-Mailtower-Token": "c" * 16}
        if path == "/clamav/apply":
            wanted = json.loads(body)["versions"]
            self.applying.add(host)
            self.most_at_once = max(self.most_at_once, len(self.applying))
            await asyncio.sleep(0.05)  # others may start meanwhile
            self.applying.discard(host)
            if host in self.refusing:
                self.order.append((host, "clamav-refused", None))
                return 500, {"status": "failed", "reason": "freshclam: mirror unreachable"}
            self.clamav_previous[host] = self.clamav[host]
            self.clamav[host] = dict(wanted)
            self.order.append((host, "clamav-apply", None))
            return 200, {"status": "ok", "clamav": wanted}
        if path == "/clamav/rollback":
            self.clamav[host] = self.clamav_previous[host]
            self.order.append((host, "clamav-rollback", None))
            return 200, {"status": "ok", "clamav": self.clamav[host]}
        raise AssertionError(path)

    def canary(self, address, port, raw):
        answer = super().canary(address, port, raw)
        if self.clamav[address] in self.bad:
            return answer.replace("verdict=clean", "verdict=virus")
        return answer


def settings_with(base: TowerSettings, *, bundles: bool) -> TowerSettings:
    return base.model_copy(
        update={
            "rules_dir": "/var/lib/mailtower/rules",
            "goc": Goc(address="127.0.0.9"),
            "secrets": base.secrets.model_copy(update={"canary": "c" * 16, "goc_status": "g" * 16}),
            "bundles": (
                Bundles(public_key=PEM, source="http://127.0.0.1:9", batch=4, spare=1)
                if bundles
                else None
            ),
            "clamav": ClamavMirror(databases=["main", "daily"]),
        }
    )


def make(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    bundles: bool = True,
    rules: int = 1,
    running: dict[str, int] = OLD,
    sessions: int = 0,
) -> tuple[ClamavRollout, FakeGoc, FakeClamavScanners, FakeHAProxy]:
    settings = settings_with(tower(free_port(), free_port()), bundles=bundles)
    monitor = Monitor(
        settings,
        rules_mirror=tmp_path / "rules",
        clamav_mirror=tmp_path / "clamav",
        clamav_state=tmp_path / "state",
    )
    goc, haproxy = FakeGoc(NEW), FakeHAProxy(sessions)
    scanners = FakeClamavScanners(rules if bundles else 0, running)
    monitor.haproxy = haproxy  # type: ignore[assignment]
    for name in ("pull", "read_index", "mirror_versions"):
        monkeypatch.setattr(clamavdb, name, getattr(goc, name))
    monkeypatch.setattr(health, "request", scanners.request)
    monkeypatch.setattr(canary, "send_canary", scanners.canary)
    for s in monitor.pool.scanners:
        s.enabled, s.healthy = True, True
        s.rules_bundle, s.clamav = (rules if bundles else 0), dict(running)
    if bundles:
        (tmp_path / "rules").mkdir()
        for v in (1, 2):
            (tmp_path / "rules" / f"rules-{v}.tar.gz").write_bytes(b"")
        monitor.rollout = Rollout(monitor, tmp_path / "rules")
    monitor.clamav_rollout = ClamavRollout(
        monitor,
        tmp_path / "clamav",
        tmp_path / "state",
        samples=monitor.rollout.samples if monitor.rollout is not None else None,
    )
    return monitor.clamav_rollout, goc, scanners, haproxy


def metric(monitor: Monitor, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(monitor.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no {name}{labels}")


def test_the_mirrors_set_is_rolled_window_by_window(tmp_path, monkeypatch) -> None:
    clamav, goc, scanners, haproxy = make(tmp_path, monkeypatch)
    monitor = clamav.monitor
    assert clamav.state.target is None  # nothing mirrored yet
    assert asyncio.run(clamav.pull()) is True
    assert goc.pulls == [("http://127.0.0.9:8026/clamav", tmp_path / "clamav", ["main", "daily"])]
    assert clamav.state.target == NEW
    assert metric(monitor, "mailtower_clamav_mirror_version", db="daily") == 2
    assert metric(monitor, "mailtower_clamav_behind_scanners") == 3
    asyncio.run(clamav.roll())
    assert scanners.clamav == dict.fromkeys(SCANNERS, NEW)
    first = SCANNERS[0]
    # The first scanner went alone: its window ended before any other began…
    assert scanners.events[:2] == [("start", first), ("end", first)]
    assert scanners.most_at_once == 2  # …then 2 at once: 3 in service − 1 spare
    assert haproxy.maint_at_once <= 2
    assert set(haproxy.state.values()) == {"ready"}
    assert all(s.clamav == NEW and not s.held for s in monitor.pool.scanners)
    assert scanners.version == dict.fromkeys(SCANNERS, 1)  # the rules untouched
    assert clamav.behind() == [] and clamav.state.rejected == []
    assert metric(monitor, "mailtower_clamav_updates_total", result="ok") == 3
    assert metric(monitor, "mailtower_clamav_behind_scanners") == 0
    # Nothing new at the GOC: the next round has nothing to do.
    assert asyncio.run(clamav.pull()) is False
    asyncio.run(clamav.roll())
    assert len(scanners.events) == 6


def test_the_gocs_feed_set_is_rolled_without_a_tower_setting(tmp_path, monkeypatch) -> None:
    clamav, goc, scanners, _ = make(tmp_path, monkeypatch)
    goc.served |= {"feeds": {}, "feeds_serial": 3}
    assert clamav.config.databases == ["main", "daily"]  # no "feeds" among them
    assert asyncio.run(clamav.pull()) is True
    assert clamav.state.target == {**NEW, "feeds": 3}
    assert metric(clamav.monitor, "mailtower_clamav_mirror_version", db="feeds") == 3
    asyncio.run(clamav.roll())
    assert scanners.clamav == dict.fromkeys(SCANNERS, {**NEW, "feeds": 3})
    goc.served["feeds_serial"] = 4  # a new feed set alone moves the target
    assert asyncio.run(clamav.pull()) is True and clamav.state.target == {**NEW, "feeds": 4}
    assert clamav.scanners_behind() == 3


def test_the_two_rollouts_never_take_capacity_at_once(tmp_path, monkeypatch) -> None:
    clamav, _, scanners, haproxy = make(tmp_path, monkeypatch)
    rules = clamav.monitor.rollout
    assert rules is not None
    rules.state.target = 2
    asyncio.run(clamav.pull())

    async def both() -> None:
        await asyncio.gather(rules.roll(), clamav.roll())

    asyncio.run(both())
    assert scanners.version == dict.fromkeys(SCANNERS, 2)
    assert scanners.clamav == dict.fromkeys(SCANNERS, NEW)
    assert scanners.overlaps == []  # no scanner in two windows at once
    assert scanners.most_at_once <= 2 and haproxy.maint_at_once <= 2  # 3 − 1 spare, together
    assert set(haproxy.state.values()) == {"ready"}
    assert not clamav.monitor.windows_lock.locked()


def test_a_set_failing_its_canary_on_the_first_scanner_is_rejected(tmp_path, monkeypatch) -> None:
    clamav, goc, scanners, haproxy = make(tmp_path, monkeypatch)
    scanners.bad.append(NEW)
    asyncio.run(clamav.pull())
    asyncio.run(clamav.roll())
    first = SCANNERS[0]
    assert scanners.order == [(first, "clamav-apply", None), (first, "clamav-rollback", None)]
    assert scanners.clamav == dict.fromkeys(SCANNERS, OLD)  # nobody runs the bad set
    assert clamav.state.rejected == [NEW] and clamav.state.target is None
    assert set(haproxy.state.values()) == {"ready"}
    assert clamav.behind() == []
    assert metric(clamav.monitor, "mailtower_clamav_rejected") == 1
    assert "came back virus, not clean" in (clamav.state.last_error or "")
    # The GOC still serves it: it stays rejected, also for a restarted monitor.
    asyncio.run(clamav.pull())
    asyncio.run(clamav.roll())
    assert len(scanners.order) == 2
    again = ClamavRollout(clamav.monitor, tmp_path / "clamav", tmp_path / "state")
    assert again.state.rejected == [NEW] and again.state.target is None
    # A newer set from the GOC is rolled.
    newer = {"daily": 3, "main": 1}
    goc.served = goc.index_of(newer)
    assert asyncio.run(again.pull()) is True
    asyncio.run(again.roll())
    assert scanners.clamav == dict.fromkeys(SCANNERS, newer)
    assert metric(clamav.monitor, "mailtower_clamav_rejected") == 0


def test_a_failed_apply_is_retried_later(tmp_path, monkeypatch) -> None:
    clamav, _, scanners, haproxy = make(tmp_path, monkeypatch)
    broken = SCANNERS[2]
    scanners.refusing.add(broken)
    asyncio.run(clamav.pull())
    asyncio.run(clamav.roll())
    asyncio.run(clamav.roll())  # the broken one is not drained again at once
    assert scanners.clamav == {SCANNERS[0]: NEW, SCANNERS[1]: NEW, broken: OLD}
    assert [a for a, action, _ in scanners.order if action == "clamav-refused"] == [broken]
    assert set(haproxy.state.values()) == {"ready"}  # back with what it had, canary passed
    assert clamav.state.rejected == [] and clamav.state.target == NEW
    assert "freshclam: mirror unreachable" in (clamav.state.last_error or "")
    assert metric(clamav.monitor, "mailtower_clamav_updates_total", result="failed") == 1
    # After RETRY_AFTER_S it is tried again; it works now.
    scanners.refusing.clear()
    clamav._retry_at = {name: 0.0 for name in clamav._retry_at}
    asyncio.run(clamav.roll())
    assert scanners.clamav[broken] == NEW and clamav.behind() == []


def test_a_scanner_that_was_down_is_caught_up(tmp_path, monkeypatch) -> None:
    clamav, _, scanners, haproxy = make(tmp_path, monkeypatch)
    down = clamav.monitor.pool.scanners[2]
    down.healthy = False  # its probes fail: neither in service nor behind
    asyncio.run(clamav.pull())
    asyncio.run(clamav.roll())
    assert scanners.clamav[down.address] == OLD
    assert [s.address for s in clamav.monitor.pool.scanners if s.clamav == NEW] == SCANNERS[:2]
    assert clamav.scanners_behind() == 0  # only scanners serving count
    down.healthy = True  # back, with the databases it had
    assert clamav.scanners_behind() == 1 and clamav.behind() == [down]
    asyncio.run(clamav.roll())
    assert scanners.clamav == dict.fromkeys(SCANNERS, NEW)
    assert haproxy.state[down.name] == "ready"


def test_clamav_without_bundles(tmp_path, monkeypatch) -> None:
    clamav, _, scanners, _ = make(tmp_path, monkeypatch, bundles=False)
    monitor = clamav.monitor
    assert monitor.rollout is None and not hasattr(monitor.metrics, "rules_target")
    asyncio.run(clamav.pull())
    asyncio.run(clamav.roll())
    # The built-in canaries, answered with the shipped rules (rules_bundle=0), passed.
    assert scanners.clamav == dict.fromkeys(SCANNERS, NEW)
    assert monitor.pool_state()["clamav"]["target"] == NEW
    assert monitor.pool_state()["rules"] is None


def test_the_goc_unreachable_keeps_the_mirror_as_target(tmp_path, monkeypatch) -> None:
    clamav, goc, _, _ = make(tmp_path, monkeypatch)
    asyncio.run(clamav.pull())
    goc.down = True
    assert asyncio.run(clamav.pull()) is False
    assert clamav.state.target == NEW
    assert metric(clamav.monitor, "mailtower_clamav_pull_failures_total") == 1
    assert "connection refused" in (clamav.state.last_error or "")


def test_the_health_loop_records_each_scanners_databases(tmp_path, monkeypatch) -> None:
    clamav, _, scanners, _ = make(tmp_path, monkeypatch)
    monitor = clamav.monitor
    asyncio.run(clamav.pull())
    scanners.clamav[SCANNERS[1]] = dict(NEW)
    for s in monitor.pool.scanners:
        s.clamav = None
    monitor._reconcile_due = math.inf
    asyncio.run(monitor.tick())
    assert [s.clamav for s in monitor.pool.scanners] == [OLD, NEW, OLD]
    assert metric(monitor, "mailtower_clamav_scanner_version", scanner="s02", db="daily") == 2
    assert metric(monitor, "mailtower_clamav_scanner_version", scanner="s01", db="daily") == 1
    assert metric(monitor, "mailtower_clamav_behind_scanners") == 2


def test_the_mirrors_state_in_metrics_and_for_the_goc(tmp_path, monkeypatch) -> None:
    clamav, goc, _, _ = make(tmp_path, monkeypatch)
    monitor = clamav.monitor
    assert metric(monitor, "mailtower_clamav_mirror_age_seconds") == math.inf  # no mirror
    last_ok = time.time() - 3600
    goc.served = goc.index_of(NEW, last_ok=last_ok, cooldown_until=time.time() + 600, refusals=3)
    asyncio.run(clamav.pull())
    assert 3600 <= metric(monitor, "mailtower_clamav_mirror_age_seconds") < 3700
    assert metric(monitor, "mailtower_clamav_upstream_cooldown") == 1
    assert metric(monitor, "mailtower_clamav_upstream_refusals") == 3
    # the database's own age: its CVD header's build time
    built = metric(monitor, "mailtower_clamav_database_built_timestamp_seconds", db="daily")
    assert built == BUILT_AT
    monitor.pool.scanners[0].clamav = dict(NEW)
    status = monitor.tower_status(queue_size=0)
    assert status.clamav == {
        "databases": {
            "daily": {"version": 2, "built_at": BUILT_AT, "behind": 2},
            "main": {"version": 1, "built_at": BUILT_AT, "behind": 0},
        },
        "upstream_last_ok": last_ok,
        "scanners_behind": 2,
        "rejected": False,
    }


def test_a_tower_with_clamav_needs_the_canary_secret() -> None:
    data: dict[str, Any] = {
        "name": "unit",
        "hostname": "mx.unit.test",
        "hosts": {"relay": "10.0.0.1", "monitor": "10.0.0.2", "sql": ["10.0.0.3", "10.0.0.4"]}
        | {"scanners": ["10.0.0.5"]},
        "goc": {"address": "10.0.9.10"},
        "clamav": {"databases": ["test"]},
        "secrets": dict.fromkeys(
            ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication", "sql_sync")
            + ("goc_sync", "goc_status"),
            "x" * 16,
        ),
    }
    with pytest.raises(SettingsError, match="needs secrets.canary"):
        from_data(data)
    data["secrets"]["canary"] = "c" * 16
    assert from_data(data).clamav is not None
