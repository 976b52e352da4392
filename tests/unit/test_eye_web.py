"""VirusEye's web server without a database: access control, CSRF checks, the event stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from mailtower.eye.app import SESSION_COOKIE, EyeConfig, Hub, make_app
from mailtower.eye.auth import Credentials

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
    tmp_path: Path, source: FakeSource | None = None
) -> AsyncIterator[TestClient[Any, Any]]:
    credentials = tmp_path / "operators"
    Credentials(credentials).set_password("alice", PASSWORD)
    config = EyeConfig(credentials=credentials, secret=b"k" * 64, refresh_s=0.05)
    app = make_app(config, source or FakeSource())
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


def test_logout_ends_the_session_even_for_a_kept_cookie(tmp_path: Path) -> None:
    async def test() -> None:
        async with eye(tmp_path) as client:
            await login(client)
            token = client.session.cookie_jar.filter_cookies(client.make_url("/"))[SESSION_COOKIE]
            kept = {"Cookie": f"{SESSION_COOKIE}={token.value}"}
            assert (await client.get("/api/snapshot", headers=kept)).status == 200
            response = await client.post("/logout", headers=origin(client), allow_redirects=False)
            assert response.status == 303 and response.headers["Location"] == "/login"
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
