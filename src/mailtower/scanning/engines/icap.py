"""An ICAP client (RFC 3507): OPTIONS and RESPMOD, how commercial anti-virus engines plug in.

The message goes to the server as the body of an encapsulated HTTP response (RESPMOD), sent
chunked and whole, without preview, with ``Allow: 204``. Without a preview the server sees the
whole message before it answers, so there is no 100-Continue round trip to get wrong, and a
message is small next to what a preview saves on web traffic. The server answers:

- ``204`` — unmodified: clean;
- ``200`` with ``X-Infection-Found`` / ``X-Violations-Found`` / ``X-Virus-ID`` headers
  (draft-stecher-icap-subid) — infected, the headers name the threat;
- ``200`` with the content replaced (another body, or a non-2xx HTTP status) — infected, even
  without a name; ``200`` echoing the body unchanged (a server that ignores ``Allow: 204``) is
  clean;
- ``4xx`` / ``5xx`` — the server could not scan: :class:`EngineScanError`.

Sending and receiving run in one loop, so a server that answers (or starts answering) before it
has read the whole message never deadlocks against the client; every call ends within
``timeout_s``. What a server leaves unscanned (too large, a file type it skips, content sent
back before scanning) looks clean from here: the service must be set up to scan everything
first (for c-icap: ``virus_scan`` in simple mode; see docs/architecture.md).
"""

from __future__ import annotations

import re
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from mailtower.scanning.engines import Finding
from mailtower.scanning.errors import (
    EngineProtocolError,
    EngineScanError,
    EngineTimeout,
    EngineUnavailable,
)
from mailtower.settings import IcapUrl, parse_icap_url

__all__ = ["IcapEngine", "IcapUrl", "parse_icap_url"]

CHUNK_SIZE = 64 * 1024
# A 200 that changed the content but names no threat (e.g. a replacement page) still stops
# the message: this is the finding's name then.
REPLACED = "ICAP.ContentReplaced"
UNNAMED = "ICAP.UnnamedThreat"  # an infection header without a readable threat name

_MAX_HEAD = 64 * 1024  # ICAP headers plus encapsulated HTTP headers
_MAX_OPTIONS_BODY = 64 * 1024
_REPLY_SLACK = 1024 * 1024  # a replaced body may be this much longer than the message
_RECV_SIZE = 256 * 1024
_STATUS_RE = re.compile(r"^ICAP/1\.[0-9] ([0-9]{3})(?: (.*))?$")
_HTTP_STATUS_RE = re.compile(r"^HTTP/1\.[0-9] ([0-9]{3})")
_THREAT_RE = re.compile(r"Threat=([^;]*)")
_ENCAPSULATED_NAMES = {"req-hdr", "res-hdr", "req-body", "res-body", "null-body", "opt-body"}
_INFECTION_HEADERS = ("x-infection-found", "x-violations-found", "x-virus-id")
# The encapsulated request the message is the "response" to; servers log and template it.
_HTTP_REQUEST = b"GET /message.eml HTTP/1.1\r\nHost: mailtower\r\n\r\n"


# -- addresses ---------------------------------------------------------------------------------


# -- responses (pure parsing) ------------------------------------------------------------------


@dataclass(frozen=True)
class IcapResponse:
    """One ICAP response: status, headers and the encapsulated HTTP message, de-chunked."""

    status: int
    reason: str
    # (lower-case name, value); a folded header keeps its lines, joined by "\n"
    headers: tuple[tuple[str, str], ...]
    http_head: bytes = b""  # the encapsulated HTTP headers (res-hdr / req-hdr), if any
    body: bytes | None = None  # the encapsulated body; None = null-body or none at all

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        """Every value of header ``name`` (any case), in order."""
        lower = name.lower()
        return [value for key, value in self.headers if key == lower]

    @property
    def http_status(self) -> int | None:
        """The status of the encapsulated HTTP response, if the server sent one."""
        match = _HTTP_STATUS_RE.match(self.http_head.decode("latin-1"))
        return int(match.group(1)) if match else None


