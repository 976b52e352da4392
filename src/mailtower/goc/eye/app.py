"""VirusEye's web server (aiohttp): login, the page, a JSON snapshot and a server-sent event stream.

One ``Hub`` polls the GOC database while at least one browser is connected and pushes each
snapshot to every open ``/events`` stream; nothing is computed per browser. The database is read
with blocking psycopg in a worker thread, never on the event loop.

aiohttp rather than the monitor's tiny stdlib server: this one faces browsers — forms, cookies,
keep-alive and long-lived streams — where a kept HTTP implementation is worth the dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import string
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web

from mailtower.goc.eye import queries
from mailtower.goc.eye.auth import Credentials, LoginLimiter, Session, Sessions
from mailtower.goc.eye.errors import CredentialsError
from mailtower.goc.eye.revocations import MemoryRevocations, RevocationStore

log = logging.getLogger("mailtower.goc.eye")

SESSION_COOKIE = "viruseye_session"
REVOCATIONS_RETRY_S = 2.0  # reading or writing revoked sessions failed: try again this often
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
MAX_BODY = 16 * 1024  # the only body we accept is the login form
STATIC = {  # the only files /static/ serves: name → content type
    "eye.js": "text/javascript; charset=utf-8",
    "eye.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    # Everything comes from this server; no inline script, so injected markup cannot run.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
# Served over HTTPS: browsers that have seen it once never try plain HTTP for a year. Not for
# subdomains: the GOC's name may share its domain with hosts this server knows nothing of.
HSTS = "max-age=31536000"

Source = Callable[[], dict[str, Any]]  # blocking: one snapshot of the database


@dataclass
class EyeConfig:
    """How one VirusEye server runs."""

    credentials: Path
    secret: bytes
    refresh_s: float = 2.0
    window: queries.TimeWindow = field(default_factory=queries.TimeWindow)
    session_lifetime_s: int = 12 * 3600
    # Served over HTTPS (directly or behind a TLS proxy): the session cookie is Secure and
    # every response carries HSTS. Only a loopback listener is ever plain (tests, a proxy).
    secure_cookie: bool = False
    origin: str | None = None  # the public origin when behind a proxy, e.g. https://eye.goc
    # Login attempts, counted before the password is checked, per client address and per
    # account name: this many in this window, successes not counted.
    login_attempts: int = 5
    login_window_s: float = 300.0
    # Password checks (scrypt: ~0.1 s and 32 MiB each) running at once, whatever the address;
    # an attempt waits this long for its turn, then gets 503 and its attempt back.
    login_checks_at_once: int = 2
    login_check_wait_s: float = 10.0


class Database:
    """A lazily (re)connected psycopg connection to the GOC hub, used by one thread at a time."""

    def __init__(self, dsn: str, window: queries.TimeWindow):
        self.dsn = dsn
        self.window = window
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            if self._conn is None or self._conn.closed:
                # statement_timeout: a hung hub gives an error on the page, not a frozen one.
                self._conn = psycopg.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=5,
                    options="-c statement_timeout=10000",
                    application_name="mailtower-eye",
                )
            try:
                return queries.snapshot(self._conn, self.window)
            except psycopg.Error:
                self._conn.close()  # reconnect next time; the error goes on the page
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


class Hub:
    """Polls ``source`` while browsers listen; keeps the latest snapshot; fans it out."""

    def __init__(self, source: Source, refresh_s: float):
        self.source = source
        self.refresh_s = refresh_s
        self.latest: bytes | None = None  # JSON of the last snapshot (with its error, if any)
        self.latest_at = 0.0  # monotonic time of ``latest``
        self._good: dict[str, Any] | None = None
        self._failing_since: float | None = None
        self._clients: set[asyncio.Queue[bytes | None]] = set()
        self._listening = asyncio.Event()
        self._refresh_lock = asyncio.Lock()

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
        self._clients.add(queue)
        self._listening.set()
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._clients.discard(queue)
        if not self._clients:
            self._listening.clear()

    def close_all(self) -> None:
        """End every stream (server shutdown)."""
        for queue in list(self._clients):
            _put_latest(queue, None)

    async def refresh(self) -> bytes:
        """A new snapshot (or the last good one with the database's error); publish it."""
        async with self._refresh_lock:
            try:
                data = await asyncio.to_thread(self.source)
                data["error"] = None
                self._good = data
                self._failing_since = None
            except Exception as exc:  # psycopg errors, DNS, anything: shown on the page
                if self._failing_since is None:
                    self._failing_since = time.time()
                    log.warning("event=snapshot_failed error=%r", exc)
                data = dict(self._good or {})
                data["error"] = {
                    "message": f"GOC database: {_one_line(exc)}",
                    "since": self._failing_since,
                }
            self.latest = json.dumps(data, separators=(",", ":"), default=str).encode()
            self.latest_at = time.monotonic()
            frame = b"event: snapshot\ndata: " + self.latest + b"\n\n"
            for queue in list(self._clients):
                _put_latest(queue, frame)
            return self.latest

    async def current(self) -> bytes:
        """The latest snapshot if still fresh, else a new one."""
        if self.latest is not None and time.monotonic() - self.latest_at < self.refresh_s:
            return self.latest
        return await self.refresh()

    async def run(self) -> None:
        """Refresh every ``refresh_s`` while anybody listens; idle otherwise."""
        while True:
            await self._listening.wait()
            started = time.monotonic()
            await self.refresh()
            await asyncio.sleep(max(0.0, self.refresh_s - (time.monotonic() - started)))


def _put_latest(queue: asyncio.Queue[bytes | None], item: bytes | None) -> None:
    """A slow browser gets the newest snapshot, not a backlog of old ones."""
    with contextlib.suppress(asyncio.QueueEmpty):
        while queue.full():
            queue.get_nowait()
    queue.put_nowait(item)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- the web application -------------------------------------------------------------------------

HUB = web.AppKey("hub", Hub)
SESSIONS = web.AppKey("sessions", Sessions)
LIMITER = web.AppKey("limiter", LoginLimiter)
CHECKS = web.AppKey("checks", asyncio.BoundedSemaphore)  # password checks running at once
CONFIG = web.AppKey("config", EyeConfig)
REVOCATIONS = web.AppKey("revocations", RevocationStore)
UNSAVED = web.AppKey("unsaved", list[tuple[str, int]])  # revocations the store refused so far
SESSION = web.RequestKey[Session | None]("session")  # the operator's, set by the middleware

# Everything else needs a session; the stylesheet is public because the login page uses it.
PUBLIC = {"/login", "/healthz", "/static/eye.css"}


def _asset(name: str) -> str:
    return resources.files("mailtower.goc.eye").joinpath("static", name).read_text()


def _page(name: str, **values: str) -> str:
    escaped = {k: html.escape(v) for k, v in values.items()}
    return string.Template(_asset(name)).substitute(escaped)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, errors and the event stream included, just before its headers go out."""
    response.headers.update(SECURITY_HEADERS)
    if request.app[CONFIG].secure_cookie:
        response.headers["Strict-Transport-Security"] = HSTS
    response.headers.setdefault("Cache-Control", "no-store")


@web.middleware
async def _auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Without a session: the API and the stream answer 401, pages redirect to the login form."""
    session = request.app[SESSIONS].check(request.cookies.get(SESSION_COOKIE))
    request[SESSION] = session
    path = request.path
    if session is None and path not in PUBLIC:
        if path.startswith(("/api/", "/events")):
            # EventSource and fetch cannot follow a login form: a plain 401 to react to.
            raise web.HTTPUnauthorized(text="login required\n")
        raise web.HTTPSeeOther("/login")
    return await handler(request)


def same_origin(request: web.Request, origin: str | None = None) -> bool:
    """Whether a state-changing request comes from our own pages (CSRF check).

    SameSite=Strict already keeps the session cookie off cross-site requests; this also stops
    login CSRF, which needs no cookie. Browsers send Origin on every POST.
    """
    expected = origin or f"{request.scheme}://{request.host}"
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    sent = request.headers.get("Origin")
    if sent is not None:
        return sent == expected
    referer = request.headers.get("Referer")
    return referer is not None and (referer == expected or referer.startswith(expected + "/"))


async def index(request: web.Request) -> web.Response:
    session = request[SESSION]
    assert session is not None  # the middleware let it through
    return web.Response(
        text=_page("index.html", user=session.user), content_type="text/html", charset="utf-8"
    )


async def login_form(request: web.Request) -> web.Response:
    if request[SESSION] is not None:
        raise web.HTTPSeeOther("/")
    return _login_page("")


def _login_page(error: str, status: int = 200) -> web.Response:
    return web.Response(
        text=_page("login.html", error=error),
        status=status,
        content_type="text/html",
        charset="utf-8",
    )


async def login(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    if not same_origin(request, config.origin):
        raise web.HTTPForbidden(text="cross-origin login refused\n")
    client = request.remote or "?"
    form = await request.post()
    name, password = form.get("name"), form.get("password")
    if not isinstance(name, str) or not isinstance(password, str) or len(password) > 1024:
        return _login_page("Name and password, please.", status=400)
    sessions = request.app[SESSIONS]
    if not sessions.restored:
        return _login_page("Logins wait for the GOC database (logged-out sessions).", 503)
    # Counted now, before the check, with no await in between: a burst of parallel guesses
    # cannot all be checked while the count still reads low.
    limiter = request.app[LIMITER]
    attempt = limiter.reserve(client, name)
    if attempt is None:
        log.warning("event=login_throttled client=%s name=%r", client, name[:64])
        return _login_page("Too many login attempts: wait a few minutes.", status=429)
    checks = request.app[CHECKS]
    try:
        async with asyncio.timeout(config.login_check_wait_s):
            await checks.acquire()
    except TimeoutError:
        limiter.release(attempt)  # never checked: it does not count against the operator
        log.warning("event=login_busy client=%s", client)
        response = _login_page("Logins are busy: try again in a moment.", status=503)
        response.headers["Retry-After"] = "5"
        return response
    # scrypt blocks for ~0.1 s: a worker thread, never the event loop. The slot is given back
    # when the thread is done, not when this request is (a cancelled request's check runs on).
    check = asyncio.ensure_future(asyncio.to_thread(sessions.credentials.check, name, password))
    check.add_done_callback(lambda _: checks.release())
    try:
        ok = await asyncio.shield(check)
    except CredentialsError as exc:
        limiter.release(attempt)
        log.error("event=credentials_unreadable error=%r", str(exc))
        return _login_page("Logins are unavailable: the operators' file is unreadable.", 503)
    if not ok:
        log.warning("event=login_failed client=%s name=%r", client, name[:64])
        return _login_page("Wrong name or password.", status=401)
    limiter.release(attempt)
    log.info("event=login client=%s name=%s", client, name)
    response = web.HTTPSeeOther("/")
    response.set_cookie(
        SESSION_COOKIE,
        sessions.issue(name),
        max_age=sessions.lifetime_s,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=config.secure_cookie,
    )
    raise response


async def logout(request: web.Request) -> web.Response:
    if not same_origin(request, request.app[CONFIG].origin):
        raise web.HTTPForbidden(text="cross-origin logout refused\n")
    session = request[SESSION]
    assert session is not None  # the middleware let it through
    request.app[SESSIONS].revoke(session)  # at once, in this process
    try:  # and across restarts
        await asyncio.to_thread(request.app[REVOCATIONS].add, session.sid, session.expires)
    except Exception as exc:  # psycopg errors, DNS, anything: kept and retried
        log.error("event=revocation_not_saved name=%s error=%r", session.user, _one_line(exc))
        request.app[UNSAVED].append((session.sid, session.expires))
    log.info("event=logout name=%s", session.user)
    response = web.HTTPSeeOther("/login")
    # The same attributes as when it was set, so the browser replaces that very cookie.
    response.del_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.app[CONFIG].secure_cookie,
    )
    raise response


async def snapshot(request: web.Request) -> web.Response:
    body = await request.app[HUB].current()
    return web.Response(body=body, content_type="application/json")


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a ``snapshot`` event whenever the hub refreshes."""
    hub, sessions = request.app[HUB], request.app[SESSIONS]
    token = request.cookies.get(SESSION_COOKIE)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "X-Accel-Buffering": "no",  # a proxy in front must not buffer the stream
        }
    )
    await response.prepare(request)
    queue = hub.subscribe()
    try:
        await response.write(b"retry: 3000\n\n")
        if hub.latest is not None:
            await response.write(b"event: snapshot\ndata: " + hub.latest + b"\n\n")
        while True:
            try:
                frame = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                frame = b": keepalive\n\n"
            if frame is None or sessions.check(token) is None:
                break  # shutdown, logout, expiry or a changed password ends the stream
            await response.write(frame)
    except ConnectionError:
        pass  # the browser went away
    finally:
        hub.unsubscribe(queue)
    return response


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(
        text=_asset(name),
        headers={"Content-Type": STATIC[name], "Cache-Control": "no-cache"},
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _restore_revocations(app: web.Application) -> bool:
    try:
        app[SESSIONS].restore(await asyncio.to_thread(app[REVOCATIONS].load))
    except Exception as exc:  # psycopg errors, DNS, anything: logins wait, retried
        log.warning("event=revocations_unreadable error=%r", _one_line(exc))
        return False
    log.info("event=revocations_restored")
    return True


async def _save_unsaved(app: web.Application) -> None:
    unsaved = app[UNSAVED]
    while unsaved:
        sid, expires = unsaved[0]
        try:
            await asyncio.to_thread(app[REVOCATIONS].add, sid, expires)
        except Exception as exc:
            log.warning("event=revocation_not_saved error=%r", _one_line(exc))
            return
        unsaved.pop(0)


async def _keep_revocations(app: web.Application) -> None:
    """Retry what failed: the first read of the revocations, and logouts not yet saved."""
    while True:
        if not app[SESSIONS].restored:
            await _restore_revocations(app)
        await _save_unsaved(app)
        await asyncio.sleep(REVOCATIONS_RETRY_S)


def make_app(
    config: EyeConfig, source: Source, revocations: RevocationStore | None = None
) -> web.Application:
    """The VirusEye application reading snapshots from ``source``.

    ``revocations`` keeps logouts across restarts (``PgRevocations`` in the GOC database);
    without it they are kept in memory only, which is for tests.
    """
    app = web.Application(middlewares=[_auth], client_max_size=MAX_BODY)
    app.on_response_prepare.append(_add_headers)
    app[CONFIG] = config
    app[SESSIONS] = Sessions(
        config.secret,
        Credentials(config.credentials),
        lifetime_s=config.session_lifetime_s,
        restored=False,
    )
    app[REVOCATIONS] = revocations if revocations is not None else MemoryRevocations()
    app[UNSAVED] = []
    app[LIMITER] = LoginLimiter(config.login_attempts, config.login_window_s)
    app[CHECKS] = asyncio.BoundedSemaphore(config.login_checks_at_once)
    app[HUB] = Hub(source, config.refresh_s)
    app.router.add_get("/", index)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/api/snapshot", snapshot)
    app.router.add_get("/events", events)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/healthz", healthz)

    async def poller(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(app[HUB].run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def revocations_kept(app: web.Application) -> AsyncIterator[None]:
        await _restore_revocations(app)  # before serving, so a login seldom has to wait
        task = asyncio.create_task(_keep_revocations(app))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _save_unsaved(app)  # one last try on the way out

    async def end_streams(app: web.Application) -> None:
        app[HUB].close_all()

    app.cleanup_ctx.append(poller)
    app.cleanup_ctx.append(revocations_kept)
    app.on_shutdown.append(end_streams)
    return app
