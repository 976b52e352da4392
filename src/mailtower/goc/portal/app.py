"""The portal's web server (aiohttp): sign-in, the list, a message, its actions.

Reuses VirusEye's pieces (``mailtower.goc.eye``): scrypt hashes, the ``LoginLimiter``, the
security headers and HSTS, the same-origin check. Its own: server-side sessions in the GOC
database (``portal_sessions``), a CSRF token bound to each session on every POST (and a
signed pre-session token on the sign-in forms), and pages built on the server with no script.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from importlib import resources
from typing import Any
from urllib.parse import quote

import psycopg
from aiohttp import web

from mailtower.goc.eye.app import HSTS, SECURITY_HEADERS, same_origin
from mailtower.goc.eye.auth import LoginLimiter
from mailtower.goc.portal import render
from mailtower.goc.portal.mail import link_message
from mailtower.goc.portal.store import (
    VIRUS_REFUSED,
    Cursor,
    PortalSession,
    Scope,
    Search,
    Store,
    may_take,
    normal_address,
)

log = logging.getLogger("mailtower.goc.portal")

SESSION_COOKIE = "mtportal_session"
PRE_COOKIE = "mtportal_pre"  # binds the sign-in forms' CSRF token to this browser
MAX_BODY = 16 * 1024  # forms only
# Stricter than VirusEye's: the portal has no script at all, and loads only its stylesheet.
CSP = (
    "default-src 'none'; script-src 'none'; style-src 'self'; img-src 'none'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
Mailer = Callable[[EmailMessage], None]  # blocking: submit one message


@dataclass
class PortalConfig:
    secret: bytes  # signs the sign-in forms' CSRF tokens
    public_url: str = ""  # the links' base, e.g. https://portal.goc.example:8027
    mail_from: str = "quarantine@localhost"
    session_lifetime_s: int = 8 * 3600  # absolute
    session_idle_s: int = 30 * 60
    link_lifetime_s: int = 15 * 60
    secure_cookie: bool = False
    origin: str | None = None
    login_attempts: int = 5
    login_window_s: float = 300.0
    login_checks_at_once: int = 2
    login_check_wait_s: float = 10.0
    expire_every_s: float = 300.0
    expire_batch: int = 1000
    links_per_address: int = 3  # link requests per address (and per client) in login_window_s
    # Behind a TLS proxy on this host (--origin, plain HTTP on loopback): every connection is
    # the proxy's, so a client's address is the last X-Forwarded-For entry, the one the proxy
    # appended. Never read otherwise: anybody can send the header.
    behind_proxy: bool = False


STORE = web.AppKey("store", Store)
CONFIG = web.AppKey("config", PortalConfig)
LIMITER = web.AppKey("limiter", LoginLimiter)
LINK_LIMITER = web.AppKey("link_limiter", LoginLimiter)
CHECKS = web.AppKey("checks", asyncio.BoundedSemaphore)
MAILER = web.AppKey("mailer", object)
TASKS = web.AppKey[set[asyncio.Task[None]]]("tasks")
SESSION = web.RequestKey[PortalSession | None]("session")

PUBLIC = {"/login", "/link", "/link/use", "/healthz", "/static/portal.css"}


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    response.headers["Content-Security-Policy"] = CSP
    if request.app[CONFIG].secure_cookie:
        response.headers["Strict-Transport-Security"] = HSTS
    response.headers.setdefault("Cache-Control", "no-store")


@web.middleware
async def _auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    store = request.app[STORE]
    token = request.cookies.get(SESSION_COOKIE)
    try:
        session = await asyncio.to_thread(store.session, token) if token else None
        request[SESSION] = session
        if session is None and request.path not in PUBLIC and not request.path.startswith("/link/"):
            # A message's page (a notice's link) is where sign-in returns to; nothing else is.
            back = request.path if request.method == "GET" and RETURN_TO.match(request.path) else ""
            raise web.HTTPSeeOther(f"/login?next={back}" if back else "/login")
        return await handler(request)
    except web.HTTPNotFound:
        return _html(render.error_page(404, "Not found."), 404)
    except psycopg.Error as exc:  # the hub away or refusing: said so, never a stack trace
        log.error("event=database_error path=%s error=%r", request.path, str(exc).strip()[:200])
        response = _html(
            render.error_page(503, "The quarantine is unavailable for a moment: try again."), 503
        )
        response.headers["Retry-After"] = "5"
        return response


def client_address(request: web.Request) -> str:
    """Whom the rate limits and the log count a request against: the connection's peer, or,
    behind a local TLS proxy (``behind_proxy``) and only when the peer is a loopback address,
    the last ``X-Forwarded-For`` entry — what that proxy appended; earlier entries are the
    client's own word and never read."""
    remote = request.remote or "?"
    if not request.app[CONFIG].behind_proxy or not _loopback(remote):
        return remote
    forwarded = request.headers.getall("X-Forwarded-For", [])
    last = forwarded[-1].rpartition(",")[2].strip() if forwarded else ""
    try:
        return str(ipaddress.ip_address(last))
    except ValueError:
        return remote  # no usable entry: the proxy's own (as without one)


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _session(request: web.Request) -> PortalSession:
    session = request[SESSION]
    assert session is not None  # the middleware let it through
    return session


