"""The quarantine portal against a real PostgreSQL (as mt_portal): tenant isolation first,
then CSRF, sessions, links, rate limits, escaping, paging, search, actions and expiry."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from portal_fixtures import (
    TOWERS,
    add_customer,
    add_quarantined,
    portal_dsn,
    portal_hub,
    small_message,
)

from mailtower.goc.portal import store as portal_store
from mailtower.goc.portal.app import LINK_SENT, SESSION_COOKIE, STORE, PortalConfig, make_app
from mailtower.goc.portal.store import Store
from mailtower.goc.sync import quarantine_actions

pytestmark = pytest.mark.integration

PASSWORD = "a long enough password"
ALICE = "alice@acme.example"  # a user at customer A
BOB = "bob@acme.example"  # another user at customer A
CAROL = "carol@globex.example"  # a user at customer B


@pytest.fixture(scope="module")
def hub() -> Iterator[Any]:
    with portal_hub() as cluster:
        with cluster.connect() as conn:
            a = add_customer(conn, "acme", "acme.example")
            b = add_customer(conn, "globex", "globex.example")
            portal_store.set_user(conn, "op", "operator", None, PASSWORD)
            portal_store.set_user(conn, "admin-a", "admin", "acme", PASSWORD)
            portal_store.set_user(conn, "admin-b", "admin", "globex", PASSWORD)
        cluster.customers = {"a": a, "b": b}
        yield cluster


@pytest.fixture
def conn(hub: Any) -> Iterator[psycopg.Connection[Any]]:
    with hub.connect() as conn:
        conn.execute(
            "TRUNCATE verdict_events, quarantine_actions, portal_sessions, portal_links,"
            " portal_audit"
        )
        conn.execute("DELETE FROM policies")
        yield conn


class Mailbox:
    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []

    def __call__(self, msg: EmailMessage) -> None:
        self.sent.append(msg)


class Browser:
    """A test client that fills in the forms' CSRF tokens and the Origin, as a browser does."""

    def __init__(self, client: TestClient[Any, Any], mailbox: Mailbox) -> None:
        self.client = client
        self.mailbox = mailbox
        self.csrf = ""
        self.headers: dict[str, str] = {}  # sent with every request (X-Forwarded-For)

    @property
    def origin(self) -> dict[str, str]:
        return {"Origin": str(self.client.make_url("")).rstrip("/"), **self.headers}

    async def get(self, path: str) -> tuple[int, str]:
        response = await self.client.get(path, allow_redirects=False, headers=self.headers)
        text = await response.text()
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        if found:
            self.csrf = found.group(1)
        return response.status, text

    async def post(
        self, path: str, data: dict[str, str] | None = None, *, csrf: str | None = None
    ) -> tuple[int, str, str]:
        form = {"csrf": self.csrf if csrf is None else csrf, **(data or {})}
        if csrf == "":
            form.pop("csrf")
        response = await self.client.post(
            path, data=form, headers=self.origin, allow_redirects=False
        )
        return response.status, response.headers.get("Location", ""), await response.text()

    async def sign_in(self, name: str, password: str = PASSWORD) -> int:
        await self.get("/login")
        status, _, _ = await self.post("/login", {"name": name, "password": password})
        await self.get("/")  # the session's CSRF token
        return status

    async def sign_in_by_link(self, address: str) -> int:
        await self.get("/login")
        before = len(self.mailbox.sent)
        status, _, text = await self.post("/link", {"address": address})
        assert status == 200 and "a sign-in link is on its way" in text
        for _ in range(500):  # the link is mailed by a background task
            if len(self.mailbox.sent) > before:
                break
            await asyncio.sleep(0.01)
        url = link_of(self.mailbox.sent[-1])
        return await self.use_link(url)

    async def use_link(self, url: str) -> int:
        path = url[url.index("/link/") :]
        await self.get(path)
        token = path.rsplit("/", 1)[1]
        status, _, _ = await self.post("/link/use", {"token": token})
        if status == 303:
            await self.get("/")
        return status


def link_of(msg: EmailMessage) -> str:
    found = re.search(r"https?://\S+/link/\S+", str(msg.get_content()))
    assert found, msg
    return found.group(0)


@asynccontextmanager
async def portal(hub: Any, **settings: Any) -> AsyncIterator[Browser]:
    config = PortalConfig(secret=b"s" * 64, public_url="https://portal.example", **settings)
    store = Store(portal_dsn(hub))
    mailbox = Mailbox()
    app = make_app(config, store, mailbox, expiry=False)
    try:
        async with TestClient(TestServer(app)) as client:
            yield Browser(client, mailbox)
    finally:
        store.close()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def seed(conn: psycopg.Connection[Any], hub: Any) -> dict[str, str]:
    """One message for each user, so each scope has something of its own."""
    a, b = hub.customers["a"], hub.customers["b"]
    return {
        # banned, not a virus: a user may release (and download) their own
        "alice": add_quarantined(
            conn, customer_id=a, recipients=[ALICE], subject="For Alice", verdict="banned"
        ),
        "bob": add_quarantined(conn, customer_id=a, recipients=[BOB], subject="For Bob"),
        "carol": add_quarantined(conn, customer_id=b, recipients=[CAROL], subject="For Carol"),
    }


def count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 (ours)
    assert row is not None
    return int(row[0])


