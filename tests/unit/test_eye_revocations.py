"""Logouts kept in a real GOC database (PostgreSQL 15), used as ``mt_eye`` with only the grants
``mailtower sync goc`` gives it: a logged-out cookie stays refused after VirusEye restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from eye_fixtures import goc_hub
from test_eye_web import SESSION_COOKIE, eye, login, origin

from mailtower.goc.eye.revocations import PgRevocations
from mailtower.goc.sync.changes import Changes
from mailtower.goc.sync.deployed import EYE_REVOCATIONS, EYE_ROLE
from mailtower.goc.sync.roles import ensure_login_role, ensure_privileges

pytestmark = pytest.mark.integration

EYE_PASSWORD = "eye-password-0123456"


@pytest.fixture(scope="module")
def store() -> Iterator[PgRevocations]:
    """The store as VirusEye has it at the GOC: connected as mt_eye over TCP with a password."""
    with goc_hub() as cluster:
        with cluster.connect() as conn:
            changes = Changes("goc")
            ensure_login_role(conn, EYE_ROLE, EYE_PASSWORD, changes)
            ensure_privileges(conn, EYE_ROLE, *EYE_REVOCATIONS, changes)
        yield PgRevocations(cluster.conninfo(EYE_ROLE, EYE_PASSWORD))


def test_store_keeps_ids_until_they_expire(store: PgRevocations) -> None:
    now = int(time.time())
    store.add("expired", now - 1)
    store.add("live", now + 3600)
    store.add("live", now + 3600)  # a second logout of the same session is harmless
    assert store.load().get("live") == now + 3600
    assert "expired" not in store.load()
    store.add("later", now + 60)  # every add also deletes what has expired
    with store._connect() as conn:
        sids = {sid for (sid,) in conn.execute("SELECT sid FROM public.eye_revoked_sessions")}
    assert "expired" not in sids and {"live", "later"} <= sids


def test_logout_survives_a_restart_of_the_app(store: PgRevocations, tmp_path: Path) -> None:
    async def test() -> None:
        async with eye(tmp_path, revocations=store) as client:
            await login(client)
            jar = client.session.cookie_jar.filter_cookies(client.make_url("/"))
            kept = {"Cookie": f"{SESSION_COOKIE}={jar[SESSION_COOKIE].value}"}
            other = await login(client)  # a second session of the same operator
            second = {"Cookie": f"{SESSION_COOKIE}={other.cookies[SESSION_COOKIE].value}"}
            assert kept != second
            client.session.cookie_jar.clear()  # from here on, only the cookies given
            response = await client.post(
                "/logout", headers={**origin(client), **kept}, allow_redirects=False
            )
            assert response.status == 303
        # A new app, a new process's memory: only the database remembers the logout.
        async with eye(tmp_path, revocations=store) as client:
            assert (await client.get("/api/snapshot", headers=kept)).status == 401
            assert (await client.get("/api/snapshot", headers=second)).status == 200

    asyncio.run(test())