async def _checked_post(request: web.Request) -> Any:
    """A change: same origin, and the session's CSRF token in the form (403 otherwise)."""
    session = _session(request)
    if not same_origin(request, request.app[CONFIG].origin):
        raise web.HTTPForbidden(text="cross-origin request refused\n")
    form = await request.post()
    sent = form.get("csrf")
    if not isinstance(sent, str) or not hmac.compare_digest(sent, session.csrf):
        log.warning("event=csrf_refused who=%r path=%s", session.scope.who, request.path)
        raise web.HTTPForbidden(text="missing or wrong CSRF token\n")
    return form


# -- the sign-in forms' CSRF: a random cookie and its HMAC in the form ------------------------


def _pre_token(config: PortalConfig, cookie: str) -> str:
    return hmac.new(config.secret, b"pre:" + cookie.encode(), hashlib.sha256).hexdigest()


def _pre_form(request: web.Request, page: Callable[[str], str], status: int = 200) -> web.Response:
    config = request.app[CONFIG]
    cookie = request.cookies.get(PRE_COOKIE)
    if not cookie or len(cookie) > 100:
        cookie = secrets.token_urlsafe(24)
    response = _html(page(_pre_token(config, cookie)), status)
    response.set_cookie(
        PRE_COOKIE,
        cookie,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=config.secure_cookie,
    )
    return response


async def _pre_checked(request: web.Request) -> Any:
    config = request.app[CONFIG]
    if not same_origin(request, config.origin):
        raise web.HTTPForbidden(text="cross-origin sign-in refused\n")
    form = await request.post()
    cookie = request.cookies.get(PRE_COOKIE, "")
    sent = form.get("csrf")
    if (
        not cookie
        or not isinstance(sent, str)
        or not hmac.compare_digest(sent, _pre_token(config, cookie))
    ):
        raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the sign-in page\n")
    return form


# Where sign-in may return to: a message's page, exactly (never another site, never a form).
RETURN_TO = re.compile(r"\A/message/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def _return_to(value: object) -> str:
    """``value`` if it is a page sign-in may return to, else the list."""
    return value if isinstance(value, str) and RETURN_TO.match(value) else "/"


def _signed_in(request: web.Request, token: str, to: str = "/") -> web.HTTPSeeOther:
    config = request.app[CONFIG]
    response = web.HTTPSeeOther(_return_to(to))
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=config.session_lifetime_s,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=config.secure_cookie,
    )
    return response


async def login_form(request: web.Request) -> web.Response:
    if request[SESSION] is not None:
        raise web.HTTPSeeOther(_return_to(request.query.get("next")))
    back = _return_to(request.query.get("next"))
    return _pre_form(request, lambda csrf: render.login_page(csrf, back_to=back))


