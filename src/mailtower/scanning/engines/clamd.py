"""A clamd client: INSTREAM, PING, VERSION and RELOAD over a unix socket or TCP.

Protocol (clamd(8)): commands are sent ``z``-prefixed and NUL-terminated; INSTREAM data
follows as chunks, each prefixed by its length as a 4-byte big-endian integer, ended by a
zero-length chunk. clamd answers ``stream: OK``, ``stream: <Name> FOUND`` (one line per
finding with AllMatchScan) or ``<text> ERROR``, then closes the connection.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

from mailtower.scanning.engines import Finding
from mailtower.scanning.errors import (
    EngineProtocolError,
    EngineScanError,
    EngineTimeout,
    EngineUnavailable,
)

CHUNK_SIZE = 64 * 1024
_MAX_REPLY = 64 * 1024  # a reply longer than this is not clamd talking


def parse_address(address: str) -> tuple[int, str | tuple[str, int]]:
    """Socket family and address of a clamd address: ``/path/to/socket`` or ``host:port``."""
    if address.startswith("/"):
        return socket.AF_UNIX, address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"clamd address {address!r} is neither /path/to/socket nor host:port")
    return socket.AF_INET, (host.strip("[]"), int(port))


class ClamdClient:
    """One clamd daemon; every call opens a connection and finishes within ``timeout_s``."""

    def __init__(self, address: str, *, timeout_s: float = 30.0, chunk_size: int = CHUNK_SIZE):
        self.address = address
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size
        self._family, self._sockaddr = parse_address(address)

    # -- public calls ------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise EngineError unless clamd answers PONG."""
        reply = self._command(b"PING")
        if reply != "PONG":
            raise EngineProtocolError(f"clamd {self.address}: PING answered {reply!r}")

    def version(self) -> str:
        """clamd's version line, e.g. ``ClamAV 1.4.6/27000/...``."""
        reply = self._command(b"VERSION")
        if not reply.startswith("ClamAV"):
            raise EngineProtocolError(f"clamd {self.address}: VERSION answered {reply!r}")
        return reply

    def reload(self) -> None:
        """Ask clamd to reload its signature databases."""
        reply = self._command(b"RELOAD")
        if reply != "RELOADING":
            raise EngineProtocolError(f"clamd {self.address}: RELOAD answered {reply!r}")

    def instream(self, data: bytes) -> list[str]:
        """Scan ``data`` on a connection of its own; return the signatures found ([] = clean)."""
        deadline = time.monotonic() + self.timeout_s
        with self._connect(deadline) as sock:
            send_error = self._send_stream(sock, b"zINSTREAM\0", data, deadline)
            try:
                reply = self._read_reply(sock, deadline)
            except EngineUnavailable:
                if send_error is not None:
                    raise EngineUnavailable(
                        f"clamd {self.address}: connection lost while sending "
                        f"(StreamMaxLength exceeded?): {send_error}"
                    ) from send_error
                raise
        return self._parse_scan_reply(reply)

    def open_session(self) -> ClamdSession:
        """A connection in IDSESSION mode, for many INSTREAMs in a row (see ClamdPool)."""
        deadline = time.monotonic() + self.timeout_s
        sock = self._connect(deadline)
        try:
            self._send(sock, b"zIDSESSION\0", deadline)
        except OSError as exc:
            sock.close()
            raise EngineUnavailable(f"clamd {self.address}: IDSESSION failed: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return ClamdSession(self, sock)

    # -- internals ---------------------------------------------------------------------------

    def _send_stream(
        self, sock: socket.socket, command: bytes, data: bytes, deadline: float
    ) -> OSError | None:
        """Send an INSTREAM; return the error if clamd closed the stream early (else None)."""
        try:
            self._send(sock, command, deadline)
            view = memoryview(data)
            for start in range(0, len(view), self.chunk_size):
                chunk = view[start : start + self.chunk_size]
                self._send(sock, struct.pack("!L", len(chunk)) + chunk, deadline)
                if select.select([sock], [], [], 0)[0]:
                    # clamd answered mid-stream (StreamMaxLength): stop and read why,
                    # before its close resets the connection and loses the reply.
                    return ConnectionAbortedError("clamd answered before the end of the stream")
            self._send(sock, struct.pack("!L", 0), deadline)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # clamd closes the stream early when StreamMaxLength is exceeded; its reply
            # (if any) says why, so the caller reads it before giving up.
            return exc
        return None

    def _parse_scan_reply(self, reply: str) -> list[str]:
        lines = [line.strip() for line in reply.replace("\n", "\0").split("\0") if line.strip()]
        if not lines:
            raise EngineProtocolError(f"clamd {self.address}: empty reply to INSTREAM")
        found: list[str] = []
        for line in lines:
            if line.endswith(" ERROR"):
                raise EngineScanError(f"clamd {self.address}: {line}")
            _, sep, result = line.partition(": ")
            if not sep:
                raise EngineProtocolError(f"clamd {self.address}: unexpected reply {line!r}")
            if result == "OK":
                continue
            if result.endswith(" FOUND") and len(result) > len(" FOUND"):
                found.append(result[: -len(" FOUND")])
                continue
            raise EngineProtocolError(f"clamd {self.address}: unexpected reply {line!r}")
        if not found and lines[-1].rpartition(": ")[2] != "OK":
            raise EngineProtocolError(f"clamd {self.address}: unexpected reply {reply!r}")
        return found

    def _command(self, command: bytes) -> str:
        deadline = time.monotonic() + self.timeout_s
        with self._connect(deadline) as sock:
            self._send(sock, b"z" + command + b"\0", deadline)
            return self._read_reply(sock, deadline).strip("\0\n ")

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(self._sockaddr)
        except TimeoutError as exc:
            sock.close()
            raise EngineTimeout(f"clamd {self.address}: connect timed out") from exc
        except OSError as exc:
            sock.close()
            raise EngineUnavailable(f"clamd {self.address}: cannot connect: {exc}") from exc
        return sock

    def _send(self, sock: socket.socket, data: bytes | memoryview, deadline: float) -> None:
        try:
            sock.settimeout(_remaining(deadline))
            sock.sendall(data)
        except TimeoutError as exc:
            raise EngineTimeout(f"clamd {self.address}: send timed out") from exc
        except (BrokenPipeError, ConnectionResetError):
            raise
        except OSError as exc:
            raise EngineUnavailable(f"clamd {self.address}: send failed: {exc}") from exc

    def _read_reply(self, sock: socket.socket, deadline: float, *, session: bool = False) -> str:
        """Read one reply: until clamd closes (one-shot), or up to its NUL (in a session)."""
        buf = bytearray()
        while not (session and buf.endswith(b"\0")):
            try:
                sock.settimeout(_remaining(deadline))
                data = sock.recv(4096)
            except TimeoutError as exc:
                raise EngineTimeout(f"clamd {self.address}: no reply within timeout") from exc
            except OSError as exc:
                raise EngineUnavailable(f"clamd {self.address}: receive failed: {exc}") from exc
            if not data:
                break
            buf += data
            if len(buf) > _MAX_REPLY:
                raise EngineProtocolError(f"clamd {self.address}: reply too long")
        if not buf:
            raise EngineUnavailable(f"clamd {self.address}: closed the connection without reply")
        if session and not buf.endswith(b"\0"):
            raise EngineUnavailable(f"clamd {self.address}: closed the session mid-reply")
        return buf.decode("utf-8", errors="replace")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise EngineTimeout("clamd: timeout")
    return left


class ClamdSession:
    """One IDSESSION connection: replies carry the request number, ``<n>: stream: OK``."""

    def __init__(self, client: ClamdClient, sock: socket.socket):
        self.client = client
        self.sock = sock
        self.requests = 0
        self.last_used = time.monotonic()

    def instream(self, data: bytes, deadline: float) -> list[str]:
        """Scan ``data`` in this session; on any exception the session must be closed."""
        client = self.client
        self.requests += 1
        send_error = client._send_stream(self.sock, b"zINSTREAM\0", data, deadline)
        if send_error is not None:
            # clamd ends a session after a stream error; read its reason if it sent one.
            try:
                reply = client._read_reply(self.sock, deadline, session=True)
            except EngineUnavailable as exc:
                raise EngineUnavailable(
                    f"clamd {client.address}: session lost while sending: {send_error}"
                ) from exc
        else:
            reply = client._read_reply(self.sock, deadline, session=True)
        number, sep, rest = reply.partition(": ")
        if not sep or number != str(self.requests):
            # Not the answer to this request (an error line has no number): never a verdict.
            if reply.rstrip("\0 \n").endswith(" ERROR"):
                raise EngineScanError(f"clamd {client.address}: {reply.strip(chr(0))}")
            raise EngineProtocolError(
                f"clamd {client.address}: reply {reply!r} to session request {self.requests}"
            )
        self.last_used = time.monotonic()
        return client._parse_scan_reply(rest)

    def close(self) -> None:
        # A session is dropped when it may be broken: telling clamd is a courtesy.
        with contextlib.suppress(OSError):
            self.sock.settimeout(0.2)
            self.sock.sendall(b"zEND\0")
        self.sock.close()


class ClamdPool:
    """Idle clamd sessions kept for reuse, so a scan costs no connect (clamd IDSESSION).

    Sessions are taken LIFO and dropped after ``max_idle_s`` (under clamd's IdleTimeout,
    30 s by default) or after any error. A scan on a reused session that finds it closed
    by clamd (idle timeout, clamd restarted) retries once on a new session: scanning is
    idempotent, and the retry keeps within the same deadline.
    """

    def __init__(self, client: ClamdClient, *, size: int = 8, max_idle_s: float = 20.0):
        self.client = client
        self.size = size
        self.max_idle_s = max_idle_s
        self._idle: list[ClamdSession] = []
        self._lock = threading.Lock()

    def instream(self, data: bytes) -> list[str]:
        deadline = time.monotonic() + self.client.timeout_s
        session, reused = self._take()
        try:
            found = session.instream(data, deadline)
        except EngineUnavailable:
            session.close()
            if not reused:
                raise
            session = self.client.open_session()
            try:
                found = session.instream(data, deadline)
            except BaseException:
                session.close()
                raise
        except BaseException:
            session.close()
            raise
        self._give_back(session)
        return found

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for session in idle:
            session.close()

    def _take(self) -> tuple[ClamdSession, bool]:
        stale: list[ClamdSession] = []
        taken: ClamdSession | None = None
        now = time.monotonic()
        with self._lock:
            while self._idle:
                session = self._idle.pop()
                if now - session.last_used < self.max_idle_s:
                    taken = session
                    break
                stale.append(session)
        for session in stale:
            session.close()
        if taken is not None:
            return taken, True
        return self.client.open_session(), False

    def _give_back(self, session: ClamdSession) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(session)
                return
        session.close()


class ClamdEngine:
    """The clamd engine: the whole message as one INSTREAM, on pooled sessions."""

    name = "clamd"

    def __init__(self, address: str, *, timeout_s: float = 30.0, pool_size: int = 8):
        self.client = ClamdClient(address, timeout_s=timeout_s)
        self.pool = ClamdPool(self.client, size=pool_size)

    def scan(self, data: bytes) -> list[Finding]:
        return [Finding(self.name, found) for found in self.pool.instream(data)]

    def health(self, timeout_s: float) -> str:
        client = ClamdClient(self.client.address, timeout_s=timeout_s)
        client.ping()
        return client.version()