# -- access ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/message/00000000-0000-4000-8000-000000000001", "/static/other.css"]
)
def test_unauthenticated_is_sent_to_sign_in(hub: Any, conn: Any, path: str) -> None:
    async def test() -> None:
        async with portal(hub) as browser:
            response = await browser.client.get(path, allow_redirects=False)
            back = f"/login?next={path}" if path.startswith("/message/") else "/login"
            assert response.status == 303 and response.headers["Location"] == back
            csp = response.headers["Content-Security-Policy"]
            assert "script-src 'none'" in csp and "frame-ancestors 'none'" in csp
            assert response.headers["X-Content-Type-Options"] == "nosniff"

    run(test)


def test_sign_in_returns_to_the_message_it_was_asked_for(hub: Any, conn: Any) -> None:
    ids = seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            wanted = f"/message/{ids['alice']}"
            status, _ = await browser.get(wanted)
            assert status == 303
            status, page = await browser.get(f"/login?next={wanted}")
            assert f'name="next" value="{wanted}"' in page
            status, location, _ = await browser.post(
                "/login", {"name": "admin-a", "password": PASSWORD, "next": wanted}
            )
            assert (status, location) == (303, wanted)

    run(test)


@pytest.mark.parametrize(
    "hostile",
    [
        "https://evil.example/",
        "//evil.example/message/x",
        "/message/../login",
        "/\\evil.example",
        "/message/" + "0" * 36,
        "/message/00000000-0000-4000-8000-000000000000/release",
        "/message/00000000-0000-4000-8000-000000000000\nSet-Cookie: x=1",
    ],
)
def test_sign_in_never_returns_anywhere_but_a_message_page(
    hub: Any, conn: Any, hostile: str
) -> None:
    async def test() -> None:
        async with portal(hub) as browser:
            status, page = await browser.get("/login?next=" + quote(hostile))
            assert 'name="next"' not in page
            status, location, _ = await browser.post(
                "/login", {"name": "admin-a", "password": PASSWORD, "next": hostile}
            )
            assert (status, location) == (303, "/")

    run(test)


@pytest.mark.parametrize(
    ("who", "sees"),
    [("op", {"alice", "bob", "carol"}), ("admin-a", {"alice", "bob"}), ("admin-b", {"carol"})],
)
def test_each_role_sees_its_scope(hub: Any, conn: Any, who: str, sees: set[str]) -> None:
    ids = seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            assert await browser.sign_in(who) == 303
            _, text = await browser.get("/")
            shown = {name for name, eid in ids.items() if eid in text}
            assert shown == sees

    run(test)


def test_a_user_sees_only_mail_addressed_to_them(hub: Any, conn: Any) -> None:
    ids = seed(conn, hub)
    both = add_quarantined(conn, customer_id=hub.customers["a"], recipients=[BOB, ALICE])

    async def test() -> None:
        async with portal(hub) as browser:
            assert await browser.sign_in_by_link(ALICE) == 303
            _, text = await browser.get("/")
            assert ids["alice"] in text and both in text
            assert ids["bob"] not in text and ids["carol"] not in text

    run(test)


# -- tenant isolation: crafted ids and URLs -------------------------------------------------


def test_admin_of_b_cannot_touch_a_message_of_a(hub: Any, conn: Any) -> None:
    ids = seed(conn, hub)
    missing = str(uuid.uuid4())

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-b")
            want_status, want_body = await browser.get(f"/message/{missing}")
            assert want_status == 404
            for eid in (ids["alice"], ids["bob"]):
                # Not theirs answers exactly as not there.
                assert await browser.get(f"/message/{eid}") == (404, want_body)
                assert (await browser.get(f"/message/{eid}/raw"))[0] == 404
                for action in ("release", "delete", "allow"):
                    status, _, _ = await browser.post(f"/message/{eid}/{action}")
                    assert status == 404, action
            _, listing = await browser.get(f"/?recipient={ALICE}")
            assert ids["alice"] not in listing

    run(test)
    assert count(conn, "quarantine_actions") == 0
    assert count(conn, "policies") == 0
    row = conn.execute("SELECT count(*) FROM portal_audit WHERE action <> 'login'").fetchone()
    assert row is not None and row[0] == 0


def test_a_user_cannot_touch_another_users_message(hub: Any, conn: Any) -> None:
    ids = seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in_by_link(ALICE)
            for eid in (ids["bob"], ids["carol"]):
                assert (await browser.get(f"/message/{eid}"))[0] == 404
                assert (await browser.get(f"/message/{eid}/raw"))[0] == 404
                assert (await browser.post(f"/message/{eid}/release"))[0] == 404
            # Their own: a release to their own address only; never a delete or an allow-list.
            status, location, _ = await browser.post(f"/message/{ids['alice']}/release")
            assert status == 303 and location.endswith("done=requested")
            assert (await browser.post(f"/message/{ids['alice']}/delete"))[0] == 403
            assert (await browser.post(f"/message/{ids['alice']}/allow"))[0] == 403

    run(test)
    rows = conn.execute("SELECT event_id::text, recipients FROM quarantine_actions").fetchall()
    assert rows == [(ids["alice"], [ALICE])]


