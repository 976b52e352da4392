"""Rule bundles on the monitor: pull from the GOC, verify, mirror, roll across the pool.

Every ``bundles.poll_interval_s`` the monitor reads the GOC's ``latest.json``. A newer bundle
is downloaded and published into the tower's mirror with ``bundles.publish`` (signature,
hashes, newer than the mirror's, rules compile — or the mirror is left as it was); that
version becomes the pool's target.

A scanner whose health answer names another version is updated in a window of its own:

1. set to maintenance in the relay's HAProxy (no new connections; sessions open finish),
2. wait until it has no message in flight,
3. ``POST /rules/apply`` — the scanner fetches the bundle from the mirror, installs it, has
   clamd and c-icap load its ClamAV databases, and reloads its pipeline,
4. the canary: an EICAR message must come back ``virus``, a clean one ``clean``, and each
   sample the bundle carries (``canary/<verdict>-<name>.eml``) its verdict, all scanned with
   the target version (answered by scand, never delivered),
5. back in service.

The first scanner of a new version goes alone. If its canary fails, it is rolled back
(``POST /rules/rollback``, canary again) and the version is rejected: no other scanner gets
it, and the monitor waits for a newer one. Afterwards up to ``bundles.batch`` scanners are
updated at once, but never so many that fewer than the load needs plus ``bundles.spare``
stay in service; with no room the rollout waits. clamd reloads happen inside these windows,
so the pool never has all its clamds reloading at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import smtplib
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mailtower import bundles
from mailtower._fsio import write_durable
from mailtower.bundles._format import MAX_BUNDLE_BYTES
from mailtower.monitor import health
from mailtower.monitor.haproxy import HAProxyError, RuntimeAPI
from mailtower.monitor.metrics import MonitorMetrics
from mailtower.monitor.pool import MAINT, READY, Pool, Scanner
from mailtower.scanning import testdata
from mailtower.settings import TowerSettings


class Monitor(Protocol):
    """What a rollout needs of the monitor that runs it (mailtower.monitor.service.Monitor):
    its settings, pool and metrics, and the relay's HAProxy with the lock every change of a
    scanner's state takes."""

    settings: TowerSettings
    pool: Pool
    metrics: MonitorMetrics
    haproxy: RuntimeAPI
    haproxy_lock: asyncio.Lock


log = logging.getLogger("mailtower.monitor.rollout")

MIRROR_DIR = Path("/srv/mailtower/mirror/rules")  # served by nginx as <mirror_url>/rules
REJECTED = "rejected.json"
# Scanners that may run rules no canary has passed (in an apply, or stuck): kept out of
# service by a restarted monitor until it has checked them.
UNVERIFIED = "unverified.json"
FETCH_TIMEOUT_S = 30.0
CANARY_TIMEOUT_S = 30.0
TOKEN_HEADER = "X-Mailtower-Token"
# A scanner whose update failed (not the canary of a new version: that rejects the version)
# is left alone this long, so one broken scanner is not drained again every round.
RETRY_AFTER_S = 60.0
# What scand may spend on an apply besides its reload (bundles.apply_timeout_s): the fetch
# (30 s), the ClamAV check by clamscan (120 s) and the probe wait (60 s), and a margin. An
# apply that outlasts it shows as rules_busy in the scanner's health until it ends.
SCAND_APPLY_BUDGET_S = 240.0


class RolloutError(Exception):
    """One scanner's update failed; the message names the scanner and the step."""


class CanaryFailed(RolloutError):
    """A canary came back with the wrong verdict, or scanned with another version: the rules
    are wrong (not a scanner that could not answer, which is a plain RolloutError)."""


@dataclass
class RolloutState:
    """What the monitor knows about rule versions (also shown on /pool and in metrics)."""

    target: int | None = None  # the mirror's version, unless rejected
    rejected: set[int] = field(default_factory=set)
    applying: set[str] = field(default_factory=set)  # scanners in an update window
    stuck: set[str] = field(default_factory=set)  # kept out: no rules that passed a canary
    last_error: str | None = None


