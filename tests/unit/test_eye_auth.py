"""VirusEye's operator logins: password hashes, the credentials file, sessions, throttling."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailtower.goc.eye import auth
from mailtower.goc.eye.auth import Credentials, LoginLimiter, Sessions
from mailtower.goc.eye.errors import CredentialsError, SecretError

SECRET = b"s" * 64


def test_password_hash_round_trip() -> None:
    encoded = auth.hash_password("correct horse battery")
    assert encoded.startswith("scrypt$32768$8$1$")
    assert auth.verify_password("correct horse battery", encoded)
    assert not auth.verify_password("correct horse batterY", encoded)
    # Same password, fresh salt: a different hash.
    assert auth.hash_password("correct horse battery") != encoded


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plain",
        "pbkdf2$1$2$3$AAAA$AAAA",
        "scrypt$x$8$1$AAAA$AAAA",
        "scrypt$16$8$1$!!!$AAAA",
        "scrypt$16$8$1$AAAA$",
        f"scrypt${2**24}$8$1$AAAA$AAAA",  # would need 2 GiB: refused, not attempted
    ],
)
def test_malformed_hash_never_verifies(encoded: str) -> None:
    assert not auth.verify_password("anything", encoded)


def test_credentials_file(tmp_path: Path) -> None:
    path = tmp_path / "eye" / "operators"
    creds = Credentials(path)
    creds.set_password("alice", "alice's long password")
    creds.set_password("bob", "bob's long password")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(creds.operators()) == ["alice", "bob"]
    assert creds.check("alice", "alice's long password")
    assert not creds.check("alice", "bob's long password")
    assert not creds.check("carol", "alice's long password")
    assert creds.remove("bob") and not creds.remove("bob")
    assert sorted(Credentials(path).operators()) == ["alice"]


def test_credentials_reread_when_changed(tmp_path: Path) -> None:
    path = tmp_path / "operators"
    creds = Credentials(path)
    creds.set_password("alice", "alice's long password")
    assert list(creds.operators()) == ["alice"]
    Credentials(path).set_password("dave", "dave's long password")  # another process
    assert sorted(creds.operators()) == ["alice", "dave"]


@pytest.mark.parametrize("line", ["alice", "alice:plain", "al ice:scrypt$1", ":scrypt$1"])
def test_malformed_credentials_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "operators"
    path.write_text(f"# comment\n\n{line}\n")
    with pytest.raises(CredentialsError, match=r"operators:3"):
        Credentials(path).operators()


def test_bad_operator_name_refused(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError):
        Credentials(tmp_path / "operators").set_password("bad:name", "a long enough password")


@pytest.fixture
def sessions(tmp_path: Path) -> Sessions:
    creds = Credentials(tmp_path / "operators")
    creds.set_password("alice", "alice's long password")
    return Sessions(SECRET, creds, lifetime_s=3600)


def test_session_round_trip(sessions: Sessions) -> None:
    token = sessions.issue("alice", now=1000)
    session = sessions.check(token, now=1001)
    assert session is not None
    assert (session.user, session.expires) == ("alice", 4600)


def test_session_expires(sessions: Sessions) -> None:
    token = sessions.issue("alice", now=1000)
    assert sessions.check(token, now=4599) is not None
    assert sessions.check(token, now=4600) is None


def test_tampered_or_foreign_token_refused(sessions: Sessions, tmp_path: Path) -> None:
    token = sessions.issue("alice")
    body, signature = token.split(".")
    forged_body = auth._b64(auth._unb64(body).replace(b'"alice"', b'"mallory"'))
    assert sessions.check(f"{forged_body}.{signature}") is None
    assert sessions.check(token[:-2] + "AA") is None
    assert sessions.check("") is None and sessions.check(None) is None
    assert sessions.check("a.b.c") is None
    other = Sessions(b"t" * 64, sessions.credentials)
    assert other.check(token) is None


def test_logout_revokes_only_that_session(sessions: Sessions) -> None:
    first, second = sessions.issue("alice"), sessions.issue("alice")
    session = sessions.check(first)
    assert session is not None
    sessions.revoke(session)
    assert sessions.check(first) is None
    assert sessions.check(second) is not None


def test_password_change_or_removal_ends_sessions(sessions: Sessions) -> None:
    token = sessions.issue("alice")
    sessions.credentials.set_password("alice", "a new long password")
    assert sessions.check(token) is None
    token = sessions.issue("alice")
    assert sessions.check(token) is not None
    sessions.credentials.remove("alice")
    assert sessions.check(token) is None


def test_unreadable_credentials_end_sessions(sessions: Sessions) -> None:
    token = sessions.issue("alice")
    sessions.credentials.path.write_text("garbage\n")
    assert sessions.check(token) is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_limiter_counts_attempts_per_address_and_per_account() -> None:
    clock = Clock()
    limiter = LoginLimiter(max_attempts=3, window_s=60, clock=clock)
    assert all(limiter.reserve("10.0.0.1", name) for name in ("alice", "bob", "carol"))
    assert limiter.reserve("10.0.0.1", "dave") is None  # the address is at its limit
    assert all(limiter.reserve(f"10.0.1.{i}", "alice") for i in (1, 2))
    assert limiter.reserve("10.0.1.3", "alice") is None  # so is alice, from any address
    assert limiter.reserve("10.0.1.3", "bob") is not None  # bob had one
    clock.now = 60.0  # every attempt has left the window
    assert limiter.reserve("10.0.0.1", "alice") is not None


def test_limiter_release_gives_back_only_that_attempt() -> None:
    clock = Clock()
    limiter = LoginLimiter(max_attempts=2, window_s=60, clock=clock)
    failed = limiter.reserve("10.0.0.1", "alice")
    clock.now = 1.0
    succeeded = limiter.reserve("10.0.0.1", "alice")
    assert failed and succeeded
    assert limiter.reserve("10.0.0.1", "alice") is None
    limiter.release(succeeded)  # a success does not count; the failure still does
    assert limiter.reserve("10.0.0.1", "alice") is not None
    assert limiter.reserve("10.0.0.1", "alice") is None


def test_limiter_memory_is_bounded() -> None:
    limiter = LoginLimiter(max_attempts=1, window_s=60, clock=Clock())
    for i in range(LoginLimiter.MAX_KEYS + 50):
        limiter.reserve(f"c{i}", f"a{i}")
    assert len(limiter._by_client) <= LoginLimiter.MAX_KEYS
    assert len(limiter._by_account) <= LoginLimiter.MAX_KEYS


def test_sessions_refused_until_revocations_restored(tmp_path: Path) -> None:
    creds = Credentials(tmp_path / "operators")
    creds.set_password("alice", "alice's long password")
    first = Sessions(SECRET, creds)
    kept, revoked = first.issue("alice"), first.issue("alice")
    session = first.check(revoked)
    assert session is not None
    restarted = Sessions(SECRET, creds, restored=False)
    assert restarted.check(kept) is None  # a logout it does not know of yet cannot be ruled out
    restarted.restore({session.sid: session.expires})
    assert restarted.check(kept) is not None
    assert restarted.check(revoked) is None


def test_secret_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "eye" / "session.key"
    secret = auth.load_secret(path, create=True)
    assert len(secret) >= auth.SECRET_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.load_secret(path, create=True) == secret


def test_secret_refused_when_open_short_or_missing(tmp_path: Path) -> None:
    path = tmp_path / "session.key"
    with pytest.raises(SecretError):
        auth.load_secret(path)
    path.write_text("x" * 64)
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        auth.load_secret(path)
    path.write_text("short")
    os.chmod(path, 0o600)
    with pytest.raises(SecretError, match="shorter"):
        auth.load_secret(path)
