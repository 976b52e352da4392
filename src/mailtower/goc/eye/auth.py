"""Operators' logins: scrypt password hashes in a credentials file, HMAC-signed session cookies.

The credentials file has one operator a line, ``name:scrypt$<n>$<r>$<p>$<salt>$<hash>``
(base64 salt and hash), ``#`` comments allowed; it is re-read when it changes, so adding an
operator needs no restart. Sessions are stateless signed tokens that also carry a fingerprint
of the operator's password hash (changing a password or removing an operator ends their
sessions) and a random session id (logout revokes it until it would have expired anyway; the
revocation is kept in the GOC database, eye/revocations.py, so a restart does not undo it).
Login attempts are counted before the password is checked (``LoginLimiter``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailtower._fsio import write_durable
from mailtower.goc.eye.errors import CredentialsError, SecretError

USERNAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# scrypt cost: 32 MiB and ~0.1 s per attempt here, far beyond what a guessing run can afford.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_MAX_N = 2**20  # a hash asking for more is refused rather than allowed to exhaust memory
SECRET_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A self-describing scrypt hash of ``password`` with a fresh random salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32
    )
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant time in the comparison)."""
    try:
        scheme, n_text, r_text, p_text, salt_text, digest_text = encoded.split("$")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt, want = _unb64(salt_text), _unb64(digest_text)
    except (ValueError, binascii.Error):
        return False
    if scheme != "scrypt" or not (1 < n <= _MAX_N) or r < 1 or p < 1 or not want:
        return False
    got = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * n * r * p, dklen=len(want)
    )
    return hmac.compare_digest(got, want)


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the name is unknown: a wrong name costs as long as a wrong password."""
    return hash_password(secrets.token_hex(16))


def parse_credentials(text: str, source: str = "credentials") -> dict[str, str]:
    """``{name: encoded hash}`` from the file's text."""
    operators: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        if not sep or not USERNAME.match(name) or not encoded.startswith("scrypt$"):
            raise CredentialsError(f"{source}:{number}: expected name:scrypt$…")
        operators[name] = encoded
    return operators


class Credentials:
    """The operators' credentials file, re-read whenever its modification time changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._operators: dict[str, str] = {}

    def operators(self) -> dict[str, str]:
        with self._lock:
            try:
                st = self.path.stat()
                stamp = (st.st_mtime, st.st_size)
                if stamp != self._stamp:
                    self._operators = parse_credentials(self.path.read_text(), str(self.path))
                    self._stamp = stamp
            except OSError as exc:
                raise CredentialsError(f"{self.path}: {exc.strerror or exc}") from exc
            return dict(self._operators)

    def check(self, name: str, password: str) -> bool:
        """Whether ``name``/``password`` is an operator's login (blocking: ~0.1 s of scrypt)."""
        encoded = self.operators().get(name)
        ok = verify_password(password, encoded or _dummy_hash())
        return ok and encoded is not None

    def fingerprint(self, name: str) -> str | None:
        """A short digest of the operator's stored hash; None when there is no such operator."""
        encoded = self.operators().get(name)
        if encoded is None:
            return None
        return hashlib.sha256(encoded.encode()).hexdigest()[:16]

    def set_password(self, name: str, password: str) -> None:
        """Add ``name`` or replace their password (the file is rewritten atomically, 0600)."""
        if not USERNAME.match(name):
            raise CredentialsError(f"operator name {name!r}: use letters, digits, . _ - (≤64)")
        self._rewrite(name, hash_password(password))

    def remove(self, name: str) -> bool:
        """Remove ``name``; whether they were there."""
        if name not in self._read_existing():
            return False
        self._rewrite(name, None)
        return True

    def _read_existing(self) -> dict[str, str]:
        try:
            return parse_credentials(self.path.read_text(), str(self.path))
        except FileNotFoundError:
            return {}

    def _rewrite(self, name: str, encoded: str | None) -> None:
        operators = self._read_existing()
        if encoded is None:
            operators.pop(name, None)
        else:
            operators[name] = encoded
        lines = ["# VirusEye operators (mailtower-eye operator add|remove): name:scrypt hash"]
        lines += [f"{n}:{h}" for n, h in sorted(operators.items())]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_durable(self.path, ("\n".join(lines) + "\n").encode())
        os.chmod(self.path, 0o600)


def load_secret(path: Path, *, create: bool = False) -> bytes:
    """The session-signing secret; with ``create``, a missing file is made (0600, random)."""
    path = Path(path)
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(SECRET_BYTES) + "\n")
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise SecretError(f"{path}: {exc.strerror or exc}") from exc
    if st.st_mode & 0o007:
        raise SecretError(f"{path}: open to others (mode {st.st_mode & 0o777:o}); chmod 600")
    secret = text.encode()
    if len(secret) < SECRET_BYTES:
        raise SecretError(f"{path}: shorter than {SECRET_BYTES} characters")
    return secret