def fetch(url: str, timeout_s: float = FETCH_TIMEOUT_S, limit: int | None = None) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return reply.read(limit or MAX_BUNDLE_BYTES + 1)


_CANARY_HEAD = (
    b"From: monitor@mailtower.invalid\r\nTo: canary@mailtower.invalid\r\n"
    b"Subject: rule bundle canary\r\n\r\n"
)


def builtin_canaries() -> list[bundles.Canary]:
    """What every version must get right, whatever its bundle carries: EICAR (built here, never
    stored) is a virus, an ordinary message is clean."""
    return [
        bundles.Canary("eicar", "virus", _CANARY_HEAD + testdata.eicar() + b"\r\n"),
        bundles.Canary("clean", "clean", _CANARY_HEAD + b"An ordinary line of a message.\r\n"),
    ]


def marked(message: bytes, token: str) -> bytes:
    """``message`` with the canary header: scand answers it and delivers nothing."""
    return f"X-Mailtower-Canary: {token}\r\n".encode() + message


def send_canary(address: str, port: int, raw: bytes) -> str:
    """Hand one marked canary to the scanner's filter port; scand's answer (blocking)."""
    with smtplib.SMTP(address, port, timeout=CANARY_TIMEOUT_S) as smtp:
        smtp.ehlo("monitor.mailtower.invalid")
        code, reply = smtp.mail("monitor@mailtower.invalid")
        if code != 250:
            raise RolloutError(f"MAIL FROM answered {code} {reply!r}")
        code, reply = smtp.rcpt("canary@mailtower.invalid")
        if code != 250:
            raise RolloutError(f"RCPT TO answered {code} {reply!r}")
        code, reply = smtp.data(raw)
        return f"{code} {reply.decode(errors='replace')}"


def check_canary_answer(answer: str, expect: str, version: int | None, name: str = "") -> None:
    """Raise RolloutError unless ``answer`` is scand's canary reply with the verdict
    ``expect``, scanned with ``version``."""
    what = f"canary {name or expect}"
    fields = dict(p.split("=", 1) for p in answer.split() if "=" in p)
    if not answer.startswith("250") or "canary" not in answer:
        raise RolloutError(f"{what} was not answered as a canary: {answer!r}")
    verdict = fields.get("verdict")
    if verdict == "tempfail":  # an engine did not answer: says nothing about the rules
        raise RolloutError(f"{what} was tempfailed: {answer!r}")
    if fields.get("rules_bundle") != str(version or 0):
        raise CanaryFailed(f"{what} was scanned with another bundle: {answer!r}")
    if verdict != expect:
        raise CanaryFailed(f"{what} came back {verdict}, not {expect}: {answer!r}")