@pytest.mark.parametrize(
    "crafted",
    [
        "1' OR '1'='1",
        "x%27%20OR%20true--",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e",
        "00000000-0000-0000-0000-000000000000",
        "{eid}' OR customer_id IS NOT NULL--",
        "{eid}%00",
        "{eid_upper}x",
    ],
)
def test_crafted_ids_are_not_found(hub: Any, conn: Any, crafted: str) -> None:
    ids = seed(conn, hub)
    path = crafted.format(eid=ids["alice"], eid_upper=ids["alice"].upper())

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-b")
            for suffix in ("", "/raw"):
                status, text = await browser.get(f"/message/{path}{suffix}")
                # 404; or, where the router normalises ".." away, their own list
                assert status == 404 or (status == 200 and 'id="facts"' not in text)
                assert "For Alice" not in text
            assert (await browser.post(f"/message/{path}/release"))[0] == 404

    run(test)
    assert count(conn, "quarantine_actions") == 0


def test_paging_cursor_cannot_widen_the_scope(hub: Any, conn: Any) -> None:
    ids = seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-b")
            far = "2999-01-01T00:00:00%2B00:00_" + str(uuid.uuid4())
            _, text = await browser.get(f"/?after={far}")
            assert ids["alice"] not in text and ids["carol"] in text
            # Wildcards are text: a "%" finds only a literal "%", never everything.
            _, text = await browser.get("/?sender=%25&subject=_")
            assert "data-event=" not in text
            assert (await browser.get("/?after=nonsense"))[0] == 400

    run(test)


# -- CSRF, sessions, links, rate limits ------------------------------------------------------


@pytest.mark.parametrize("csrf", ["forged-token", ""])
def test_a_change_without_the_sessions_csrf_token_is_refused(
    hub: Any, conn: Any, csrf: str
) -> None:
    ids = seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            for action in ("release", "delete", "allow"):
                status, _, _ = await browser.post(f"/message/{ids['alice']}/{action}", csrf=csrf)
                assert status == 403
            assert (await browser.post("/logout", csrf=csrf))[0] == 403
            assert (await browser.get("/"))[0] == 200  # still signed in

    run(test)
    assert count(conn, "quarantine_actions") == 0


def test_another_sessions_csrf_token_is_refused(hub: Any, conn: Any) -> None:
    ids = seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as one, portal(hub) as two:
            await one.sign_in("admin-a")
            await two.sign_in("admin-a")
            status, _, _ = await one.post(f"/message/{ids['alice']}/release", csrf=two.csrf)
            assert status == 403

    run(test)


def test_cross_origin_post_is_refused(hub: Any, conn: Any) -> None:
    ids = seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            response = await browser.client.post(
                f"/message/{ids['alice']}/release",
                data={"csrf": browser.csrf},
                headers={"Origin": "https://evil.example"},
                allow_redirects=False,
            )
            assert response.status == 403

    run(test)
    assert count(conn, "quarantine_actions") == 0


def test_sign_in_form_needs_its_csrf_token(hub: Any, conn: Any) -> None:
    async def test() -> None:
        async with portal(hub) as browser:
            await browser.get("/login")
            status, _, _ = await browser.post(
                "/login", {"name": "op", "password": PASSWORD}, csrf="forged"
            )
            assert status == 403
            assert (await browser.post("/link", {"address": ALICE}, csrf=""))[0] == 403

    run(test)


@pytest.mark.parametrize(
    "expire",
    [
        "UPDATE portal_sessions SET expires_at = now() - interval '1 second'",
        "UPDATE portal_sessions SET last_seen = now() - make_interval(secs => idle_s + 1)",
        "UPDATE portal_sessions SET revoked_at = now()",
        "UPDATE portal_users SET customer_id = (SELECT id FROM customers WHERE name = 'globex')"
        " WHERE name = 'admin-a'",
    ],
)
def test_an_ended_session_signs_nobody_in(hub: Any, conn: Any, expire: str) -> None:
    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            assert (await browser.get("/"))[0] == 200
            conn.execute(expire)
            status, _ = await browser.get("/")
            assert status == 303

    try:
        run(test)
    finally:
        conn.execute(
            "UPDATE portal_users SET customer_id = (SELECT id FROM customers WHERE name = 'acme')"
            " WHERE name = 'admin-a'"
        )


def test_sessions_are_stored_hashed_and_logout_ends_them(hub: Any, conn: Any) -> None:
    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("op")
            cookie = browser.client.session.cookie_jar.filter_cookies(browser.client.make_url("/"))
            token = cookie[SESSION_COOKIE].value
            row = conn.execute("SELECT id_hash FROM portal_sessions").fetchone()
            assert row is not None and bytes(row[0]) == portal_store.token_hash(token)
            assert token.encode() not in bytes(row[0])
            status, location, _ = await browser.post("/logout")
            assert (status, location) == (303, "/login")
            browser.client.session.cookie_jar.update_cookies({SESSION_COOKIE: token})
            assert (await browser.get("/"))[0] == 303  # the old cookie is dead

    run(test)


def test_wrong_password_and_the_rate_limit(hub: Any, conn: Any) -> None:
    async def test() -> None:
        async with portal(hub, login_attempts=3) as browser:
            await browser.get("/login")
            for _ in range(3):
                status, _, text = await browser.post("/login", {"name": "op", "password": "no"})
                assert status == 401 and "Wrong name or password" in text
                await browser.get("/login")
            # At the limit: even the right password waits.
            status, _, text = await browser.post("/login", {"name": "op", "password": PASSWORD})
            assert status == 429 and "Too many" in text

    run(test)


