"""VirusEye's web server without a database: access control, CSRF checks, the event stream."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientSession, TCPConnector
from aiohttp.test_utils import TestClient, TestServer

from mailtower.goc.eye import auth
from mailtower.goc.eye.app import HSTS, LIMITER, SESSION_COOKIE, EyeConfig, Hub, make_app
from mailtower.goc.eye.auth import Credentials, LoginLimiter
from mailtower.goc.eye.revocations import MemoryRevocations, RevocationStore

PASSWORD = "alice's long password"
SNAPSHOT = {"now": "2026-05-20T12:00:00+00:00", "outbreaks": [{"name": "Win.Test"}]}


class FakeSource:
    """Snapshots from memory; ``fail`` makes the next ones raise like a dead database."""

    def __init__(self) -> None:
        self.fail: Exception | None = None
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return json.loads(json.dumps(SNAPSHOT))


@asynccontextmanager
async def eye(
    tmp_path: Path,
    source: FakeSource | None = None,
    *,
    revocations: RevocationStore | None = None,
    limiter: LoginLimiter | None = None,
    **settings: Any,
) -> AsyncIterator[TestClient[Any, Any]]:
    credentials = tmp_path / "operators"
    if not credentials.exists():
        Credentials(credentials).set_password("alice", PASSWORD)
    config = EyeConfig(credentials=credentials, secret=b"k" * 64, refresh_s=0.05, **settings)
    app = make_app(config, source or FakeSource(), revocations)
    if limiter is not None:
        app[LIMITER] = limiter
    async with TestClient(TestServer(app)) as client:
        yield client


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def origin(client: TestClient[Any, Any]) -> dict[str, str]:
    return {"Origin": str(client.make_url("")).rstrip("/")}


async def login(
    client: TestClient[Any, Any], password: str = PASSWORD, **headers: str
) -> ClientResponse:
    return await client.post(
        "/login",
        data={"name": "alice", "password": password},
        headers={**origin(client), **headers},
        allow_redirects=False,
    )


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/", 303),
        ("/static/eye.js", 303),
        ("/api/snapshot", 401),
        ("/events", 401),
        ("/login", 200),
        ("/static/eye.css", 200),
        ("/healthz", 200),
    ],
)
def test_unauthenticated_access(tmp_path: Path, path: str, status: int) -> None:
    async def test() -> None:
        async with eye(tmp_path) as client:
            response = await client.get(path, allow_redirects=False)
            assert response.status == status
            if status == 303:
                assert response.headers["Location"] == "/login"
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]

    run(test)


@pytest.mark.parametrize(
    ("settings", "hsts"),
    [
        ({}, None),  # plain HTTP on loopback (a test): HSTS would mean nothing
        ({"secure_cookie": True}, HSTS),  # HTTPS, directly or behind a proxy
        ({"secure_cookie": True, "origin": "https://eye.example"}, HSTS),
    ],
)
def test_hsts_only_over_https(tmp_path: Path, settings: dict[str, Any], hsts: str | None) -> None:
    async def test() -> None:
        async with eye(tmp_path, **settings) as client:
            for path in ("/login", "/api/snapshot", "/healthz"):
                response = await client.get(path, allow_redirects=False)
                assert response.headers.get("Strict-Transport-Security") == hsts, path

    run(test)


def test_wrong_password_refused(tmp_path: Path) -> None:
    async def test() -> None:
        async with eye(tmp_path) as client:
            response = await login(client, password="not the password")
            assert response.status == 401
            assert "Wrong name or password" in await response.text()
            assert SESSION_COOKIE not in response.cookies
            assert (await client.get("/api/snapshot")).status == 401

    run(test)


def test_login_sets_strict_httponly_cookie_and_opens_the_api(tmp_path: Path) -> None:
    async def test() -> None:
        async with eye(tmp_path) as client:
            response = await login(client)
            assert response.status == 303 and response.headers["Location"] == "/"
            cookie = response.cookies[SESSION_COOKIE]
            assert cookie["httponly"] is True
            assert cookie["samesite"] == "Strict"
            assert cookie["path"] == "/"
            page = await client.get("/")
            assert page.status == 200
            assert "operator <b>alice</b>" in await page.text()
            api = await client.get("/api/snapshot")
            assert api.status == 200
            assert (await api.json())["outbreaks"] == [{"name": "Win.Test"}]
            assert (await client.get("/static/eye.js")).status == 200

    run(test)


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_cross_origin_login_refused(tmp_path: Path, headers: dict[str, str]) -> None:
    async def test() -> None:
        async with eye(tmp_path) as client:
            response = await login(client, **headers)
            assert response.status == 403
            assert SESSION_COOKIE not in response.cookies

    run(test)


def test_login_without_origin_or_referer_refused(tmp_path: Path) -> None:
    async def test() -> None:
        async with eye(tmp_path) as client:
            response = await client.post(
                "/login", data={"name": "alice", "password": PASSWORD}, allow_redirects=False
            )
            assert response.status == 403
            referer = str(client.make_url("/login"))
            response = await client.post(
                "/login",
                data={"name": "alice", "password": PASSWORD},
                headers={"Referer": referer},
                allow_redirects=False,
            )
            assert response.status == 303

    run(test)


def test_failed_logins_throttled(tmp_path: Path) -> None:
    async def test() -> None:
        async with eye(tmp_path) as client:
            for _ in range(5):
                assert (await login(client, password="guess")).status == 401
            # Even the right password waits now.
            assert (await login(client)).status == 429

    run(test)


class CountedChecks:
    """Wraps auth.verify_password: how many passwords were checked, how many at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: threading.Event | None = None):
        self.calls = 0
        self.running = 0
        self.most_at_once = 0
        self.hold = hold  # when given, every check waits for it (a slow scrypt)
        self._lock = threading.Lock()
        self._verify = auth.verify_password
        monkeypatch.setattr(auth, "verify_password", self)

    def __call__(self, password: str, encoded: str) -> bool:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.hold is not None:
                assert self.hold.wait(30)
            return self._verify(password, encoded)
        finally:
            with self._lock:
                self.running -= 1