class ResponseParser:
    """Reads one ICAP response from bytes fed in pieces; ``feed`` returns it once complete."""

    def __init__(self, *, max_body: int, where: str = "icap"):
        self.max_body = max_body
        self.where = where
        self._buf = bytearray()
        self._pos = 0
        self._state = "head"
        self._status = 0
        self._reason = ""
        self._headers: tuple[tuple[str, str], ...] = ()
        self._encap_len = 0
        self._has_body = False
        self._http_head = b""
        self._body = bytearray()
        self._chunk_left = 0

    @property
    def started(self) -> bool:
        """Whether any byte of a response arrived."""
        return bool(self._buf) or self._state != "head"

    def feed(self, data: bytes) -> IcapResponse | None:
        """Add ``data``; the response once complete, else None; raise EngineProtocolError."""
        self._buf += data
        while True:
            step = getattr(self, f"_{self._state}")
            if not step():
                break
            if self._state == "done":
                return IcapResponse(
                    self._status,
                    self._reason,
                    self._headers,
                    self._http_head,
                    bytes(self._body) if self._has_body else None,
                )
        if self._pos > _RECV_SIZE:  # drop what was consumed, without copying every time
            del self._buf[: self._pos]
            self._pos = 0
        return None

    def _fail(self, what: str) -> EngineProtocolError:
        return EngineProtocolError(f"{self.where}: {what}")

    def _line(self) -> bytes | None:
        end = self._buf.find(b"\r\n", self._pos)
        if end < 0:
            if len(self._buf) - self._pos > _MAX_HEAD:
                raise self._fail("line too long in reply")
            return None
        line = bytes(self._buf[self._pos : end])
        self._pos = end + 2
        return line

    def _head(self) -> bool:
        start = bytes(self._buf[self._pos : self._pos + 5])
        if not b"ICAP/".startswith(start):  # junk: say so at once, not at the timeout
            raise self._fail(f"not an ICAP reply: {bytes(self._buf[:80])!r}")
        end = self._buf.find(b"\r\n\r\n", self._pos)
        if end < 0:
            if len(self._buf) - self._pos > _MAX_HEAD:
                raise self._fail("reply headers too long")
            return False
        text = self._buf[self._pos : end].decode("latin-1")
        self._pos = end + 4
        status_line, *lines = text.split("\r\n")
        match = _STATUS_RE.match(status_line)
        if not match:
            raise self._fail(f"bad status line {status_line!r}")
        self._status = int(match.group(1))
        self._reason = (match.group(2) or "").strip()
        headers: list[tuple[str, list[str]]] = []
        for line in lines:
            if line[:1] in (" ", "\t"):
                if not headers:
                    raise self._fail(f"continuation line before any header: {line!r}")
                headers[-1][1].append(line.strip())
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise self._fail(f"bad header line {line!r}")
            headers.append((name.lower(), [value.strip()]))
        self._headers = tuple((name, "\n".join(values)) for name, values in headers)
        self._read_encapsulated()
        return True

    def _read_encapsulated(self) -> None:
        values = [value for name, value in self._headers if name == "encapsulated"]
        if not values:
            if self._status == 200:
                raise self._fail("200 reply without an Encapsulated header")
            self._state = "done"  # 204, errors: RFC 3507 wants null-body=0, some omit it
            return
        entries: list[tuple[str, int]] = []
        for item in values[0].replace("\n", " ").split(","):
            name, sep, offset = item.strip().partition("=")
            if not sep or name not in _ENCAPSULATED_NAMES or not offset.isdigit():
                raise self._fail(f"bad Encapsulated header {values[0]!r}")
            entries.append((name, int(offset)))
        offsets = [offset for _, offset in entries]
        last = entries[-1][0]
        if offsets != sorted(offsets) or not last.endswith("-body") or offsets[0] != 0:
            raise self._fail(f"bad Encapsulated header {values[0]!r}")
        if offsets[-1] > _MAX_HEAD:
            raise self._fail("encapsulated headers too long")
        self._encap_len = offsets[-1]
        self._has_body = last != "null-body"
        self._state = "encap"

    def _encap(self) -> bool:
        if len(self._buf) - self._pos < self._encap_len:
            return False
        self._http_head = bytes(self._buf[self._pos : self._pos + self._encap_len])
        self._pos += self._encap_len
        self._state = "chunk_size" if self._has_body else "done"
        return True

    def _chunk_size(self) -> bool:
        line = self._line()
        if line is None:
            return False
        size_text = line.split(b";", 1)[0].strip()  # "0; ieof" after a preview
        try:
            size = int(size_text, 16)
        except ValueError:
            raise self._fail(f"bad chunk size line {line[:80]!r}") from None
        if size < 0 or len(self._body) + size > self.max_body:
            raise self._fail("reply body too long")
        self._chunk_left = size
        self._state = "chunk_data" if size else "trailer"
        return True

    def _chunk_data(self) -> bool:
        if len(self._buf) - self._pos < self._chunk_left + 2:
            return False
        end = self._pos + self._chunk_left
        if self._buf[end : end + 2] != b"\r\n":
            raise self._fail("chunk not followed by CRLF")
        self._body += self._buf[self._pos : end]
        self._pos = end + 2
        self._state = "chunk_size"
        return True

    def _trailer(self) -> bool:
        line = self._line()
        if line is None:
            return False
        if not line:
            self._state = "done"
        return True