def test_a_link_works_once_and_not_after_its_expiry(hub: Any, conn: Any) -> None:
    seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            assert await browser.sign_in_by_link(ALICE) == 303
            url = link_of(browser.mailbox.sent[-1])
            msg = browser.mailbox.sent[-1]
            assert msg["To"] == ALICE and msg.get_content_type() == "text/plain"
        async with portal(hub) as other:
            assert await other.use_link(url) == 403  # replayed
        async with portal(hub) as third:
            await third.get("/login")
            await third.post("/link", {"address": ALICE})
            for _ in range(500):
                if third.mailbox.sent:
                    break
                await asyncio.sleep(0.01)
            conn.execute("UPDATE portal_links SET expires_at = now() - interval '1 second'")
            assert await third.use_link(link_of(third.mailbox.sent[-1])) == 403
            # The mailed link's GET uses nothing up (a mail scanner may fetch it).
        row = conn.execute("SELECT count(*) FROM portal_links WHERE token_hash IS NULL").fetchone()
        assert row is not None and row[0] == 0

    run(test)


def test_a_link_for_an_unknown_address_answers_the_same_and_sends_nothing(
    hub: Any, conn: Any
) -> None:
    seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            for address in ("nobody@acme.example", "alice@unknown.example"):
                await browser.get("/login")
                status, _, text = await browser.post("/link", {"address": address})
                assert status == 200 and LINK_SENT[:40] in text
            for _ in range(50):
                await asyncio.sleep(0.01)
            assert browser.mailbox.sent == []
            assert count(conn, "portal_links") == 0

    run(test)


def test_link_requests_are_rate_limited(hub: Any, conn: Any) -> None:
    async def test() -> None:
        async with portal(hub, links_per_address=2) as browser:
            statuses = []
            for _ in range(3):
                await browser.get("/login")
                statuses.append((await browser.post("/link", {"address": ALICE}))[0])
            assert statuses == [200, 200, 429]

    run(test)


# -- escaping: nothing active is rendered ---------------------------------------------------

HOSTILE_SUBJECT = "<script>alert(1)</script>\"quoted' \u202egnp.exe \x00nul"
HOSTILE_FILE = "<img src=x onerror=alert(1)>\u202efdp.exe"
HOSTILE_SENDER = '"<b>x</b>"@evil.example'


def test_hostile_values_are_escaped_everywhere(hub: Any, conn: Any) -> None:
    body = "<script>alert('body')</script>\nsecond line \u202e override\n"
    raw = small_message("x@evil.example", [ALICE], "plain", body, **{HOSTILE_FILE: b"MZ..."})
    eid = add_quarantined(
        conn,
        customer_id=hub.customers["a"],
        recipients=[ALICE, "<svg onload=alert(1)>@acme.example"],
        sender=HOSTILE_SENDER,
        subject=HOSTILE_SUBJECT.replace("\x00", "\\x00"),  # PostgreSQL text holds no NUL
        message=raw,
    )

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            for path in ("/", f"/message/{eid}"):
                _, text = await browser.get(path)
                for active in ("<script", "<img", "<svg", "<b>", "\u202e", "\x00"):
                    assert active not in text, (path, active)
                assert "&lt;script&gt;" in text
                assert "\\u202e" in text  # the override shown, not obeyed
            _, page = await browser.get(f"/message/{eid}")
            assert "&lt;img src=x onerror=alert(1)&gt;\\u202efdp.exe" in page
            assert "&lt;script&gt;alert(&#x27;body&#x27;)&lt;/script&gt;" in page

    run(test)


def test_html_only_message_is_shown_as_text(hub: Any, conn: Any) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "x@evil.example", ALICE, "html"
    msg.set_content(
        "<html><head><style>p{}</style><script>evil()</script></head><body><p>Pay"
        ' <a href="https://evil.example">now</a></p><img src="https://track.example/p"></body>',
        subtype="html",
    )
    eid = add_quarantined(
        conn, customer_id=hub.customers["a"], recipients=[ALICE], message=msg.as_bytes()
    )

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            _, text = await browser.get(f"/message/{eid}")
            shown = text.split('<pre id="text">')[1].split("</pre>")[0]
            assert "Pay now" in shown.replace("\n", " ")
            assert "evil()" not in shown and "track.example" not in text.split("<h2>Text")[1]

    run(test)


def test_raw_download_is_an_attachment_never_rendered(hub: Any, conn: Any) -> None:
    ids = seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            response = await browser.client.get(f"/message/{ids['alice']}/raw")
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/octet-stream"
            assert response.headers["Content-Disposition"].startswith("attachment;")
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert b"Subject: For Alice" in await response.read()

    run(test)


# -- actions, audit ----------------------------------------------------------------------------


def test_release_is_asked_once_and_audited(hub: Any, conn: Any) -> None:
    ids = seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            path = f"/message/{ids['bob']}/release"
            assert (await browser.post(path))[1].endswith("done=requested")
            assert (await browser.post(path))[1].endswith("done=already")
            _, page = await browser.get(f"/message/{ids['bob']}")
            assert "release pending" in page and "admin:admin-a" in page
            _, listing = await browser.get("/")
            assert "release pending" in listing

    run(test)
    rows = conn.execute(
        "SELECT event_id::text, tower, action, recipients, requested_by FROM quarantine_actions"
    ).fetchall()
    assert rows == [(ids["bob"], "tower-a", "release", [BOB], "admin:admin-a")]
    audit = conn.execute(
        "SELECT who, role, action, event_id::text, tower, details->'recipients'"
        " FROM portal_audit WHERE action = 'release'"
    ).fetchall()
    assert audit == [("admin-a", "admin", "release", ids["bob"], "tower-a", [BOB])]