async def login(request: web.Request) -> web.Response:
    config, store = request.app[CONFIG], request.app[STORE]
    form = await _pre_checked(request)
    client = client_address(request)
    name, password = form.get("name"), form.get("password")
    back = _return_to(form.get("next"))

    def again(error: str, status: int) -> web.Response:
        return _pre_form(request, lambda csrf: render.login_page(csrf, error, back_to=back), status)

    if not isinstance(name, str) or not isinstance(password, str) or len(password) > 1024:
        return again("Name and password, please.", 400)
    limiter = request.app[LIMITER]
    attempt = limiter.reserve(client, name)
    if attempt is None:
        log.warning("event=login_throttled client=%s name=%r", client, name[:64])
        return again("Too many sign-in attempts: wait a few minutes.", 429)
    checks = request.app[CHECKS]
    try:
        async with asyncio.timeout(config.login_check_wait_s):
            await checks.acquire()
    except TimeoutError:
        limiter.release(attempt)
        return again("Sign-ins are busy: try again in a moment.", 503)
    check = asyncio.ensure_future(asyncio.to_thread(store.password_user, name, password))
    check.add_done_callback(lambda _: checks.release())
    try:
        scope = await asyncio.shield(check)
    except Exception as exc:
        limiter.release(attempt)
        log.error("event=login_unavailable error=%r", str(exc))
        return again("Sign-ins are unavailable: the GOC database does not answer.", 503)
    if scope is None:
        log.warning("event=login_failed client=%s name=%r", client, name[:64])
        return again("Wrong name or password.", 401)
    limiter.release(attempt)
    token, _ = await asyncio.to_thread(
        store.open_session, scope, config.session_lifetime_s, config.session_idle_s
    )
    await asyncio.to_thread(store.audit, scope, "login", None, {"client": client})
    log.info("event=login client=%s name=%s role=%s", client, name, scope.role)
    raise _signed_in(request, token, back)


LINK_SENT = (
    "If that address has quarantined mail here, a sign-in link is on its way to it. "
    "It works once, for a few minutes."
)


async def ask_link(request: web.Request) -> web.Response:
    """ "Mail me a link": the same answer whether or not the address is known, at once (the
    lookup and the mail happen afterwards, so the time taken tells nothing either)."""
    form = await _pre_checked(request)
    client = client_address(request)
    raw = form.get("address")
    address = normal_address(raw) if isinstance(raw, str) else None

    def answer(error: str = "", notice: str = "", status: int = 200) -> web.Response:
        return _pre_form(request, lambda csrf: render.login_page(csrf, error, notice), status)

    if address is None:
        return answer("Give your e-mail address.", status=400)
    # Per client and, apart, per address (LoginLimiter keeps both): one client's requests never
    # use up another's, nor the links of addresses it did not ask for.
    if request.app[LINK_LIMITER].reserve(client, address) is None:
        return answer("Too many link requests: wait a few minutes.", status=429)
    task = asyncio.create_task(_send_link(request.app, address))
    request.app[TASKS].add(task)
    task.add_done_callback(request.app[TASKS].discard)
    return answer(notice=LINK_SENT)


async def _send_link(app: web.Application, address: str) -> None:
    store, config = app[STORE], app[CONFIG]
    try:
        if not await asyncio.to_thread(store.link_wanted, address):
            log.info("event=link_not_sent reason=unknown_address")
            return
        token = await asyncio.to_thread(store.new_link, address, config.link_lifetime_s)
        url = f"{config.public_url.rstrip('/')}/link/{quote(token)}"
        msg = link_message(config.mail_from, address, url, config.link_lifetime_s // 60)
        mailer: Any = app[MAILER]
        await asyncio.to_thread(mailer, msg)
        log.info("event=link_sent")
    except Exception as exc:
        log.error("event=link_failed error=%r", str(exc))


async def link_form(request: web.Request) -> web.Response:
    token = request.match_info["token"]
    return _pre_form(request, lambda csrf: render.link_page(csrf, token))


async def use_link(request: web.Request) -> web.Response:
    config, store = request.app[CONFIG], request.app[STORE]
    form = await _pre_checked(request)
    token = form.get("token")
    address = await asyncio.to_thread(store.use_link, token) if isinstance(token, str) else None
    if address is None:
        return _pre_form(
            request,
            lambda csrf: render.login_page(
                csrf, "That link has been used or has expired: ask for a new one."
            ),
            403,
        )
    scope = Scope("user", address, address=address)
    session_token, _ = await asyncio.to_thread(
        store.open_session, scope, config.session_lifetime_s, config.session_idle_s
    )
    await asyncio.to_thread(store.audit, scope, "login", None, {"client": client_address(request)})
    raise _signed_in(request, session_token)


async def logout(request: web.Request) -> web.Response:
    await _checked_post(request)
    token = request.cookies.get(SESSION_COOKIE, "")
    await asyncio.to_thread(request.app[STORE].end_session, token)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.app[CONFIG].secure_cookie,
    )
    raise response


