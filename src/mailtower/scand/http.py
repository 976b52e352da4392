"""scand's tiny HTTP/1.0 server: GET /health for the monitor, GET /metrics for Prometheus, and
the monitor's rule-bundle requests (POST /rules/apply, POST /rules/rollback; see
mailtower.scand.bundle_apply) and official ClamAV database requests (POST /clamav/apply,
POST /clamav/rollback; see mailtower.scand.clamav_apply) and its rolling upgrade's restart
(POST /stack/restart; see mailtower.scand.stack), which carry the tower's canary secret.

It serves a :class:`Source`: one in-process :class:`Scanner` (tests, a single process), or
the supervisor of scand's worker processes (mailtower.scand.workers), which answers for all.
"""

from __future__ import annotations

import abc
import asyncio
import hmac
import json
import logging
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mailtower import bundles
from mailtower._fsio import write_durable
from mailtower.clamavdb import DatabaseError
from mailtower.scand import bundle_apply, clamav_apply, stack
from mailtower.scand.errors import ClamavApplyError
from mailtower.scanning.engines import Engine
from mailtower.scanning.errors import EngineError

if TYPE_CHECKING:
    from mailtower.scand.server import Scanner
    from mailtower.settings import TowerSettings

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_S = 5.0
_MAX_BODY = 4096
TOKEN_HEADER = "x-mailtower-token"
_POSTS = (
    "/rules/apply",
    "/rules/rollback",
    "/clamav/apply",
    "/clamav/rollback",
    "/stack/restart",
)
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class Source(abc.ABC):
    """What /health and /metrics report and /rules/* act on (a base class, not a protocol: a
    Scanner has a ``health`` method of another kind)."""

    def __init__(self) -> None:
        self._rules_lock = asyncio.Lock()  # one bundle request at a time
        # What this process started with (stack.digest), set by start_http; and the settings
        # file whose content is part of the digest.
        self.stack_running: str | None = None
        self.stack_settings: Path | None = None
        self._clamav_lock = asyncio.Lock()  # one ClamAV database request at a time
        # Both kinds reload clamd and c-icap and wait for a probe: never two at once.
        self._engines_lock = asyncio.Lock()

    @abc.abstractmethod
    def current_settings(self) -> TowerSettings: ...

    @abc.abstractmethod
    async def health(self) -> tuple[int, dict[str, object]]: ...

    @abc.abstractmethod
    def metrics(self) -> bytes: ...

    @abc.abstractmethod
    async def reload_rules(self, version: int | None) -> None:
        """Rebuild the scan pipeline(s) from the bundle ``current`` names now; return once
        every process scans with ``version``, or raise ApplyError."""

    def rules_state(self) -> dict[str, object]:
        """For /health: the bundle installed (what a restart would load) and whether a bundle
        request is being carried out."""
        try:
            installed = bundle_apply.current_version(self.current_settings())
        except bundles.BundleError as exc:
            return {"rules_installed": None, "rules_error": str(exc), "rules_busy": True}
        return {"rules_installed": installed, "rules_busy": self._rules_lock.locked()}

    async def rules(self, action: str, version: int | None) -> tuple[int, dict[str, object]]:
        """POST /rules/apply (``version``) or /rules/rollback: the bundle, then the pipeline.
        A failure after the bundle changed puts the one before back (files, ClamAV, pipeline)
        before answering, so a refusal leaves the scanner as it was."""
        async with self._rules_lock, self._engines_lock:
            settings = self.current_settings()
            before = bundle_apply.current_version(settings)
            try:
                if action == "apply":
                    assert version is not None
                    done = await asyncio.to_thread(bundle_apply.apply, settings, version)
                else:
                    done = await asyncio.to_thread(bundle_apply.rollback, settings)
                await self.reload_rules(done.version)
            except (bundle_apply.ApplyError, bundles.BundleError, OSError) as exc:
                log.error("event=rules_%s_failed version=%s error=%r", action, version, str(exc))
                restored = await self._restore(settings, before)
                return 409, {
                    "status": "refused",
                    "action": action,
                    "reason": str(exc),
                    "rules_bundle": restored,
                }
        log.info(
            "event=rules_%s rules_bundle=%s installed=%s clamav_reloaded=%s seconds=%.2f",
            action,
            done.version,
            done.installed,
            done.clamav_reloaded,
            done.seconds,
        )
        return 200, {
            "status": "ok",
            "action": action,
            "rules_bundle": done.version,
            "installed": done.installed,
            "clamav_reloaded": done.clamav_reloaded,
            "seconds": round(done.seconds, 3),
        }

    async def _restore(self, settings: TowerSettings, before: int | None) -> int | None:
        """Back to bundle ``before`` after a failed request; the version scanning now."""
        try:
            if bundle_apply.current_version(settings) != before:
                await asyncio.to_thread(bundle_apply.restore, settings, before)
            await self.reload_rules(before)
        except (bundle_apply.ApplyError, bundles.BundleError, OSError) as exc:
            log.critical("event=rules_restore_failed version=%s error=%r", before, str(exc))
            return None
        log.warning("event=rules_restored rules_bundle=%s", before)
        return before

    def stack_state(self) -> dict[str, object]:
        """For /health: the digest of what runs and of what a restart would run — null, with
        the reason in ``stack_pending``, while that is not ready to roll (stack.pending)."""
        waits = stack.pending()
        installed = None if waits else stack.digest(self.stack_settings)
        return {"stack": self.stack_running, "stack_installed": installed, "stack_pending": waits}

    def clamav_state(self) -> dict[str, object]:
        """For /health: the official ClamAV databases live in clamd's directory ({db:
        version}) and whether a ClamAV request is being carried out; {} when the tower takes
        none (settings.clamav unset)."""
        settings = self.current_settings()
        if settings.clamav is None:
            return {}
        busy = self._clamav_lock.locked()
        try:
            versions = clamav_apply.live(settings)
        except (DatabaseError, OSError) as exc:
            return {"clamav": {}, "clamav_error": str(exc), "clamav_busy": busy}
        return {"clamav": versions, "clamav_busy": busy}

    async def clamav(
        self, action: str, versions: dict[str, int] | None
    ) -> tuple[int, dict[str, object]]:
        """POST /clamav/apply (``versions``) or /clamav/rollback (mailtower.scand.clamav_apply:
        a failure puts the databases before back before answering)."""
        async with self._clamav_lock, self._engines_lock:
            settings = self.current_settings()
            try:
                if action == "apply":
                    assert versions is not None
                    done = await asyncio.to_thread(clamav_apply.apply, settings, versions)
                else:
                    done = await asyncio.to_thread(clamav_apply.rollback, settings)
            except (bundle_apply.ApplyError, DatabaseError, OSError) as exc:
                status = exc.status if isinstance(exc, ClamavApplyError) else 409
                log.error("event=clamav_%s_failed asked=%r error=%r", action, versions, str(exc))
                try:
                    now: dict[str, int] | None = clamav_apply.live(settings)
                except (bundle_apply.ApplyError, DatabaseError, OSError):
                    now = None
                return status, {
                    "status": "refused" if status == 409 else "failed",
                    "action": action,
                    "reason": str(exc),
                    "clamav": now,
                }
        log.info(
            "event=clamav_%s clamav=%r installed=%s reloaded=%s seconds=%.2f",
            action,
            done.versions,
            done.installed,
            done.reloaded,
            done.seconds,
        )
        return 200, {
            "status": "ok",
            "action": action,
            "clamav": done.versions,
            "installed": done.installed,
            "reloaded": done.reloaded,
            "seconds": round(done.seconds, 3),
        }