def test_delete_is_asked_audited_and_the_gocs_copy_goes_when_done(hub: Any, conn: Any) -> None:
    ids = seed(conn, hub)

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("op")
            assert (await browser.post(f"/message/{ids['carol']}/delete"))[1].endswith(
                "done=requested"
            )

    run(test)
    store = Store(portal_dsn(hub))
    try:
        assert store.expire() == 0  # not done yet: the tower has not deleted it
        conn.execute("UPDATE quarantine_actions SET done_at = now(), result = 'deleted'")
        assert store.expire() == 1
    finally:
        store.close()
    row = conn.execute(
        "SELECT message IS NULL FROM verdict_events WHERE event_id = %s", (ids["carol"],)
    ).fetchone()
    assert row == (True,)
    audit = conn.execute("SELECT who, action FROM portal_audit WHERE action = 'delete'").fetchall()
    assert audit == [("op", "delete")]


def allow_senders(conn: psycopg.Connection[Any], customer_id: int) -> Any:
    row = conn.execute(
        "SELECT policy->'allow_senders', updated_at FROM policies WHERE customer_id = %s",
        (customer_id,),
    ).fetchone()
    return row


def test_allow_list_goes_through_the_policy_path(hub: Any, conn: Any) -> None:
    a = hub.customers["a"]
    # A policy already there keeps its other fields; the sender is stored in lower case.
    conn.execute(
        "INSERT INTO policies (customer_id, policy) VALUES (%s, '{\"quarantine_days\": 10}')",
        (a,),
    )
    eid = add_quarantined(conn, customer_id=a, recipients=[ALICE], sender="Bad@Sender.Example")

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            _, location, _ = await browser.post(f"/message/{eid}/allow")
            assert location.endswith("done=allowed")
            _, page = await browser.get(location)
            assert "allow-listed for this customer" in page

    run(test)
    first = allow_senders(conn, a)
    assert first[0] == ["bad@sender.example"]
    row = conn.execute("SELECT policy->>'quarantine_days' FROM policies").fetchone()
    assert row == ("10",)
    audit = conn.execute("SELECT who, details FROM portal_audit WHERE action = 'allow'").fetchall()
    assert audit == [("admin-a", {"sender": "bad@sender.example"})]

    # A second click (or an operator's) changes nothing.
    async def again() -> None:
        for who in ("admin-a", "op"):
            async with portal(hub) as browser:
                await browser.sign_in(who)
                _, location, _ = await browser.post(f"/message/{eid}/allow")
                assert location.endswith("done=already")

    run(again)
    assert allow_senders(conn, a) == first
    assert count(conn, "portal_audit WHERE action = 'allow'") == 1


def test_allow_list_is_for_the_messages_own_customer_only(hub: Any, conn: Any) -> None:
    a, b = hub.customers["a"], hub.customers["b"]
    eid = add_quarantined(conn, customer_id=a, recipients=[ALICE])

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-b")
            status, _, _ = await browser.post(f"/message/{eid}/allow")
            assert status == 404

    run(test)
    assert count(conn, "policies") == 0

    # The operator allow-lists it for A (the message's customer), never for B.
    async def by_operator() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("op")
            _, location, _ = await browser.post(f"/message/{eid}/allow")
            assert location.endswith("done=allowed")

    run(by_operator)
    assert allow_senders(conn, a)[0] == ["bad@sender.example"]
    assert allow_senders(conn, b) is None


@pytest.mark.parametrize("sender", ["", "<>"])
def test_the_null_sender_is_never_allow_listed(hub: Any, conn: Any, sender: str) -> None:
    eid = add_quarantined(conn, customer_id=hub.customers["a"], recipients=[ALICE], sender=sender)

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            _, location, _ = await browser.post(f"/message/{eid}/allow")
            assert location.endswith("done=null-sender")
            _, page = await browser.get(location)
            assert "null sender" in page

    run(test)
    assert count(conn, "policies") == 0
    assert count(conn, "portal_audit WHERE action = 'allow'") == 0


def test_an_allow_list_the_policy_refuses_changes_nothing(hub: Any, conn: Any) -> None:
    eid = add_quarantined(
        conn, customer_id=hub.customers["a"], recipients=[ALICE], sender='"odd name"@x.example'
    )

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            _, location, _ = await browser.post(f"/message/{eid}/allow")
            assert location.endswith("done=refused")

    run(test)
    assert count(conn, "policies") == 0
    assert count(conn, "portal_audit WHERE action = 'allow'") == 0


def test_expiry_nulls_only_the_expired_copies_in_batches(hub: Any, conn: Any) -> None:
    a = hub.customers["a"]
    old = [
        add_quarantined(conn, customer_id=a, recipients=[ALICE], expires_in=-timedelta(days=1))
        for _ in range(5)
    ]
    fresh = add_quarantined(conn, customer_id=a, recipients=[ALICE])
    store = Store(portal_dsn(hub))
    try:
        assert store.expire(batch=3) == 3
        assert store.expire(batch=3) == 2
        assert store.expire(batch=3) == 0
    finally:
        store.close()
    kept = conn.execute(
        "SELECT event_id::text FROM verdict_events WHERE message IS NOT NULL"
    ).fetchall()
    assert kept == [(fresh,)]
    assert len(old) == 5

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            _, page = await browser.get(f"/message/{old[0]}")
            assert "expired" in page and 'id="release"' not in page

    run(test)


