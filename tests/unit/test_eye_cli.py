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