class ScannerSource(Source):
    """One in-process scanner (``settings_path``: where SIGHUP and /rules reload it from)."""

    def __init__(self, scanner: Scanner, settings_path: Path | None = None) -> None:
        super().__init__()
        self.scanner = scanner
        self.settings_path = settings_path

    def current_settings(self) -> TowerSettings:
        return self.scanner.settings

    async def health(self) -> tuple[int, dict[str, object]]:
        return await health(self.scanner)

    def metrics(self) -> bytes:
        return generate_latest(self.scanner.metrics.registry)

    async def reload_rules(self, version: int | None) -> None:
        from mailtower import settings as settings_mod

        def load() -> None:
            with self.scanner.reload_lock:  # SIGHUP's too: one reload at a time
                new = settings_mod.load(self.settings_path) if self.settings_path else None
                self.scanner.reload(new or self.scanner.settings)

        try:
            await asyncio.to_thread(load)
        except Exception as exc:  # bad rules or settings: the old pipeline stays
            raise bundle_apply.ApplyError(f"scand could not load the rules: {exc!r}") from exc
        if self.scanner.rules_version != version:
            raise bundle_apply.ApplyError(
                f"scand scans with bundle {self.scanner.rules_version}, not {version}"
            )


async def engine_versions(engines: Sequence[Engine], timeout: float) -> dict[str, str]:
    """Each engine's version (``health``); raises EngineError or TimeoutError."""

    def versions() -> dict[str, str]:
        return {e.name: e.health(timeout) for e in engines}

    # A thread of its own: a busy scan pool must not make a healthy scanner look dead.
    # Engines enforce the timeout themselves; the margin only guards against a stuck one.
    return await asyncio.wait_for(asyncio.to_thread(versions), timeout + 1.0)