def test_burst_of_wrong_passwords_checks_only_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finding: 24 guesses in parallel were all checked before the limit of 5 answered."""

    async def test() -> None:
        checks = CountedChecks(monkeypatch)
        async with eye(tmp_path, login_check_wait_s=120) as client:  # no 503 on a busy machine
            guesses = [login(client, password=f"guess {i}") for i in range(24)]
            statuses = sorted([r.status for r in await asyncio.gather(*guesses)])
        assert checks.calls == 5
        assert statuses == [401] * 5 + [429] * 19
        assert checks.most_at_once <= 2  # EyeConfig.login_checks_at_once

    run(test)


def test_one_account_limited_across_addresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guesses at alice from 24 loopback addresses (127.0.0.2–25): the account's limit holds."""

    async def test() -> None:
        checks = CountedChecks(monkeypatch)
        async with eye(tmp_path, login_check_wait_s=120) as client:
            url = str(client.make_url("/login"))

            async def attempt(i: int, name: str, password: str) -> int:
                connector = TCPConnector(local_addr=(f"127.0.0.{i + 2}", 0))
                async with ClientSession(connector=connector) as session:
                    response = await session.post(
                        url,
                        data={"name": name, "password": password},
                        headers=origin(client),
                        allow_redirects=False,
                    )
                    return response.status

            guesses = [attempt(i, "alice", f"guess {i}") for i in range(24)]
            statuses = sorted(await asyncio.gather(*guesses))
            assert checks.calls == 5
            assert statuses == [401] * 5 + [429] * 19
            # Another operator logging in from one of those addresses is not held up by it.
            Credentials(tmp_path / "operators").set_password("bob", "bob's long password")
            assert await attempt(0, "bob", "bob's long password") == 303

    run(test)


def test_right_password_refused_until_the_window_passes(tmp_path: Path) -> None:
    async def test() -> None:
        now = [0.0]
        limiter = LoginLimiter(5, 300.0, clock=lambda: now[0])
        async with eye(tmp_path, limiter=limiter) as client:
            for _ in range(5):
                assert (await login(client, password="guess")).status == 401
            now[0] = 299.0
            response = await login(client)
            assert response.status == 429 and SESSION_COOKIE not in response.cookies
            now[0] = 300.0  # the first failures have left the window
            assert (await login(client)).status == 303

    run(test)


