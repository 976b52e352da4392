"""mailtower-eye's command line: operators, and the checks made before serving."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mailtower.goc.eye.__main__ import main
from mailtower.goc.eye.auth import Credentials


def run(monkeypatch: pytest.MonkeyPatch, stdin: str, *argv: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(list(argv))


def test_operator_add_list_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = str(tmp_path / "operators")
    assert (
        run(
            monkeypatch, "a long password one\n", "operator", "add", "alice", "--credentials", creds
        )
        == 0
    )
    assert (
        run(monkeypatch, "a long password two\n", "operator", "add", "bob", "--credentials", creds)
        == 0
    )
    assert Credentials(Path(creds)).check("alice", "a long password one")
    capsys.readouterr()
    assert run(monkeypatch, "", "operator", "list", "--credentials", creds) == 0
    assert capsys.readouterr().out.split() == ["alice", "bob"]
    assert run(monkeypatch, "", "operator", "remove", "bob", "--credentials", creds) == 0
    assert run(monkeypatch, "", "operator", "remove", "bob", "--credentials", creds) == 1
    assert sorted(Credentials(Path(creds)).operators()) == ["alice"]


def test_operator_short_password_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "operators"
    assert run(monkeypatch, "short\n", "operator", "add", "alice", "--credentials", str(creds)) == 2
    assert not creds.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --dsn"),
        (["--dsn", "host=x", "--listen", "8025"], "use HOST:PORT"),
        (["--dsn", "host=x", "--tls-cert", "c.pem"], "go together"),
        (["--dsn", "host=x", "--credentials", "/nonexistent/operators"], "/nonexistent/operators"),
        # HTTPS only: plain HTTP on an address others reach, or behind a proxy said to be HTTP.
        (["--dsn", "host=x", "--listen", "0.0.0.0:8025"], "plain HTTP only on a loopback"),
        (["--dsn", "host=x", "--listen", "10.201.9.10:8025"], "plain HTTP only on a loopback"),
        (["--dsn", "host=x", "--listen", "[::]:8025"], "plain HTTP only on a loopback"),
        (["--dsn", "host=x", "--listen", "eye.example:8025"], "plain HTTP only on a loopback"),
        (
            ["--dsn", "host=x", "--listen", "0.0.0.0:8025", "--origin", "https://eye.example"],
            "plain HTTP only on a loopback",
        ),
        (["--dsn", "host=x", "--origin", "http://eye.example"], "must be https://"),
    ],
)
def test_serve_refuses_bad_arguments(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.delenv("MAILTOWER_EYE_DSN", raising=False)
    argv = ["serve", "--secret-file", str(tmp_path / "key"), *args]
    assert run(monkeypatch, "", *argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "tls", "origin"),
    [
        ("127.0.0.1", False, None),
        ("::1", False, None),
        ("localhost", False, None),
        ("127.0.0.1", False, "https://eye.example"),
        ("0.0.0.0", True, None),
        ("10.201.9.10", True, None),
    ],
)
def test_serve_allows_https_or_loopback(host: str, tls: bool, origin: str | None) -> None:
    from mailtower.goc.eye.__main__ import plain_http_refused

    assert plain_http_refused(host, tls, origin) is None