# -- search and paging ---------------------------------------------------------------------------


def test_keyset_pages_cover_everything_once(hub: Any, conn: Any) -> None:
    a = hub.customers["a"]
    base = datetime(2026, 12, 1, tzinfo=UTC)
    ids = {
        add_quarantined(
            conn, customer_id=a, recipients=[ALICE], at=base + timedelta(minutes=i // 3)
        )
        for i in range(120)  # three at each minute: ties broken by event_id
    }

    async def test() -> set[str]:
        seen: list[str] = []
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            path = "/"
            while path:
                _, text = await browser.get(path)
                seen += re.findall(r'data-event="([0-9a-f-]{36})"', text)
                found = re.search(r'id="next" href="([^"]+)"', text)
                path = found.group(1).replace("&amp;", "&") if found else ""
        assert len(seen) == len(set(seen))
        return set(seen)

    assert asyncio.run(test()) == ids


@pytest.mark.parametrize(
    ("query", "want"),
    [
        ("subject=nvoi", {"invoice"}),
        ("subject=100%25", {"percent"}),
        ("sender=promo", {"promo"}),
        (f"recipient={BOB}", {"percent"}),
        ("verdict=banned", {"promo"}),
        ("since=2026-11-02&until=2026-11-02", {"percent"}),
    ],
)
def test_search(hub: Any, conn: Any, query: str, want: set[str]) -> None:
    a = hub.customers["a"]
    day = datetime(2026, 11, 1, 12, tzinfo=UTC)
    ids = {
        "invoice": add_quarantined(
            conn, customer_id=a, recipients=[ALICE], subject="Your INVOICE", at=day
        ),
        "percent": add_quarantined(
            conn,
            customer_id=a,
            recipients=[BOB],
            subject="100% free",
            at=day + timedelta(days=1),
        ),
        "promo": add_quarantined(
            conn,
            customer_id=a,
            recipients=[ALICE],
            sender="promo@spam.example",
            subject="1000 offers",
            verdict="banned",
            at=day + timedelta(days=2),
        ),
    }
    # Another customer's match is never found.
    add_quarantined(conn, customer_id=hub.customers["b"], recipients=[CAROL], subject="invoice")

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            status, text = await browser.get("/?" + query)
            assert status == 200
            assert {n for n, eid in ids.items() if eid in text} == want
            assert text.count("data-event=") == len(want)

    run(test)


def test_the_portals_step_makes_quarantine_actions_when_the_sync_has_not(tmp_path: Any) -> None:
    """`mailtower portal schema` before the sync's first ensure: the table is there anyway
    (made by the sync module's ensure_portal), and the portal lists and asks."""
    with portal_hub("goc-bare", actions=False) as bare, bare.connect() as conn:
        assert quarantine_actions.portal_pending(conn) == []
        a = add_customer(conn, "acme", "acme.example")
        portal_store.set_user(conn, "admin-a", "admin", "acme", PASSWORD)
        eid = add_quarantined(conn, customer_id=a, recipients=[ALICE])

        async def test() -> None:
            async with portal(bare) as browser:
                await browser.sign_in("admin-a")
                _, text = await browser.get("/")
                assert eid in text and "held" in text
                _, location, _ = await browser.post(f"/message/{eid}/release")
                assert location.endswith("done=requested")

        run(test)
        assert count(conn, "quarantine_actions") == 1


def test_each_recipient_is_released_to_once(hub: Any, conn: Any) -> None:
    eid = add_quarantined(
        conn, customer_id=hub.customers["a"], recipients=[ALICE, BOB], verdict="banned"
    )

    async def test() -> None:
        async with portal(hub) as user:
            await user.sign_in_by_link(ALICE)
            assert (await user.post(f"/message/{eid}/release"))[1].endswith("done=requested")
            assert (await user.post(f"/message/{eid}/release"))[1].endswith("done=already")
        async with portal(hub) as admin:
            await admin.sign_in("admin-a")
            assert (await admin.post(f"/message/{eid}/release"))[1].endswith("done=requested")
            assert (await admin.post(f"/message/{eid}/release"))[1].endswith("done=already")
            assert (await admin.post(f"/message/{eid}/delete"))[1].endswith("done=requested")
            assert (await admin.post(f"/message/{eid}/release"))[1].endswith("done=already")

    run(test)
    rows = conn.execute(
        "SELECT action, recipients FROM quarantine_actions ORDER BY requested_at"
    ).fetchall()
    # a delete carries no recipients (the column is a release's: empty is all of them)
    assert rows == [("release", [ALICE]), ("release", [BOB]), ("delete", [])]


def test_the_hub_has_the_gocs_own_quarantine_actions(hub: Any, conn: Any) -> None:
    """No private copy: the table is the GOC deploy's (its ensure has nothing left to do)."""
    assert quarantine_actions.pending(conn, list(TOWERS)) == []
    row = conn.execute(
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.quarantine_actions'::regclass"
    ).fetchone()
    assert row == (True,)


@pytest.mark.parametrize(
    "earlier",
    [
        [],  # a release to all recipients, as the tower's manager reads an empty list
        ["ALICE@acme.example", "Bob@Acme.Example"],  # the manager compares without case
    ],
)
def test_an_earlier_release_covers_as_the_tower_reads_it(
    hub: Any, conn: Any, earlier: list[str]
) -> None:
    eid = add_quarantined(
        conn, customer_id=hub.customers["a"], recipients=[ALICE, BOB], verdict="banned"
    )
    conn.execute(
        "INSERT INTO quarantine_actions (request_id, event_id, tower, quarantine_id, action,"
        " recipients, requested_by) SELECT gen_random_uuid(), event_id, tower, quarantine_id,"
        " 'release', %s, 'operator:earlier' FROM verdict_events WHERE event_id = %s",
        (earlier, eid),
    )

    async def test() -> None:
        async with portal(hub) as user:
            await user.sign_in_by_link(ALICE)
            assert (await user.post(f"/message/{eid}/release"))[1].endswith("done=already")
        async with portal(hub) as admin:
            await admin.sign_in("admin-a")
            assert (await admin.post(f"/message/{eid}/release"))[1].endswith("done=already")

    run(test)
    assert count(conn, "quarantine_actions") == 1


def test_a_database_away_is_a_503_page(hub: Any, conn: Any) -> None:
    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("op")
            store = browser.client.app[STORE]
            store.close()  # and the next connection goes nowhere
            store.dsn = "host=127.0.0.1 port=1 dbname=x connect_timeout=2"
            status, text = await browser.get("/")
            assert status == 503 and "unavailable for a moment" in text
            assert "Traceback" not in text

    run(test)


# -- addresses stored with capitals (scand keeps Postfix's spelling) ---------------------------


def test_a_recipient_stored_with_capitals_is_the_users_own(hub: Any, conn: Any) -> None:
    eid = add_quarantined(
        conn,
        customer_id=hub.customers["a"],
        recipients=["Alice@Acme.example", BOB],
        subject="Mixed case",
        verdict="suspicious",
    )
    add_quarantined(conn, customer_id=hub.customers["b"], recipients=[CAROL], subject="Carol's")

    async def test() -> None:
        async with portal(hub) as alice:
            assert await alice.sign_in_by_link(ALICE) == 303  # a link is sent (link_wanted)
            _, listing = await alice.get("/")
            assert "Mixed case" in listing and "Carol&#x27;s" not in listing
            assert (await alice.post(f"/message/{eid}/release"))[1].endswith("done=requested")
        async with portal(hub) as bob:
            assert await bob.sign_in_by_link(BOB) == 303
            _, listing = await bob.get("/")
            assert "Mixed case" in listing
        async with portal(hub) as carol:
            assert await carol.sign_in_by_link(CAROL) == 303
            _, listing = await carol.get("/")
            assert "Mixed case" not in listing
            assert (await carol.get(f"/message/{eid}"))[0] == 404
        async with portal(hub) as admin:
            await admin.sign_in("admin-a")
            _, found = await admin.get("/?recipient=ALICE%40acme.example")
            assert "Mixed case" in found

    run(test)
    rows = conn.execute("SELECT recipients, requested_by FROM quarantine_actions").fetchall()
    assert rows == [(["Alice@Acme.example"], f"user:{ALICE}")]


def test_mt_lower_addresses_and_its_index(hub: Any, conn: Any) -> None:
    def lower(value: Any) -> Any:
        row = conn.execute("SELECT public.mt_lower_addresses(%s::text[])", (value,)).fetchone()
        assert row is not None
        return row[0]

    assert lower(["B@X.example", "a@Y.example", None]) == ["b@x.example", "a@y.example", None]
    assert lower(None) is None
    assert lower([]) == []
    row = conn.execute(
        "SELECT provolatile FROM pg_proc WHERE oid = 'public.mt_lower_addresses'::regproc"
    ).fetchone()
    assert row == ("i",)
    for _ in range(20):
        add_quarantined(conn, customer_id=hub.customers["a"], recipients=[BOB], message=None)
    conn.execute("ANALYZE verdict_events")
    # The user's page and link_wanted as the portal writes them: the planner can use the index.
    where, params = portal_store._scoped(portal_store.Scope("user", ALICE, address=ALICE))
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = conn.execute(
            psycopg.sql.SQL("EXPLAIN SELECT v.event_id FROM public.verdict_events v WHERE {}")
            .format(where)
            .as_string(conn),
            params,
        ).fetchall()
    assert "verdict_events_quarantine_recipients_lower" in "\n".join(r[0] for r in plan)


# -- what admins and users never see or take -------------------------------------------------


def test_set_aside_and_customerless_messages_are_the_operators_only(hub: Any, conn: Any) -> None:
    a = hub.customers["a"]
    ordinary = add_quarantined(conn, customer_id=a, recipients=[ALICE], subject="Ordinary")
    aside = add_quarantined(conn, customer_id=a, recipients=[ALICE, CAROL], subject="Set aside")
    conn.execute(
        "UPDATE verdict_events SET quarantine_meta = quarantine_meta"
        " || jsonb_build_object('unprocessable', true) WHERE event_id = %s",
        (aside,),
    )
    towers = add_quarantined(conn, customer_id=None, recipients=[ALICE], subject="No customer")

    async def test() -> None:
        async with portal(hub) as op:
            await op.sign_in("op")
            _, listing = await op.get("/")
            assert all(eid in listing for eid in (ordinary, aside, towers))
            assert (await op.get(f"/message/{aside}"))[0] == 200
        for who in ("admin-a", ALICE):
            async with portal(hub) as browser:
                if "@" in who:
                    assert await browser.sign_in_by_link(who) == 303
                else:
                    await browser.sign_in(who)
                _, listing = await browser.get("/")
                assert ordinary in listing and aside not in listing and towers not in listing
                for eid in (aside, towers):
                    assert (await browser.get(f"/message/{eid}"))[0] == 404
                    assert (await browser.get(f"/message/{eid}/raw"))[0] == 404
                    assert (await browser.post(f"/message/{eid}/release"))[0] == 404
        # Only a set-aside message for carol: no link (she could see nothing).
        async with portal(hub) as carol:
            await carol.get("/login")
            await carol.post("/link", {"address": CAROL})
            for _ in range(50):
                await asyncio.sleep(0.01)
            assert carol.mailbox.sent == []

    run(test)
    assert count(conn, "quarantine_actions") == 0


def test_a_user_never_releases_or_downloads_a_virus(hub: Any, conn: Any) -> None:
    virus = add_quarantined(
        conn, customer_id=hub.customers["a"], recipients=[ALICE], verdict="virus"
    )

    async def test() -> None:
        async with portal(hub) as user:
            await user.sign_in_by_link(ALICE)
            status, page = await user.get(f"/message/{virus}")
            assert status == 200 and 'id="release"' not in page and 'id="raw"' not in page
            assert "only your mail administrator" in page
            status, _, text = await user.post(f"/message/{virus}/release")
            assert status == 403 and "holds a virus" in text
            status, text = await user.get(f"/message/{virus}/raw")
            assert status == 403 and "holds a virus" in text
        assert count(conn, "quarantine_actions") == 0
        for name in ("admin-a", "op"):
            async with portal(hub) as admin:
                await admin.sign_in(name)
                _, page = await admin.get(f"/message/{virus}")
                assert 'id="release"' in page and 'id="raw"' in page
                assert (await admin.client.get(f"/message/{virus}/raw")).status == 200
        async with portal(hub) as admin:
            await admin.sign_in("admin-a")
            assert (await admin.post(f"/message/{virus}/release"))[1].endswith("done=requested")

    run(test)
    rows = conn.execute("SELECT recipients, requested_by FROM quarantine_actions").fetchall()
    assert rows == [([ALICE], "admin:admin-a")]


# -- behind a TLS proxy: whom the rate limits count ----------------------------------------


async def _fail_logins(browser: Browser, name: str, times: int) -> list[int]:
    statuses = []
    for _ in range(times):
        await browser.get("/login")
        statuses.append((await browser.post("/login", {"name": name, "password": "no"}))[0])
    return statuses


def test_behind_a_proxy_the_limits_count_the_forwarded_client(hub: Any, conn: Any) -> None:
    async def test() -> None:
        async with portal(hub, login_attempts=2, behind_proxy=True) as browser:
            browser.headers = {"X-Forwarded-For": "203.0.113.1"}
            assert await _fail_logins(browser, "op", 3) == [401, 401, 429]
            # A spoofed first entry changes nothing: the proxy's (last) entry is the client.
            browser.headers = {"X-Forwarded-For": "198.51.100.9, 203.0.113.1"}
            assert await _fail_logins(browser, "admin-b", 1) == [429]
            # Another client, behind the same proxy, still signs in.
            browser.headers = {"X-Forwarded-For": "203.0.113.2"}
            assert await browser.sign_in("admin-a") == 303
        # Not behind a proxy: the header is anybody's word and never read.
        async with portal(hub, login_attempts=2) as browser:
            for n, name in enumerate(("admin-a", "admin-b", "op")):
                browser.headers = {"X-Forwarded-For": f"203.0.113.{n + 10}"}
                await browser.get("/login")
                status, _, _ = await browser.post("/login", {"name": name, "password": "no"})
                assert status == (401 if n < 2 else 429)

    run(test)


def test_link_limits_are_per_client_and_per_address_behind_a_proxy(hub: Any, conn: Any) -> None:
    async def ask(browser: Browser, client: str, address: str) -> int:
        browser.headers = {"X-Forwarded-For": client}
        await browser.get("/login")
        return (await browser.post("/link", {"address": address}))[0]

    async def test() -> None:
        async with portal(hub, links_per_address=2, behind_proxy=True) as browser:
            one, two = "203.0.113.1", "2001:db8::2"
            assert [await ask(browser, one, ALICE) for _ in range(3)] == [200, 200, 429]
            assert await ask(browser, one, BOB) == 429  # this client has had its share
            assert await ask(browser, two, BOB) == 200  # another's are its own
            assert await ask(browser, two, ALICE) == 429  # alice's links are used up, for all
            assert await ask(browser, two, CAROL) == 200

    run(test)


# -- a big message's page ------------------------------------------------------------------


def test_a_big_messages_page_answers_and_says_it_was_cut(hub: Any, conn: Any) -> None:
    big = small_message(
        "x@sender.example", [ALICE], "Big one", "The start.\n", **{"big.bin": b"\x00" * (3 << 20)}
    )
    eid = add_quarantined(
        conn, customer_id=hub.customers["a"], recipients=[ALICE], subject="Big one", message=big
    )

    async def test() -> None:
        async with portal(hub) as browser:
            await browser.sign_in("admin-a")
            status, page = await browser.get(f"/message/{eid}")
            assert status == 200 and 'id="cut"' in page and "first 2.0 MiB" in page
            assert "The start." in page and "Subject: Big one" in page
            _, small = await browser.get("/")  # an ordinary page still answers after it
            assert "Big one" in small

    run(test)