def test_password_checks_capped_and_excess_told_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond login_checks_at_once a login waits login_check_wait_s, then gets 503 back."""

    async def test() -> None:
        hold = threading.Event()
        checks = CountedChecks(monkeypatch, hold)
        async with eye(tmp_path, login_checks_at_once=2, login_check_wait_s=0.2) as client:
            first = [asyncio.create_task(login(client, password="guess")) for _ in range(2)]
            async with asyncio.timeout(10):
                while checks.running < 2:  # both slots taken
                    await asyncio.sleep(0.01)
            busy = await login(client, password="guess")
            assert busy.status == 503 and busy.headers["Retry-After"] == "5"
            hold.set()
            assert [r.status for r in await asyncio.gather(*first)] == [401, 401]
            assert checks.calls == 2 and checks.most_at_once == 2
            # The 503 was never checked, so it did not count: 3 attempts left of 5.
            for _ in range(3):
                assert (await login(client, password="guess")).status == 401
            assert (await login(client, password="guess")).status == 429

    run(test)


def test_logout_survives_a_restart(tmp_path: Path) -> None:
    """A cookie kept from before a logout stays refused by the next app on the same store."""

    async def test() -> None:
        store = MemoryRevocations()
        async with eye(tmp_path, revocations=store) as client:
            await login(client)
            token = client.session.cookie_jar.filter_cookies(client.make_url("/"))[SESSION_COOKIE]
            kept = {"Cookie": f"{SESSION_COOKIE}={token.value}"}
            assert (await client.post("/logout", headers=origin(client))).status == 200
        async with eye(tmp_path, revocations=store) as client:
            assert (await client.get("/api/snapshot", headers=kept)).status == 401
        async with eye(tmp_path) as client:  # without the store the logout is forgotten
            assert (await client.get("/api/snapshot", headers=kept)).status == 200

    run(test)


class FailingStore(MemoryRevocations):
    def __init__(self) -> None:
        super().__init__()
        self.down = True

    def load(self) -> dict[str, int]:
        if self.down:
            raise OSError("connection refused")
        return super().load()

    def add(self, sid: str, expires: int) -> None:
        if self.down:
            raise OSError("connection refused")
        super().add(sid, expires)


def test_logins_wait_for_the_revocations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Database down at start: no session is accepted nor issued until the list is read."""

    async def test() -> None:
        monkeypatch.setattr("mailtower.goc.eye.app.REVOCATIONS_RETRY_S", 0.05)
        store = FailingStore()
        async with eye(tmp_path, revocations=store) as client:
            assert (await login(client)).status == 503
            store.down = False
            async with asyncio.timeout(10):
                while (response := await login(client)).status == 503:
                    await asyncio.sleep(0.05)
            assert response.status == 303

    run(test)


def test_logout_saved_later_when_the_store_was_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def test() -> None:
        monkeypatch.setattr("mailtower.goc.eye.app.REVOCATIONS_RETRY_S", 0.05)
        store = FailingStore()
        store.down = False
        async with eye(tmp_path, revocations=store) as client:
            await login(client)
            store.down = True
            response = await client.post("/logout", headers=origin(client), allow_redirects=False)
            assert response.status == 303
            assert store._revoked == {}  # nothing saved yet
            store.down = False
            async with asyncio.timeout(10):
                while not store.load():
                    await asyncio.sleep(0.05)

    run(test)


def test_logout_ends_the_session_even_for_a_kept_cookie(tmp_path: Path) -> None:
    async def test() -> None:
        async with eye(tmp_path) as client:
            await login(client)
            token = client.session.cookie_jar.filter_cookies(client.make_url("/"))[SESSION_COOKIE]
            kept = {"Cookie": f"{SESSION_COOKIE}={token.value}"}
            assert (await client.get("/api/snapshot", headers=kept)).status == 200
            response = await client.post("/logout", headers=origin(client), allow_redirects=False)
            assert response.status == 303 and response.headers["Location"] == "/login"
            gone = response.cookies[SESSION_COOKIE]
            assert gone.value == "" and gone["httponly"] is True and gone["samesite"] == "Strict"
            assert (await client.get("/api/snapshot")).status == 401
            assert (await client.get("/api/snapshot", headers=kept)).status == 401

    run(test)


def test_event_stream_pushes_snapshots(tmp_path: Path) -> None:
    async def test() -> None:
        source = FakeSource()
        async with eye(tmp_path, source) as client:
            await login(client)
            response = await client.get("/events")
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            frames: list[dict[str, Any]] = []
            async with asyncio.timeout(10):
                while len(frames) < 2:  # two refreshes: the stream keeps going
                    line = (await response.content.readline()).decode()
                    if line.startswith("data: "):
                        frames.append(json.loads(line[6:]))
            assert frames[0]["outbreaks"] == [{"name": "Win.Test"}]
            assert frames[0]["error"] is None
            response.close()

    run(test)


def test_hub_keeps_last_good_snapshot_when_the_database_fails() -> None:
    async def test() -> None:
        source = FakeSource()
        hub = Hub(source, refresh_s=60)
        good = json.loads(await hub.refresh())
        assert good["error"] is None
        source.fail = OSError("connection refused\ndetail line")
        bad = json.loads(await hub.refresh())
        assert bad["outbreaks"] == good["outbreaks"]
        assert bad["error"]["message"] == "GOC database: connection refused"
        source.fail = None
        assert json.loads(await hub.refresh())["error"] is None

    run(test)


def test_hub_polls_only_while_someone_listens() -> None:
    async def test() -> None:
        source = FakeSource()
        hub = Hub(source, refresh_s=0.01)
        task = asyncio.create_task(hub.run())
        try:
            await asyncio.sleep(0.1)
            assert source.calls == 0
            queue = hub.subscribe()
            async with asyncio.timeout(5):
                frame = await queue.get()
            assert frame is not None and frame.startswith(b"event: snapshot\ndata: ")
            hub.unsubscribe(queue)
            await asyncio.sleep(0.05)  # past the loop's own pause between refreshes
            async with hub._refresh_lock:  # a refresh in flight (a slow thread) has finished
                calls = source.calls
            await asyncio.sleep(0.1)
            assert source.calls == calls
        finally:
            task.cancel()

    run(test)