def threats(response: IcapResponse) -> list[str]:
    """The threat names a response's infection headers give, in order, without repeats."""
    names: list[str] = []
    for value in response.all("x-infection-found"):
        names += [m.strip() for m in _THREAT_RE.findall(value)]
    for value in response.all("x-violations-found"):
        # "<count>" then four lines per violation: file name, threat, problem id, resolution.
        lines = value.split("\n")
        names += [lines[i] for i in range(2, len(lines), 4)]
    names += [v.strip() for value in response.all("x-virus-id") for v in value.split(",")]
    return list(dict.fromkeys(name for name in names if name))


def scan_result(response: IcapResponse, sent: bytes, where: str = "icap") -> list[str]:
    """What a RESPMOD response says about ``sent``: threat names, [] = clean; or raise."""
    status = response.status
    if status == 204:
        return []
    if status == 200:
        if any(response.all(name) for name in _INFECTION_HEADERS):
            return threats(response) or [UNNAMED]
        http_status = response.http_status
        unchanged = (response.body == sent) if response.body is not None else not sent
        if unchanged and (http_status is None or 200 <= http_status < 300):
            return []  # the server echoed the message: it ignores Allow: 204
        return [REPLACED]
    if 400 <= status < 600:
        raise EngineScanError(f"{where}: server answered {status} {response.reason}".rstrip())
    raise EngineProtocolError(f"{where}: unexpected status {status} {response.reason}".rstrip())


# -- the client --------------------------------------------------------------------------------