class Rollout:
    """The monitor's bundle mirror and the rolling update of its scanners."""

    def __init__(self, monitor: Monitor, mirror_dir: Path = MIRROR_DIR) -> None:
        settings = monitor.settings
        assert settings.bundles is not None and settings.secrets.canary is not None
        self.monitor = monitor
        self.settings = settings
        self.config = settings.bundles
        self.source = settings.bundle_source
        self.mirror_dir = mirror_dir
        self.token = settings.secrets.canary
        self.public_key = bundles.public_key_from_pem(self.config.public_key)
        self.state = RolloutState(rejected=self._load_rejected())
        self._retry_at: dict[str, float] = {}  # scanner → when to try it again after a failure
        self._samples: dict[int, list[bundles.Canary]] = {}  # version → its canary samples
        self.state.target = self.good_target()
        self._unverified: set[str] = set()
        for name in self._load_unverified():
            if name in {sc.name for sc in monitor.pool.scanners}:
                monitor.pool[name].held = True  # before the health loop's first tick
                self.state.stuck.add(name)
                self._unverified.add(name)
        self._said_none = False

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "event=rollout_start source=%s mirror=%s target=%s batch=%d spare=%d",
            self.source,
            self.mirror_dir,
            self.state.target,
            self.config.batch,
            self.config.spare,
        )
        while not stop.is_set():
            try:
                await self.pull()
                await self.roll()
            except Exception as exc:  # a round that fails is logged; the next one tries again
                self.state.last_error = str(exc)
                log.exception("event=rollout_round_failed error=%r", str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.poll_interval_s)

    async def pull(self) -> bool:
        """Mirror the GOC's latest bundle if it is newer; True when the target moved."""
        m = self.monitor.metrics
        try:
            doc = await asyncio.to_thread(fetch, f"{self.source}/latest.json", 10.0, 64 * 1024)
            latest = bundles.parse_latest(doc)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                m.rules_pull_failures.inc()
                log.warning("event=rules_pull_failed source=%s error=%r", self.source, str(exc))
            elif not self._said_none:  # nothing published at the GOC yet: normal, said once
                log.info("event=rules_none_published source=%s", self.source)
                self._said_none = True
            return False
        except (OSError, bundles.BundleError) as exc:
            m.rules_pull_failures.inc()
            log.warning("event=rules_pull_failed source=%s error=%r", self.source, str(exc))
            return False
        mirrored = bundles.read_latest(self.mirror_dir) if self.mirror_dir.is_dir() else None
        if mirrored is not None and latest.version <= mirrored.version:
            return False
        if latest.version in self.state.rejected:
            return False
        started = time.monotonic()
        self.mirror_dir.mkdir(parents=True, exist_ok=True)
        incoming = self.mirror_dir / f".incoming-{latest.file}"
        try:
            data = await asyncio.to_thread(fetch, f"{self.source}/{latest.file}")
            incoming.write_bytes(data)
            published = await asyncio.to_thread(
                bundles.publish, incoming, self.public_key, self.mirror_dir
            )
        except (OSError, bundles.BundleError) as exc:
            m.rules_pull_failures.inc()
            log.error(
                "event=rules_bundle_refused version=%s source=%s error=%r",
                latest.version,
                self.source,
                str(exc),
            )
            return False
        finally:
            incoming.unlink(missing_ok=True)
        if published.version in self.state.rejected:  # latest.json is not signed: the bundle is
            return False
        self.state.target = published.version
        m.rules_target.set(published.version)
        log.info(
            "event=rules_mirrored version=%d seconds=%.2f",
            published.version,
            time.monotonic() - started,
        )
        return True

    # -- rolling -------------------------------------------------------------------------------

    def behind(self) -> list[Scanner]:
        """Scanners in service that do not run the target version, in pool order."""
        target = self.state.target
        if target is None:
            return []
        now = time.monotonic()
        return [
            s
            for s in self.monitor.pool.scanners
            if s.enabled
            and s.healthy
            and not s.held
            and s.rules_bundle != target
            and self._retry_at.get(s.name, 0.0) <= now
        ]

    def room(self, sessions: int) -> int:
        """How many scanners may leave service now: the rest must carry ``sessions``."""
        pool = self.monitor.pool.scanners
        in_service = sum(1 for s in pool if s.enabled and s.healthy and not s.held)
        per_scanner = max(1, self.settings.limits.scan_concurrency)
        needed = math.ceil(sessions / per_scanner) + self.config.spare
        return max(0, min(self.config.batch, in_service - max(needed, 1)))

    async def roll(self) -> None:
        """Update the scanners that are behind, one window after another."""
        m = self.monitor.metrics
        await self.unstick()
        while (todo := self.behind()) and self.state.target is not None:
            target = self.state.target
            if target in self.state.rejected:  # never roll a rejected version further
                return
            first = all(s.rules_bundle != target for s in self.monitor.pool.scanners)
            try:
                sessions = await self.monitor.haproxy.sessions()
            except HAProxyError as exc:
                log.warning("event=rollout_waits reason=haproxy error=%r", str(exc))
                return
            room = self.room(sessions)
            if room < 1:
                log.info("event=rollout_waits reason=capacity sessions=%d", sessions)
                return
            batch = todo[: 1 if first else room]
            results = await asyncio.gather(
                *(self.update(s, target) for s in batch), return_exceptions=True
            )
            failed = False
            for s, result in zip(batch, results, strict=True):
                if not isinstance(result, BaseException):
                    m.rules_updates.labels("ok").inc()
                    self._retry_at.pop(s.name, None)
                    continue
                failed = True
                m.rules_updates.labels("failed").inc()
                self.state.last_error = f"{s.name} ({s.address}): {result}"
                log.error(
                    "event=rules_update_failed scanner=%s address=%s version=%d error=%r "
                    "retry_in_s=%.0f",
                    s.name,
                    s.address,
                    target,
                    str(result),
                    RETRY_AFTER_S,
                )
                if first and isinstance(result, CanaryFailed):
                    self.reject(target)
                else:  # this scanner waits; the others go on in the next round
                    self._retry_at[s.name] = time.monotonic() + RETRY_AFTER_S
            if failed:
                return

    def reject(self, version: int) -> None:
        self.state.rejected.add(version)
        self.state.target = self.good_target()
        self.monitor.metrics.rules_rejected.set(version)
        self.monitor.metrics.rules_target.set(self.state.target or 0)
        try:
            self.mirror_dir.mkdir(parents=True, exist_ok=True)
            write_durable(
                self.mirror_dir / REJECTED,
                (json.dumps(sorted(self.state.rejected)) + "\n").encode(),
            )
        except OSError as exc:  # kept in memory; a restarted monitor would try it once more
            log.error("event=rejected_not_recorded path=%s error=%r", self.mirror_dir, exc)
        log.error(
            "event=rules_bundle_rejected version=%d reason=canary_failed keeping=%s",
            version,
            self.state.target,
        )

    def good_target(self) -> int | None:
        """The newest version the mirror holds that is not rejected (None: none)."""
        held = []
        for path in self.mirror_dir.glob("rules-*.tar.gz") if self.mirror_dir.is_dir() else []:
            number = path.name[len("rules-") : -len(".tar.gz")]
            if number.isdigit() and int(number) not in self.state.rejected:
                held.append(int(number))
        return max(held, default=None)

    async def update(self, s: Scanner, target: int) -> None:
        """One scanner's window: out of service, apply, canary, back (or roll back).

        A scanner goes back in service only with rules that passed their canary: its old ones
        (nothing applied, or rolled back) or the target. When that cannot be established — a
        failed canary whose rollback fails, an apply that did not answer and a scanner that
        does not say what it runs — it stays out (``stuck``) and every round tries again."""
        started = time.monotonic()
        monitor = self.monitor
        self.state.applying.add(s.name)
        asked = settled = False
        try:
            async with monitor.haproxy_lock:  # the health loop sees held before it acts
                s.held = True
                await monitor.haproxy.set_state(s.name, MAINT)
            await self._drained(s)
            asked = True  # from here the scanner may run rules no canary has passed
            self._mark_unverified(s.name, True)
            try:
                status, doc = await self._post(s, "/rules/apply", {"version": target})
            except (OSError, TimeoutError, ValueError) as exc:
                status, doc = 0, {"reason": f"no answer: {exc!r}"}
            if status != 200:
                await self._settle(s)  # refused: nothing changed; no answer: it may have
                settled = True
                raise RolloutError(f"apply answered {status}: {doc.get('reason', doc)}")
            try:
                await self._canary(s, target)
            except CanaryFailed as failed:
                try:
                    await self._roll_back(s)
                except (RolloutError, OSError, TimeoutError, ValueError) as exc:
                    raise CanaryFailed(f"{failed}; and the rollback failed: {exc}") from exc
                settled = True
                raise
            except RolloutError:  # no verdict: the new rules are not checked yet
                await self._settle(s)
                settled = True
                raise
            settled = True
            s.rules_bundle = target
            log.info(
                "event=rules_updated scanner=%s address=%s version=%d seconds=%.2f",
                s.name,
                s.address,
                target,
                time.monotonic() - started,
            )
        finally:
            self.state.applying.discard(s.name)
            if settled or not asked:
                await self._release(s)
            else:
                self.state.stuck.add(s.name)
                self.monitor.metrics.rules_stuck.set(len(self.state.stuck))
                log.critical(
                    "event=rules_scanner_stuck scanner=%s address=%s version=%d "
                    "action='kept out of service; retried every round' "
                    "hint='on the scanner: mailtower bundle status --rules-root %s'",
                    s.name,
                    s.address,
                    target,
                    self.settings.rules_dir,
                )

    async def _release(self, s: Scanner) -> None:
        """Back in service if its health probes say it is well; otherwise left in maintenance
        for the health state machine to set ready after ``recover_after`` good probes.
        Reconcile repeats the HAProxy call if HAProxy does not answer now."""
        monitor = self.monitor
        self._mark_unverified(s.name, False)
        async with monitor.haproxy_lock:
            s.held = False
            self.state.stuck.discard(s.name)
            monitor.metrics.rules_stuck.set(len(self.state.stuck))
            if s.enabled and not s.healthy:
                monitor.pool.adopt(s.name, False, time.time())
                monitor.metrics.scanner_enabled.labels(s.name).set(0)
            if s.enabled:
                with contextlib.suppress(HAProxyError):
                    await monitor.haproxy.set_state(s.name, READY)

    async def _settle(self, s: Scanner) -> None:
        """Establish that the scanner's rules may serve: the canary of the version it runs, and
        a rollback if that fails. Raises when it cannot."""
        port, timeout = self.settings.ports.scanner_http, self.settings.limits.health_timeout_s
        status, doc = await health.request(s.address, port, "GET", "/health", timeout_s=timeout)
        if status != 200:
            raise RolloutError(f"{s.name}: health answered {status}: {doc.get('reason', doc)}")
        running = doc.get("rules_bundle")
        if doc.get("rules_busy"):
            raise RolloutError(f"{s.name}: still carrying out a bundle request")
        if "rules_installed" in doc and doc["rules_installed"] != running:
            raise RolloutError(
                f"{s.name}: runs bundle {running} but has {doc['rules_installed']} installed"
            )
        try:
            await self._canary(s, running)
        except CanaryFailed:
            await self._roll_back(s)
        else:
            s.rules_bundle = running

    async def unstick(self) -> None:
        """Try again with every scanner kept out after a failed update."""
        for name in sorted(self.state.stuck):
            s = self.monitor.pool[name]
            if not s.healthy:
                continue  # down: its health probes say when it is back
            try:
                await self._settle(s)
            except (RolloutError, OSError, TimeoutError, ValueError) as exc:
                log.error("event=rules_scanner_still_stuck scanner=%s error=%r", name, str(exc))
                continue
            log.warning("event=rules_scanner_unstuck scanner=%s version=%s", name, s.rules_bundle)
            await self._release(s)

    async def _post(self, s: Scanner, path: str, body: dict | None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else b""
        port = self.settings.ports.scanner_http
        headers = {TOKEN_HEADER: self.token}
        # scand's own budget: fetch, the bundle checks, the ClamAV probe, then the reload
        timeout = self.config.apply_timeout_s + SCAND_APPLY_BUDGET_S
        return await health.request(s.address, port, "POST", path, data, headers, timeout)

    async def _drained(self, s: Scanner) -> None:
        """Wait until no message is on its way to the scanner: HAProxy has no session open to
        it (the relay opens one per message; a session opened before ``maint`` may not have
        reached DATA yet) and scand has none in flight. At ``drain_timeout_s`` the apply goes
        ahead anyway: messages then in flight finish with the old pipeline, and one that
        reaches DATA later is scanned with the new rules before their canary (never lost)."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        port, timeout = self.settings.ports.scanner_http, self.settings.limits.health_timeout_s
        while True:
            _, doc = await health.request(s.address, port, "GET", "/health", timeout_s=timeout)
            in_flight = doc.get("in_flight")  # None: the scanner could not count; not drained
            try:
                sessions: int | None = (await self.monitor.haproxy.server_sessions()).get(s.name)
            except HAProxyError as exc:
                sessions = None
                log.warning("event=drain_unknown scanner=%s error=%r", s.name, str(exc))
            if in_flight == 0 and sessions == 0:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "event=drain_timeout scanner=%s in_flight=%s sessions=%s action=apply_anyway",
                    s.name,
                    in_flight,
                    sessions,
                )
                return
            await asyncio.sleep(0.2)

    def samples(self, version: int | None) -> list[bundles.Canary]:
        """The canary samples bundle ``version`` carries (read from the mirror once)."""
        if version is None:
            return []
        if version not in self._samples:
            path = self.mirror_dir / f"rules-{version}.tar.gz"
            try:
                found = bundles.canaries(bundles.read(path, self.public_key).files)
            except (OSError, bundles.BundleError) as exc:  # pruned, or never mirrored here
                log.warning("event=canary_samples_unread version=%d error=%r", version, str(exc))
                found = []
            self._samples = {v: c for v, c in self._samples.items() if v >= version - 2}
            self._samples[version] = found
        return self._samples[version]

    async def _canary(self, s: Scanner, version: int | None) -> None:
        """The built-in canaries, then the bundle's own samples: each must get its verdict."""
        port = self.settings.ports.filter
        for sample in builtin_canaries() + self.samples(version):
            raw = marked(sample.message, self.token)
            try:
                answer = await asyncio.to_thread(send_canary, s.address, port, raw)
                check_canary_answer(answer, sample.expect, version, sample.name)
            except CanaryFailed as exc:
                raise CanaryFailed(f"{s.name} ({s.address}): {exc}") from exc
            except (OSError, smtplib.SMTPException, RolloutError) as exc:
                raise RolloutError(f"{s.name} ({s.address}): canary: {exc}") from exc

    async def _roll_back(self, s: Scanner) -> None:
        status, doc = await self._post(s, "/rules/rollback", None)
        if status != 200:
            raise RolloutError(f"{s.name}: rollback answered {status}: {doc.get('reason', doc)}")
        s.rules_bundle = doc.get("rules_bundle")
        await self._canary(s, s.rules_bundle)  # the old version must pass again
        log.warning(
            "event=rules_rolled_back scanner=%s address=%s version=%s",
            s.name,
            s.address,
            s.rules_bundle,
        )

    def _mark_unverified(self, name: str, unverified: bool) -> None:
        before = set(self._unverified)
        (self._unverified.add if unverified else self._unverified.discard)(name)
        if self._unverified == before:
            return
        try:
            self.mirror_dir.mkdir(parents=True, exist_ok=True)
            record = json.dumps(sorted(self._unverified)) + "\n"
            write_durable(self.mirror_dir / UNVERIFIED, record.encode())
        except OSError as exc:
            log.error("event=unverified_not_recorded path=%s error=%r", self.mirror_dir, exc)

    def _load_unverified(self) -> list[str]:
        try:
            names = json.loads((self.mirror_dir / UNVERIFIED).read_text())
        except (OSError, ValueError):
            return []
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def _load_rejected(self) -> set[int]:
        try:
            return {int(v) for v in json.loads((self.mirror_dir / REJECTED).read_text())}
        except (OSError, ValueError, TypeError):
            return set()

    def snapshot(self) -> dict[str, object]:
        return {
            "source": self.source,
            "target": self.state.target,
            "rejected": sorted(self.state.rejected),
            "applying": sorted(self.state.applying),
            "stuck": sorted(self.state.stuck),
            "last_error": self.state.last_error,
        }