def _search(request: web.Request) -> Search:
    q = request.query

    def text(key: str) -> str:
        return q.get(key, "").strip()[:200]

    def day(key: str, plus: int = 0) -> datetime | None:
        value = text(key)
        if not value:
            return None
        try:
            return datetime.fromisoformat(value[:10]).replace(tzinfo=UTC) + timedelta(days=plus)
        except ValueError:
            raise web.HTTPBadRequest(text=f"{key}: a date YYYY-MM-DD\n") from None

    verdict = text("verdict")
    if verdict and verdict not in render.VERDICTS:
        raise web.HTTPBadRequest(text="verdict: virus, banned or suspicious\n")
    return Search(
        sender=text("sender"),
        recipient=text("recipient"),
        subject=text("subject"),
        verdict=verdict,
        since=day("since"),
        until=day("until", plus=1),  # the whole last day
    )


async def index(request: web.Request) -> web.Response:
    session = _session(request)
    search = _search(request)
    after = None
    if request.query.get("after"):
        after = Cursor.parse(request.query["after"][:100])
        if after is None:
            raise web.HTTPBadRequest(text="after: not a page cursor\n")
    rows, cursor = await asyncio.to_thread(request.app[STORE].page, session.scope, search, after)
    params = {k: request.query.get(k, "").strip()[:200] for k in search.params()}
    return _html(
        render.list_page(
            rows,
            params,
            cursor.text() if cursor else None,
            who=session.scope.who,
            role=session.scope.role,
            csrf=session.csrf,
        )
    )


async def _row(request: web.Request) -> dict[str, Any]:
    """The message of the URL in the session's scope; 404 alike when missing or not theirs."""
    row = await asyncio.to_thread(
        request.app[STORE].message, _session(request).scope, request.match_info["event_id"]
    )
    if row is None:
        raise web.HTTPNotFound()
    return row


async def message(request: web.Request) -> web.Response:
    session = _session(request)
    row = await _row(request)
    note = NOTES.get(request.query.get("done", ""), "")
    # Parsing a message (up to render.MAX_PREVIEW bytes) is CPU work: off the event loop.
    page = await asyncio.to_thread(
        render.message_page,
        row,
        who=session.scope.who,
        role=session.scope.role,
        csrf=session.csrf,
        note=note,
    )
    return _html(page)


async def raw(request: web.Request) -> web.Response:
    """The stored bytes as a download, never something a browser would render."""
    session = _session(request)
    row = await _row(request)
    if row["message"] is None:
        raise web.HTTPNotFound()
    if not may_take(session.scope, row):
        return _html(render.error_page(403, VIRUS_REFUSED), 403)
    await asyncio.to_thread(request.app[STORE].audit, session.scope, "download", row, {})
    return web.Response(
        body=bytes(row["message"]),
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="quarantine-{row["event_id"]}.eml"',
        },
    )


NOTES = {
    "requested": "Asked: the tower does it within a minute or so (see Requests).",
    "already": "Already asked or done.",
    "gone": "The message is no longer kept.",
    "unavailable": "Releases and deletions are not available at this GOC yet.",
    "allowed": "The sender is allow-listed for this customer.",
    "refused": "The customer's policy refused the change (see the GOC's log).",
    "null-sender": "This message has the null sender <> (a bounce or an automatic notice):"
    " there is no sender to allow-list, and the null sender is never allowed.",
    "no-customer": "This message was held under the tower's own policy, not a customer's:"
    " there is no customer policy to allow-list the sender in.",
}


