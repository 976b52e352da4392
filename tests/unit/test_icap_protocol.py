"""The ICAP client against a fake ICAP server: framing, replies, errors and timeouts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import ValidationError
from scand_fakes import free_port, make_settings

from mailtower.scanning.engines import Finding, from_settings
from mailtower.scanning.engines.icap import (
    REPLACED,
    UNNAMED,
    IcapClient,
    IcapEngine,
    IcapUrl,
    ResponseParser,
    parse_icap_url,
)
from mailtower.scanning.errors import (
    EngineError,
    EngineProtocolError,
    EngineScanError,
    EngineTimeout,
    EngineUnavailable,
)
from mailtower.settings import TowerSettings

# -- a fake ICAP server ------------------------------------------------------------------------


@dataclass
class Request:
    """One request as the fake read it: its head and the de-chunked encapsulated parts."""

    line: str
    headers: dict[str, str]
    encapsulated: bytes  # the encapsulated HTTP headers
    body: bytes | None
    chunk_sizes: list[int] = field(default_factory=list)


Reply = Callable[[Request], bytes]


def _read_until(conn: socket.socket, buf: bytearray, marker: bytes) -> int:
    while (at := buf.find(marker)) < 0:
        data = conn.recv(65536)
        if not data:
            raise ConnectionError("client closed")
        buf += data
    return at


def _read_exact(conn: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        data = conn.recv(65536)
        if not data:
            raise ConnectionError("client closed")
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


class FakeIcap:
    """An ICAP server on a loopback port that reads requests strictly and answers ``reply``."""

    def __init__(self) -> None:
        self.reply: Reply = lambda request: NO_CONTENT
        self.mode = "normal"  # or: hang, drip, early, early-close, stream-echo, close
        self.requests: list[Request] = []
        self.errors: list[str] = []  # framing the fake could not read
        self.read_after_reply = 0  # bytes the client still sent after an early reply
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def url(self, service: str = "avscan") -> str:
        return f"icap://127.0.0.1:{self.port}/{service}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._one(conn)
                except (ConnectionError, BrokenPipeError):
                    pass
                except AssertionError as exc:
                    self.errors.append(str(exc))

    def _read_head(self, conn: socket.socket, buf: bytearray) -> Request:
        end = _read_until(conn, buf, b"\r\n\r\n")
        line, *lines = buf[:end].decode("latin-1").split("\r\n")
        del buf[: end + 4]
        headers = {}
        for header in lines:
            name, sep, value = header.partition(":")
            assert sep, f"bad request header {header!r}"
            headers[name.strip().lower()] = value.strip()
        offsets = [item.strip().split("=") for item in headers["encapsulated"].split(",")]
        assert offsets[-1][0].endswith("-body"), offsets
        encapsulated = _read_exact(conn, buf, int(offsets[-1][1]))
        has_body = offsets[-1][0] != "null-body"
        return Request(line, headers, encapsulated, b"" if has_body else None)

    def _read_chunk(self, conn: socket.socket, buf: bytearray, request: Request) -> bool:
        """Read one chunk into ``request``; False after the last one."""
        end = _read_until(conn, buf, b"\r\n")
        size = int(buf[:end].decode("ascii"), 16)
        del buf[: end + 2]
        data = _read_exact(conn, buf, size + 2)
        assert data.endswith(b"\r\n"), "chunk not followed by CRLF"
        if size == 0:
            return False
        assert request.body is not None
        request.chunk_sizes.append(size)
        request.body += data[:-2]
        return True

    def _one(self, conn: socket.socket) -> None:
        buf = bytearray()
        request = self._read_head(conn, buf)
        if self.mode.startswith("early"):  # answer before the body was read (e.g. too large)
            self.requests.append(request)
            conn.sendall(self.reply(request))
            if self.mode == "early-close":
                return
            while data := conn.recv(65536):  # keep reading: the client decides when to stop
                self.read_after_reply += len(data)
            return
        if self.mode == "stream-echo":  # trickle: echo each chunk while the rest arrives
            conn.sendall(ECHO_HEAD)
            while True:
                before = len(request.body or b"")
                more = self._read_chunk(conn, buf, request)
                piece = (request.body or b"")[before:]
                if piece:
                    conn.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                if not more:
                    break
            conn.sendall(b"0\r\n\r\n")
            self.requests.append(request)
            return
        if request.body is not None:
            while self._read_chunk(conn, buf, request):
                pass
        self.requests.append(request)
        if self.mode == "hang":
            self._stop.wait(10)
            return
        if self.mode == "close":
            return
        reply = self.reply(request)
        if self.mode == "drip":
            for byte in reply * 100:
                if self._stop.wait(0.05):
                    return
                conn.sendall(bytes([byte]))
            return
        conn.sendall(reply)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not)
        self._sock.close()
        self._thread.join(5)
        assert not self._thread.is_alive(), "the fake ICAP server did not stop"


@pytest.fixture
def fake() -> Iterator[FakeIcap]:
    server = FakeIcap()
    yield server
    server.close()
    assert not server.errors, server.errors


# -- replies ---------------------------------------------------------------------------------

ISTAG = 'ISTag: "FAKE-1"\r\n'
NO_CONTENT = b"ICAP/1.0 204 Unmodified\r\n" + ISTAG.encode() + b"\r\n"
ECHO_HEAD = (
    b"ICAP/1.0 200 OK\r\n" + ISTAG.encode() + b"Encapsulated: res-hdr=0, res-body=19\r\n\r\n"
    b"HTTP/1.1 200 OK\r\n\r\n"
)


def _chunked(body: bytes) -> bytes:
    return (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"


def ok_reply(
    headers: str = "", http: bytes = b"HTTP/1.1 200 OK\r\n\r\n", body: bytes | None = b"page"
) -> bytes:
    """A 200 with ``headers`` (CRLF-terminated lines) and an encapsulated HTTP response."""
    encapsulated = f"res-hdr=0, {'res-body' if body is not None else 'null-body'}={len(http)}"
    return (
        f"ICAP/1.0 200 OK\r\n{ISTAG}{headers}Encapsulated: {encapsulated}\r\n\r\n".encode()
        + http
        + (_chunked(body) if body is not None else b"")
    )


def echo(request: Request) -> bytes:
    """A server that ignores Allow: 204 and returns the content unchanged."""
    return ok_reply(body=request.body)


CICAP_INFECTED = ok_reply(
    "X-Infection-Found: Type=0; Resolution=2; Threat=Mailtower.Test.EICAR.UNOFFICIAL;\r\n"
    "X-Violations-Found: 1\r\n\t-\r\n\tMailtower.Test.EICAR.UNOFFICIAL\r\n\t0\r\n\t0\r\n",
    http=b"HTTP/1.0 403 Forbidden\r\nContent-Type: text/html\r\n\r\n",
    body=b"<html>VIRUS FOUND</html>\n\0\0",
)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param(lambda r: NO_CONTENT, [], id="204"),
        pytest.param(
            lambda r: b"ICAP/1.0 204 No Content\r\nEncapsulated: null-body=0\r\n\r\n",
            [],
            id="204-null-body",
        ),
        pytest.param(echo, [], id="200-unchanged-echo"),
        pytest.param(
            lambda r: CICAP_INFECTED, ["Mailtower.Test.EICAR.UNOFFICIAL"], id="c-icap-virus"
        ),
        pytest.param(
            lambda r: ok_reply(
                "X-Violations-Found: 2\r\n\tmail.eml\r\n\tWorm.A\r\n\t7\r\n\t2\r\n"
                "\tdoc.zip\r\n\tTrojan.B\r\n\t8\r\n\t0\r\n"
            ),
            ["Worm.A", "Trojan.B"],
            id="violations-only",
        ),
        pytest.param(
            lambda r: ok_reply("X-Infection-Found: Type=0; Resolution=1; Threat=Virus.C;\r\n"),
            ["Virus.C"],
            id="infection-only",
        ),
        pytest.param(lambda r: ok_reply("X-Virus-ID: Legacy.D\r\n"), ["Legacy.D"], id="virus-id"),
        pytest.param(
            lambda r: ok_reply("X-Infection-Found: Type=0; Resolution=2;\r\n"),
            [UNNAMED],
            id="infection-without-name",
        ),
        pytest.param(lambda r: ok_reply(body=b"replaced"), [REPLACED], id="replaced-body"),
        pytest.param(lambda r: ok_reply(body=None), [REPLACED], id="body-removed"),
        pytest.param(
            lambda r: ok_reply(http=b"HTTP/1.1 403 Forbidden\r\n\r\n", body=r.body),
            [REPLACED],
            id="same-body-http-403",
        ),
    ],
)
def test_respmod_replies(fake: FakeIcap, reply: Reply, expected: list[str]) -> None:
    fake.reply = reply
    engine = IcapEngine(fake.url(), timeout_s=5)
    assert engine.scan(b"From: a@example.org\r\n\r\nhello\r\n") == [
        Finding("icap", name) for name in expected
    ]


def test_respmod_sends_the_whole_message_chunked(fake: FakeIcap) -> None:
    data = bytes(range(256)) * 1000  # 256000 bytes → 4 chunks of at most 64 KiB
    assert IcapClient(fake.url(), timeout_s=5, chunk_size=65536).scan(data) == []
    [request] = fake.requests
    assert request.line == f"RESPMOD icap://127.0.0.1:{fake.port}/avscan ICAP/1.0"
    assert request.headers["host"] == f"127.0.0.1:{fake.port}"
    assert request.headers["allow"] == "204"
    assert "preview" not in request.headers  # no preview: the server gets everything at once
    assert request.body == data
    assert request.chunk_sizes == [65536, 65536, 65536, 256000 - 3 * 65536]
    # The offsets name where each encapsulated part starts.
    offsets = dict(item.strip().split("=") for item in request.headers["encapsulated"].split(","))
    assert list(offsets) == ["req-hdr", "res-hdr", "res-body"]
    req_hdr = request.encapsulated[: int(offsets["res-hdr"])]
    res_hdr = request.encapsulated[int(offsets["res-hdr"]) :]
    assert req_hdr.startswith(b"GET ") and req_hdr.endswith(b"\r\n\r\n")
    assert res_hdr.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: 256000\r\n" in res_hdr
    assert len(request.encapsulated) == int(offsets["res-body"])


def test_respmod_empty_message(fake: FakeIcap) -> None:
    assert IcapClient(fake.url(), timeout_s=5).scan(b"") == []
    assert fake.requests[0].body == b""
    assert fake.requests[0].chunk_sizes == []


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"ICAP/1.0 500 Server Error\r\n\r\n", EngineScanError),
        (
            b"ICAP/1.0 404 ICAP Service not found\r\nEncapsulated: null-body=0\r\n\r\n",
            EngineScanError,
        ),
        (b"ICAP/1.0 400 Bad request\r\n\r\n", EngineScanError),
        (b"ICAP/1.0 100 Continue\r\n\r\n", EngineProtocolError),  # no preview was sent
        (b"ICAP/1.0 302 Found\r\n\r\n", EngineProtocolError),
    ],
)
def test_error_statuses_raise(fake: FakeIcap, reply: bytes, error: type[Exception]) -> None:
    fake.reply = lambda request: reply
    with pytest.raises(error, match=reply[9:12].decode()):
        IcapClient(fake.url(), timeout_s=5).scan(b"x")


@pytest.mark.parametrize(
    "reply",
    [
        b"HELLO\r\n",  # not ICAP at all: recognised at once, not at the timeout
        b"\x00\xff\x13garbage",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"ICAP/1.0 abc OK\r\n\r\n",
        b"ICAP/1.0 204 OK\r\nno colon here\r\n\r\n",
        b"ICAP/1.0 200 OK\r\n\r\n",  # a 200 must say what it encapsulates
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, bogus=5\r\n\r\n",
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0, res-hdr=5\r\n\r\n",
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0\r\n\r\nzz\r\n",  # bad chunk size
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0\r\n\r\n2\r\nabcd",  # chunk without CRLF
    ],
)
def test_junk_is_a_protocol_error_at_once(fake: FakeIcap, reply: bytes) -> None:
    fake.reply = lambda request: reply
    fake.mode = "early"  # answer and keep the connection open: only parsing can end the call
    started = time.monotonic()
    with pytest.raises(EngineProtocolError):
        IcapClient(fake.url(), timeout_s=30).scan(b"x")
    assert time.monotonic() - started < 10  # long before the timeout, even on a busy machine


def test_reply_cut_short_is_a_protocol_error(fake: FakeIcap) -> None:
    fake.reply = lambda request: CICAP_INFECTED[:-20]  # then the server closes
    with pytest.raises(EngineProtocolError, match="closed in the middle"):
        IcapClient(fake.url(), timeout_s=5).scan(b"x")


def test_reply_body_far_longer_than_the_message_is_refused(fake: FakeIcap) -> None:
    fake.reply = lambda request: ok_reply(body=b"z" * (2 * 1024 * 1024))
    with pytest.raises(EngineProtocolError, match="too long"):
        IcapClient(fake.url(), timeout_s=5).scan(b"x")


def test_silent_server_times_out_within_the_timeout(fake: FakeIcap) -> None:
    fake.mode = "hang"
    started = time.monotonic()
    with pytest.raises(EngineTimeout):
        IcapClient(fake.url(), timeout_s=0.5).scan(b"x")
    assert time.monotonic() - started < 2.5


def test_dripping_server_times_out_at_the_deadline(fake: FakeIcap) -> None:
    # A byte every 50 ms never trips a per-read timeout; the call's deadline must end it.
    fake.mode = "drip"
    fake.reply = lambda request: b"ICAP/1.0 200 OK\r\nX-Padding: " + b"p" * 1000
    started = time.monotonic()
    with pytest.raises(EngineTimeout):
        IcapClient(fake.url(), timeout_s=0.6).scan(b"x")
    assert time.monotonic() - started < 2.6  # the reply would take 50 s to drip through


def test_refused_is_unavailable() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(EngineUnavailable, match="cannot connect"):
        IcapClient(f"icap://127.0.0.1:{port}/avscan", timeout_s=2).scan(b"x")


def test_closed_without_reply_is_unavailable(fake: FakeIcap) -> None:
    fake.mode = "close"
    with pytest.raises(EngineUnavailable, match="without reply"):
        IcapClient(fake.url(), timeout_s=2).scan(b"x")


def test_early_error_reply_ends_the_send(fake: FakeIcap) -> None:
    # The server refuses after the headers and keeps reading: the client must take the answer
    # without first pushing all 8 MB through (and without waiting for its timeout).
    fake.mode = "early"
    fake.reply = lambda request: b"ICAP/1.0 413 Request Entity Too Large\r\n\r\n"
    data = b"a" * 8 * 1024 * 1024
    with pytest.raises(EngineScanError, match="413"):
        IcapClient(fake.url(), timeout_s=10).scan(data)
    fake.close()  # the fake counted what came after its reply until the client hung up
    assert fake.read_after_reply < len(data) // 2


def test_early_error_reply_then_close_is_an_error(fake: FakeIcap) -> None:
    fake.mode = "early-close"
    fake.reply = lambda request: b"ICAP/1.0 413 Request Entity Too Large\r\n\r\n"
    # The close may reset the connection before the reply is read: an error either way.
    with pytest.raises((EngineScanError, EngineUnavailable)):
        IcapClient(fake.url(), timeout_s=10).scan(b"a" * 8 * 1024 * 1024)


def test_server_streaming_back_while_reading_does_not_deadlock(fake: FakeIcap) -> None:
    # A trickling server writes the content back as it reads it; a client that only reads
    # after sending everything would fill both socket buffers and hang until its timeout.
    fake.mode = "stream-echo"
    data = bytes(range(256)) * 40_000  # 10 MB: far more than both socket buffers hold
    assert IcapClient(fake.url(), timeout_s=30).scan(data) == []  # a deadlock → EngineTimeout
    assert fake.requests[0].body == data


# -- OPTIONS and health -------------------------------------------------------------------------

OPTIONS_REPLY = (
    b"ICAP/1.0 200 OK\r\nMethods: RESPMOD, REQMOD\r\n"
    b"Service: C-ICAP/0.5.10 server - Antivirus service\r\n" + ISTAG.encode() + b"Preview: 1024\r\n"
    b"Allow: 204\r\nEncapsulated: null-body=0\r\n\r\n"
)


def test_options_and_health(fake: FakeIcap) -> None:
    fake.reply = lambda request: OPTIONS_REPLY
    response = IcapClient(fake.url(), timeout_s=2).options()
    assert response.header("Preview") == "1024"
    assert response.header("allow") == "204"
    assert fake.requests[0].line == f"OPTIONS icap://127.0.0.1:{fake.port}/avscan ICAP/1.0"
    assert fake.requests[0].body is None
    health = IcapEngine(fake.url()).health(1.0)
    assert health == 'C-ICAP/0.5.10 server - Antivirus service (ISTag "FAKE-1")'


def test_health_needs_respmod(fake: FakeIcap) -> None:
    fake.reply = lambda request: OPTIONS_REPLY.replace(b"RESPMOD, ", b"")
    with pytest.raises(EngineProtocolError, match="RESPMOD"):
        IcapEngine(fake.url()).health(1.0)


def test_health_of_unknown_service_is_an_error(fake: FakeIcap) -> None:
    fake.reply = lambda request: b"ICAP/1.0 404 ICAP Service not found\r\n\r\n"
    with pytest.raises(EngineError, match="404"):
        IcapEngine(fake.url("nothing")).health(1.0)


def test_health_when_down_is_unavailable() -> None:
    with pytest.raises(EngineUnavailable):
        IcapEngine(f"icap://127.0.0.1:{free_port()}/avscan").health(1.0)


# -- pure parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize("reply", [NO_CONTENT, CICAP_INFECTED, OPTIONS_REPLY, ok_reply(body=b"")])
def test_parser_byte_by_byte_equals_whole(reply: bytes) -> None:
    whole = ResponseParser(max_body=1000).feed(reply)
    assert whole is not None
    parser = ResponseParser(max_body=1000)
    results = [parser.feed(reply[i : i + 1]) for i in range(len(reply))]
    assert results[:-1] == [None] * (len(reply) - 1)
    assert results[-1] == whole


def test_parser_keeps_folded_header_lines() -> None:
    response = ResponseParser(max_body=1000).feed(CICAP_INFECTED)
    assert response is not None
    assert response.header("X-Violations-Found") == ("1\n-\nMailtower.Test.EICAR.UNOFFICIAL\n0\n0")
    assert response.http_status == 403
    assert response.body == b"<html>VIRUS FOUND</html>\n\0\0"


# -- URLs and settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("icap://127.0.0.1:1344/avscan", IcapUrl("127.0.0.1", 1344, "avscan")),
        ("icap://av.example.net:11344/srv/x", IcapUrl("av.example.net", 11344, "srv/x")),
        (
            "icap://[::1]:1344/virus_scan?mode=simple",
            IcapUrl("::1", 1344, "virus_scan?mode=simple"),
        ),
    ],
)
def test_parse_icap_url(url: str, expected: IcapUrl) -> None:
    assert parse_icap_url(url) == expected
    assert str(parse_icap_url(url)) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:1344/avscan", "must start with icap://"),
        ("127.0.0.1:1344/avscan", "must start with icap://"),
        ("icap://:1344/avscan", "names no host"),
        ("icap://127.0.0.1/avscan", "names no port"),
        ("icap://127.0.0.1:99999/avscan", "malformed"),
        ("icap://127.0.0.1:port/avscan", "malformed"),
        ("icap://127.0.0.1:1344", "names no service"),
        ("icap://127.0.0.1:1344/", "names no service"),
        ("icap://user:pw@127.0.0.1:1344/avscan", "no use for"),
    ],
)
def test_parse_icap_url_rejects(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        parse_icap_url(url)
    assert "icap://host:1344/service" in str(info.value)  # the error shows how to write it


def _settings(tmp_path: Path, **changes: object) -> TowerSettings:
    base = make_settings(tmp_path / "spool", reinject_port=free_port())
    return TowerSettings.model_validate({**base.model_dump(), **changes})


def test_settings_validate_icap_url(tmp_path: Path) -> None:
    assert _settings(tmp_path).icap_url is None
    good = _settings(tmp_path, icap_url="icap://10.201.1.101:1344/avscan")
    assert good.icap_url == "icap://10.201.1.101:1344/avscan"
    with pytest.raises(ValidationError, match=r"icap_url[\s\S]*names no port"):
        _settings(tmp_path, icap_url="icap://10.201.1.101/avscan")


def test_from_settings_builds_the_icap_engine(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, engines=["clamd", "icap"], icap_url="icap://127.0.0.1:1344/avscan"
    )
    engines = from_settings(settings, timeout_s=3)
    assert [engine.name for engine in engines] == ["clamd", "icap"]
    icap = engines[1]
    assert isinstance(icap, IcapEngine)
    assert str(icap.client.url) == "icap://127.0.0.1:1344/avscan"
    assert icap.client.timeout_s == 3


def test_the_settings_model_validates_engines(tmp_path: Path) -> None:
    """An engine list the daemon could not build is refused when the settings load (the
    inventory, the deploy), not when scand starts on 23 scanners."""
    with pytest.raises(ValidationError, match="icap_url is not set"):
        _settings(tmp_path, engines=["icap"])
    with pytest.raises(ValidationError, match=r"engines\.0[\s\S]*'clamd' or 'icap'"):
        _settings(tmp_path, engines=["sophos"])
    with pytest.raises(ValidationError, match="twice"):
        _settings(tmp_path, engines=["clamd", "clamd"])