@dataclass(frozen=True)
class Session:
    """A logged-in operator."""

    user: str
    sid: str
    expires: int  # unix time


class Sessions:
    """Issues and checks signed session tokens."""

    def __init__(
        self,
        secret: bytes,
        credentials: Credentials,
        *,
        lifetime_s: int = 12 * 3600,
        restored: bool = True,
    ):
        self._secret = secret
        self.credentials = credentials
        self.lifetime_s = lifetime_s
        self._revoked: dict[str, int] = {}  # sid → expiry (kept only until then)
        # False until restore() has the revocations a store kept: until then no token is
        # accepted, since one logged out before a restart cannot be told from one that was not.
        self.restored = restored

    def restore(self, revoked: dict[str, int]) -> None:
        """Add revocations kept across restarts (revocations.RevocationStore.load)."""
        self._revoked.update(revoked)
        self.restored = True

    def issue(self, user: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        payload = {
            "u": user,
            "sid": secrets.token_hex(16),
            "exp": int(now) + self.lifetime_s,
            "pw": self.credentials.fingerprint(user),
        }
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self._sign(body)}"

    def check(self, token: str | None, now: float | None = None) -> Session | None:
        """The session ``token`` stands for, or None (bad signature, expired, revoked, stale)."""
        if not self.restored or not token or token.count(".") != 1:
            return None
        body, signature = token.split(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            payload = json.loads(_unb64(body))
            user, sid, expires, pw = payload["u"], payload["sid"], payload["exp"], payload["pw"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        now = time.time() if now is None else now
        if not isinstance(expires, int) or expires <= now or sid in self._revoked:
            return None
        try:
            current = self.credentials.fingerprint(user)
        except CredentialsError:
            return None  # fail closed: an unreadable file logs everybody out
        if current is None or current != pw:
            return None
        return Session(user=str(user), sid=str(sid), expires=expires)

    def revoke(self, session: Session, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._revoked = {s: e for s, e in self._revoked.items() if e > now}
        self._revoked[session.sid] = session.expires

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())


class LoginLimiter:
    """Login attempts allowed per client address and per account name, in a sliding window.

    An attempt is counted when it is *reserved*, before its password is checked, so a burst of
    parallel requests cannot all be checked while the count still reads low: ``reserve`` checks
    both limits and records the attempt in both in one step (under a lock, with no await in
    between). A success or an attempt that was never checked gives its reservation back
    (``release``); failures keep theirs until they leave the window. Per account as well as
    per address, so guessing one operator's password from many addresses gets no further.
    """

    MAX_KEYS = 10_000  # per table: bounds memory under a spray of addresses or names

    def __init__(
        self,
        max_attempts: int = 5,
        window_s: float = 300.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_attempts = max_attempts
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._by_client: dict[str, deque[float]] = {}
        self._by_account: dict[str, deque[float]] = {}

    def reserve(self, client: str, account: str) -> Attempt | None:
        """Count one attempt by ``client`` at ``account``; None when either is at its limit."""
        account = account[:64]
        with self._lock:
            now = self.clock()
            by_client = self._recent(self._by_client, client, now)
            by_account = self._recent(self._by_account, account, now)
            if len(by_client) >= self.max_attempts or len(by_account) >= self.max_attempts:
                return None
            by_client.append(now)
            by_account.append(now)
            self._bound(self._by_client)
            self._bound(self._by_account)
            return Attempt(client, account, now)

    def release(self, attempt: Attempt) -> None:
        """Give back ``attempt``'s place: it succeeded, or its password was never checked."""
        with self._lock:
            for table, key in (
                (self._by_client, attempt.client),
                (self._by_account, attempt.account),
            ):
                recent = table.get(key)
                if recent is None:
                    continue
                with contextlib.suppress(ValueError):
                    recent.remove(attempt.at)
                if not recent:
                    del table[key]

    def _recent(self, table: dict[str, deque[float]], key: str, now: float) -> deque[float]:
        recent = table.setdefault(key, deque())
        while recent and recent[0] <= now - self.window_s:
            recent.popleft()
        return recent

    def _bound(self, table: dict[str, deque[float]]) -> None:
        if len(table) > self.MAX_KEYS:
            stalest = min(table, key=lambda k: table[k][-1] if table[k] else float("-inf"))
            del table[stalest]


@dataclass(frozen=True)
class Attempt:
    """One reserved login attempt (LoginLimiter.reserve)."""

    client: str
    account: str
    at: float