async def act(request: web.Request) -> web.Response:
    session = _session(request)
    await _checked_post(request)
    action = request.match_info["action"]
    event_id = request.match_info["event_id"]
    store = request.app[STORE]
    scope = session.scope
    try:
        if action in ("release", "delete"):
            if action == "delete" and scope.role == "user":
                raise web.HTTPForbidden(text="users release their own copy; they do not delete\n")
            outcome = await asyncio.to_thread(store.request, scope, event_id, action)
        elif action == "allow":
            if scope.role == "user":
                raise web.HTTPForbidden(text="only the customer's admin allow-lists senders\n")
            outcome = await asyncio.to_thread(store.allow_sender, scope, event_id)
        else:
            raise web.HTTPNotFound()
    except LookupError:
        raise web.HTTPNotFound() from None
    except PermissionError as exc:  # a user and a virus: said so, and nothing asked
        log.warning("event=%s_refused who=%r event_id=%s reason=virus", action, scope.who, event_id)
        return _html(render.error_page(403, str(exc)), 403)
    log.info(
        "event=%s who=%r role=%s event_id=%s outcome=%s",
        action,
        scope.who,
        scope.role,
        event_id,
        outcome.split(":")[0],
    )
    if outcome.startswith("refused"):  # the page says "see the GOC's log": here is why
        log.warning("event=%s_refused event_id=%s reason=%r", action, event_id, outcome)
    key = outcome if outcome in NOTES else "refused" if outcome.startswith("refused") else ""
    raise web.HTTPSeeOther(f"/message/{event_id}?done={key}" if key else f"/message/{event_id}")


async def static(request: web.Request) -> web.Response:
    if request.match_info["name"] != "portal.css":
        raise web.HTTPNotFound()
    text = resources.files("mailtower.goc.portal").joinpath("static", "portal.css").read_text()
    return web.Response(
        text=text, headers={"Content-Type": "text/css; charset=utf-8", "Cache-Control": "no-cache"}
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _expiry(app: web.Application) -> None:
    """The GOC's copy of expired (and deleted) messages NULLed, in batches, periodically."""
    store, config = app[STORE], app[CONFIG]
    while True:
        try:
            while (n := await asyncio.to_thread(store.expire, config.expire_batch)) > 0:
                log.info("event=expired messages=%d", n)
                if n < config.expire_batch:
                    break
            await asyncio.to_thread(store.forget)
        except Exception as exc:  # the database away: next round
            log.warning("event=expiry_failed error=%r", str(exc))
        await asyncio.sleep(config.expire_every_s)


def make_app(
    config: PortalConfig, store: Store, mailer: Mailer, *, expiry: bool = True
) -> web.Application:
    app = web.Application(middlewares=[_auth], client_max_size=MAX_BODY)
    app.on_response_prepare.append(_add_headers)
    app[CONFIG] = config
    app[STORE] = store
    app[MAILER] = mailer
    app[TASKS] = set()
    app[LIMITER] = LoginLimiter(config.login_attempts, config.login_window_s)
    app[LINK_LIMITER] = LoginLimiter(config.links_per_address, config.login_window_s)
    app[CHECKS] = asyncio.BoundedSemaphore(config.login_checks_at_once)
    app.router.add_get("/", index)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/link", ask_link)
    app.router.add_post("/link/use", use_link)
    app.router.add_get("/link/{token}", link_form)
    app.router.add_post("/logout", logout)
    app.router.add_get("/message/{event_id}", message)
    app.router.add_get("/message/{event_id}/raw", raw)
    app.router.add_post("/message/{event_id}/{action}", act)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/healthz", healthz)

    async def background(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_expiry(app)) if expiry else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        tasks: set[asyncio.Task[None]] = app[TASKS]
        for pending in tuple(tasks):
            pending.cancel()

    app.cleanup_ctx.append(background)
    return app
