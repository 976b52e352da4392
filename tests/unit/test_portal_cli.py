"""``mailtower portal``: the schema step as the deploy runs it, and the users' commands."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from portal_fixtures import PORTAL_PASSWORD, add_customer, portal_hub

from mailtower.cli import main
from mailtower.goc.portal.store import Scope, Store

pytestmark = pytest.mark.integration

PASSWORD = "a long enough password"


@pytest.fixture(scope="module")
def hub() -> Iterator[Any]:
    with portal_hub("goc-cli") as cluster:
        with cluster.connect() as conn:
            add_customer(conn, "acme", "acme.example")
        yield cluster


def portal(hub: Any, monkeypatch: pytest.MonkeyPatch, *args: str, stdin: str = "") -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["portal", "--dsn", hub.dsn(), *args])


def test_schema_is_idempotent_and_sets_the_role(hub: Any, monkeypatch, capsys) -> None:
    for _ in range(2):
        schema = ("schema", "--role-password-stdin")
        assert portal(hub, monkeypatch, *schema, stdin=PORTAL_PASSWORD) == 0
    assert "mt_portal granted on verdict_events" in capsys.readouterr().out
    assert portal(hub, monkeypatch, "schema", "--role-password-stdin", stdin="short") == 2


def test_users_added_listed_changed_removed(hub: Any, monkeypatch, capsys) -> None:
    store = Store(hub.conninfo("mt_portal", PORTAL_PASSWORD))
    try:
        operator = ("user", "add", "op", "--role", "operator")
        assert portal(hub, monkeypatch, *operator, stdin=PASSWORD) == 0
        assert (
            portal(
                hub,
                monkeypatch,
                "user",
                "add",
                "boss",
                "--role",
                "admin",
                "--customer",
                "acme",
                stdin=PASSWORD,
            )
            == 0
        )
        # Refused: an admin without a customer, an unknown customer, a short password.
        assert portal(hub, monkeypatch, "user", "add", "x", "--role", "admin", stdin=PASSWORD) == 2
        assert (
            portal(
                hub,
                monkeypatch,
                "user",
                "add",
                "x",
                "--role",
                "admin",
                "--customer",
                "nope",
                stdin=PASSWORD,
            )
            == 2
        )
        assert portal(hub, monkeypatch, *operator, stdin="short") == 2
        capsys.readouterr()
        assert portal(hub, monkeypatch, "user", "list") == 0
        assert capsys.readouterr().out.splitlines() == ["boss\tadmin\tacme", "op\toperator\t-"]
        scope = store.password_user("boss", PASSWORD)
        assert scope is not None and scope.role == "admin"
        token, _ = store.open_session(scope, 3600, 600)
        assert store.session(token) is not None
        # A new password ends their sessions; the old one no longer signs in.
        assert portal(hub, monkeypatch, "user", "passwd", "boss", stdin=PASSWORD + "!") == 0
        assert store.session(token) is None
        assert store.password_user("boss", PASSWORD) is None
        assert store.password_user("boss", PASSWORD + "!") == Scope(
            "admin", "boss", customer_id=scope.customer_id
        )
        token, _ = store.open_session(scope, 3600, 600)
        assert portal(hub, monkeypatch, "user", "remove", "boss") == 0
        assert store.session(token) is None
        assert portal(hub, monkeypatch, "user", "remove", "boss") == 1
    finally:
        store.close()


@pytest.mark.parametrize(
    ("extra", "behind"),
    [(["--origin", "https://portal.example"], True), ([], False)],
)
def test_serve_trusts_x_forwarded_for_only_behind_a_proxy(
    tmp_path: Any, monkeypatch: Any, extra: list[str], behind: bool
) -> None:
    from mailtower.goc.portal import __main__ as portal_main

    seen: list[Any] = []

    def fake_make_app(config: Any, store: Any, mailer: Any) -> Any:
        seen.append(config)
        return None

    async def fake_run(*args: Any) -> None:
        return None

    monkeypatch.setattr(portal_main, "make_app", fake_make_app)
    monkeypatch.setattr(portal_main, "_run", fake_run)
    argv = ["serve", "--dsn", "host=/nonexistent", "--secret-file", str(tmp_path / "key")]
    assert portal_main.main([*argv, "--listen", "127.0.0.1:18027", *extra]) == 0
    assert seen[0].behind_proxy is behind