async def health(scanner: Scanner) -> tuple[int, dict[str, object]]:
    """200 + engine versions when every engine answers within ``health_timeout_s``, else 503.
    Every answer names the rule bundle version in use (``rules_bundle``; null: shipped rules)."""
    bundle = scanner.rules_version
    if scanner.draining:
        return 503, {
            "status": "draining",
            "reason": "scand is shutting down",
            "rules_bundle": bundle,
            "in_flight": scanner.in_flight,
        }
    timeout = scanner.settings.limits.health_timeout_s
    try:
        # A thread of its own: a busy scan pool must not make a healthy scanner look dead.
        # Engines enforce the timeout themselves; the margin only guards against a stuck one.
        versions = await asyncio.wait_for(asyncio.to_thread(scanner.health), timeout + 1.0)
    except TimeoutError:
        return 503, {
            "status": "fail",
            "reason": f"engine did not answer within {timeout}s",
            "rules_bundle": bundle,
            "in_flight": scanner.in_flight,
        }
    except EngineError as exc:
        return 503, {
            "status": "fail",
            "reason": str(exc),
            "rules_bundle": bundle,
            "in_flight": scanner.in_flight,
        }
    return 200, {"status": "ok", **versions, "rules_bundle": bundle, "in_flight": scanner.in_flight}


async def _rules_request(
    source: Source, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, object]]:
    """POST /rules/apply {"version": N} or /rules/rollback, with the canary secret."""
    if not _authorized(source, headers):
        return 403, {"status": "refused", "reason": "missing or wrong X-Mailtower-Token"}
    if path == "/rules/rollback":
        return await source.rules("rollback", None)
    try:
        version = json.loads(body)["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(version)
    except (ValueError, KeyError, TypeError) as exc:
        return 400, {"status": "refused", "reason": f'body must be {{"version": N}}: {exc!r}'}
    return await source.rules("apply", version)


async def _stack_request(
    source: Source, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, object]]:
    """POST /stack/restart, with the canary secret: answered, then a graceful stop that
    systemd follows with a start of what is installed (the monitor has drained the scanner)."""
    if not _authorized(source, headers):
        return 403, {"status": "refused", "reason": "missing or wrong X-Mailtower-Token"}
    state = source.stack_state()
    if state["stack_installed"] is None or state["stack_installed"] == source.stack_running:
        # nothing to restart for (or not yet): a restart would only empty a scanner
        reason = state["stack_pending"] or "it runs what is installed"
        return 409, {"status": "current", "reason": f"nothing to restart: {reason}", **state}
    settings = source.current_settings()
    cooldown = stack.restart_cooldown_s(settings)
    mark = Path(settings.spool_dir) / stack.RESTARTED
    try:
        ago = time.time() - float(mark.read_text())
    except (OSError, ValueError):
        ago = None
    if ago is not None and 0 <= ago < cooldown:
        return 409, {
            "status": "cooldown",
            "reason": f"restarted {ago:.0f}s ago; another restart after {cooldown:g}s",
            "retry_after_s": round(cooldown - ago, 1),
            **state,
        }
    try:
        write_durable(mark, f"{time.time():.3f}\n".encode())
    except OSError as exc:  # the cooldown is a guard, not a reason to refuse the window
        log.error("event=stack_restart_not_recorded path=%s error=%r", mark, exc)
    log.warning("event=stack_restart running=%s", source.stack_running)
    asyncio.get_running_loop().call_later(0.2, stack.restart_self)
    return 200, {"status": "restarting", **state}