class IcapClient:
    """One ICAP service; every call opens a connection and finishes within ``timeout_s``."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, chunk_size: int = CHUNK_SIZE):
        self.url = parse_icap_url(url)
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size
        self.where = f"icap {self.url}"

    def options(self) -> IcapResponse:
        """The service's OPTIONS response (raise EngineError unless it is a 200)."""
        head = self._head("OPTIONS", "Encapsulated: null-body=0")
        response = self._exchange(iter([head]), max_body=_MAX_OPTIONS_BODY)
        if response.status != 200:
            scan_result(response, b"", self.where)  # raises for 4xx/5xx
            raise EngineProtocolError(f"{self.where}: OPTIONS answered {response.status}")
        return response

    def respmod(self, data: bytes) -> IcapResponse:
        """Send ``data`` as the body of an HTTP response; return the server's answer."""
        http_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: message/rfc822\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data)
        )
        encapsulated = (
            f"Encapsulated: req-hdr=0, res-hdr={len(_HTTP_REQUEST)}, "
            f"res-body={len(_HTTP_REQUEST) + len(http_head)}"
        )
        head = self._head("RESPMOD", "Allow: 204", encapsulated) + _HTTP_REQUEST + http_head
        return self._exchange(self._pieces(head, data), max_body=len(data) + _REPLY_SLACK)

    def scan(self, data: bytes) -> list[str]:
        """Scan ``data``; return the threat names found ([] = clean)."""
        return scan_result(self.respmod(data), data, self.where)

    # -- internals -----------------------------------------------------------------------------

    def _head(self, method: str, *headers: str) -> bytes:
        lines = [
            f"{method} {self.url} ICAP/1.0",
            f"Host: {self.url.authority}",
            "User-Agent: mailtower",
            "Connection: close",
            *headers,
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def _pieces(self, head: bytes, data: bytes) -> Iterator[bytes]:
        yield head
        view = memoryview(data)
        for start in range(0, len(view), self.chunk_size):
            chunk = view[start : start + self.chunk_size]
            yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        yield b"0\r\n\r\n"

    def _exchange(self, pieces: Iterator[bytes], *, max_body: int) -> IcapResponse:
        deadline = time.monotonic() + self.timeout_s
        parser = ResponseParser(max_body=max_body, where=self.where)
        with self._connect(deadline) as sock:
            sock.setblocking(False)
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLOUT)
            pending: bytes | memoryview | None = next(pieces)
            send_error: OSError | None = None
            while True:
                events = poller.poll(_remaining(deadline, self.where, parser) * 1000)
                if not events:
                    continue  # the deadline check above raises once time is up
                mask = events[0][1]
                if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    response = self._receive(sock, parser, send_error)
                    if response is not None:
                        return response
                if pending is not None and mask & select.POLLOUT:
                    try:
                        sent = sock.send(pending)
                    except BlockingIOError:
                        continue  # the buffer filled up again since poll() said otherwise
                    except (BrokenPipeError, ConnectionResetError) as exc:
                        # The server stopped reading (an early error reply, or it died):
                        # whatever it said is still to be read.
                        send_error, pending = exc, None
                    except OSError as exc:
                        raise EngineUnavailable(f"{self.where}: send failed: {exc}") from exc
                    else:
                        pending = memoryview(pending)[sent:] or next(pieces, None)
                    if pending is None:
                        poller.modify(sock, select.POLLIN)

    def _receive(
        self, sock: socket.socket, parser: ResponseParser, send_error: OSError | None
    ) -> IcapResponse | None:
        try:
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise EngineUnavailable(f"{self.where}: receive failed: {exc}") from exc
        if data:
            return parser.feed(data)
        if parser.started:
            raise EngineProtocolError(f"{self.where}: connection closed in the middle of a reply")
        lost = f" (while sending: {send_error})" if send_error else ""
        raise EngineUnavailable(f"{self.where}: closed the connection without reply{lost}")

    def _connect(self, deadline: float) -> socket.socket:
        try:
            return socket.create_connection(
                (self.url.host, self.url.port), timeout=_remaining(deadline, self.where)
            )
        except TimeoutError as exc:
            raise EngineTimeout(f"{self.where}: connect timed out") from exc
        except OSError as exc:
            raise EngineUnavailable(f"{self.where}: cannot connect: {exc}") from exc


def _remaining(deadline: float, where: str, parser: ResponseParser | None = None) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        part = "in the middle of the reply" if parser is not None and parser.started else ""
        raise EngineTimeout(f"{where}: no full reply within the timeout {part}".rstrip())
    return left


class IcapEngine:
    """An ICAP anti-virus service: the whole message as one RESPMOD."""

    name = "icap"

    def __init__(self, url: str, *, timeout_s: float = 30.0):
        self.client = IcapClient(url, timeout_s=timeout_s)

    def scan(self, data: bytes) -> list[Finding]:
        return [Finding(self.name, threat) for threat in self.client.scan(data)]

    def health(self, timeout_s: float) -> str:
        client = IcapClient(str(self.client.url), timeout_s=timeout_s)
        response = client.options()
        methods = (response.header("methods") or "").replace(",", " ").split()
        if "RESPMOD" not in methods:
            raise EngineProtocolError(f"{client.where}: the service does not offer RESPMOD")
        service = response.header("service") or "ICAP service"
        return f"{service} (ISTag {response.header('istag') or '?'})"