def _authorized(source: Source, headers: dict[str, str]) -> bool:
    secret = source.current_settings().secrets.canary
    given = headers.get(TOKEN_HEADER, "")
    return secret is not None and hmac.compare_digest(given.encode(), secret.encode())


async def _clamav_request(
    source: Source, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, object]]:
    """POST /clamav/apply {"versions": {db: N}} or /clamav/rollback, with the canary secret."""
    if not _authorized(source, headers):
        return 403, {"status": "refused", "reason": "missing or wrong X-Mailtower-Token"}
    if path == "/clamav/rollback":
        return await source.clamav("rollback", None)
    try:
        versions = json.loads(body)["versions"]
        if not isinstance(versions, dict) or not versions:
            raise ValueError(versions)
        for db, version in versions.items():
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"{db}: {version!r}")
    except (ValueError, KeyError, TypeError) as exc:
        return 400, {
            "status": "refused",
            "reason": f'body must be {{"versions": {{"<db>": N, …}}}}: {exc!r}',
        }
    return await source.clamav("apply", versions)


async def _handle(
    source: Source, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        request = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT_S)
        headers: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT_S)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        parts = request.decode("latin-1").split()
        if len(parts) < 2:
            status, ctype, body = 400, "text/plain", b"bad request\n"
        elif parts[0] == "POST" and parts[1] in _POSTS:
            length = int(headers.get("content-length", "0") or 0)
            if not 0 <= length <= _MAX_BODY:
                status, ctype, body = 400, "text/plain", b"body too large\n"
            else:
                data = await asyncio.wait_for(reader.readexactly(length), _REQUEST_TIMEOUT_S)
                handler = {"rules": _rules_request, "stack": _stack_request}.get(
                    parts[1].split("/")[1], _clamav_request
                )
                status, doc = await handler(source, parts[1], headers, data)
                ctype, body = "application/json", json.dumps(doc).encode() + b"\n"
        elif parts[0] != "GET":
            status, ctype, body = (
                405,
                "text/plain",
                b"only GET (and POST /rules/*, /clamav/*, /stack/*)\n",
            )
        elif parts[1] == "/health":
            status, doc = await source.health()
            doc.update(source.rules_state())
            doc.update(source.clamav_state())
            doc.update(source.stack_state())
            ctype, body = "application/json", json.dumps(doc).encode() + b"\n"
        elif parts[1] == "/metrics":
            status, ctype = 200, CONTENT_TYPE_LATEST
            body = source.metrics()
        else:
            status, ctype, body = 404, "text/plain", b"not found\n"
        head = (
            f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
    except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError) as exc:
        log.debug("event=http_client_error error=%r", exc)
    finally:
        writer.close()


async def start_http(
    scanner: Scanner | Source, host: str, port: int, *, sock: socket.socket | None = None
) -> asyncio.Server:
    """Serve /health and /metrics of ``scanner`` (a Scanner or any Source) on ``host:port``,
    or on the bound socket ``sock``."""
    source = scanner if isinstance(scanner, Source) else ScannerSource(scanner)
    source.stack_settings = getattr(source, "settings_path", None)
    source.stack_running = stack.running_digest(source.stack_settings)
    if sock is not None:
        return await asyncio.start_server(lambda r, w: _handle(source, r, w), sock=sock)
    return await asyncio.start_server(
        lambda r, w: _handle(source, r, w), host=host, port=port, reuse_address=True
    )
