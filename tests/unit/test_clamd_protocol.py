"""The clamd client against a fake clamd: framing, replies, errors and timeouts."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from scand_fakes import FakeClamd, wait_until

from mailtower.scanning.engines import Finding
from mailtower.scanning.engines.clamd import ClamdClient, ClamdEngine, parse_address
from mailtower.scanning.errors import (
    EngineProtocolError,
    EngineScanError,
    EngineTimeout,
    EngineUnavailable,
)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeClamd]:
    clamd = FakeClamd(tmp_path / "clamd.sock")
    yield clamd
    clamd.close()


def test_instream_frames_chunks_and_terminator(fake: FakeClamd) -> None:
    data = bytes(range(256)) * 1000  # 256000 bytes → 4 chunks of at most 64 KiB
    client = ClamdClient(fake.path, timeout_s=5, chunk_size=65536)
    assert client.instream(data) == []
    assert fake.commands == [b"zINSTREAM\0"]
    assert fake.streams == [data]
    assert fake.chunk_sizes == [65536, 65536, 65536, 256000 - 3 * 65536]


def test_instream_empty_message_sends_only_terminator(fake: FakeClamd) -> None:
    assert ClamdClient(fake.path, timeout_s=5).instream(b"") == []
    assert fake.streams == [b""]
    assert fake.chunk_sizes == []


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"stream: OK\0", []),
        (b"stream: Eicar-Signature FOUND\0", ["Eicar-Signature"]),
        (b"stream: A.B FOUND\0stream: C.D FOUND\0", ["A.B", "C.D"]),  # AllMatchScan
        (b"stream: Win.Test.EICAR_HDB-1 FOUND\n", ["Win.Test.EICAR_HDB-1"]),  # n-command style
    ],
)
def test_instream_replies(fake: FakeClamd, reply: bytes, expected: list[str]) -> None:
    fake.reply = reply
    assert ClamdClient(fake.path, timeout_s=5).instream(b"x") == expected


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"INSTREAM size limit exceeded. ERROR\0", EngineScanError),
        (b"stream: Can't allocate memory ERROR\0", EngineScanError),
        (b"stream: maybe\0", EngineProtocolError),
        (b"UNKNOWN COMMAND\0", EngineProtocolError),
        (b"stream:  FOUND\0", EngineProtocolError),
        (b"\0", EngineProtocolError),
    ],
)
def test_instream_error_replies_raise(
    fake: FakeClamd, reply: bytes, error: type[Exception]
) -> None:
    fake.reply = reply
    with pytest.raises(error):
        ClamdClient(fake.path, timeout_s=5).instream(b"x")


def test_size_limit_when_clamd_closes_mid_stream(fake: FakeClamd) -> None:
    fake.reply = b"INSTREAM size limit exceeded. ERROR\0"
    fake.close_early = True
    # Closing a unix socket with unread data resets it, so the reply may be lost: either way
    # it is an error (tempfail), never clean.
    with pytest.raises((EngineScanError, EngineUnavailable)):
        ClamdClient(fake.path, timeout_s=5, chunk_size=1024).instream(b"a" * 4 * 1024 * 1024)


def test_timeout_when_clamd_never_answers(fake: FakeClamd) -> None:
    fake.hang = True
    started = time.monotonic()
    with pytest.raises(EngineTimeout):
        ClamdClient(fake.path, timeout_s=0.3).instream(b"x")
    assert time.monotonic() - started < 3


def test_missing_socket_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable):
        ClamdClient(str(tmp_path / "nothing.sock"), timeout_s=1).instream(b"x")


def test_closed_without_reply_is_unavailable(fake: FakeClamd) -> None:
    fake.reply = b""
    with pytest.raises(EngineUnavailable):
        ClamdClient(fake.path, timeout_s=2).instream(b"x")


def test_ping_version_reload(fake: FakeClamd) -> None:
    client = ClamdClient(fake.path, timeout_s=2)
    fake.reply = b"PONG\0"
    client.ping()
    fake.reply = b"ClamAV 1.4.6/27000/Wed Nov 26 10:00:00 2026\0"
    assert client.version().startswith("ClamAV 1.4.6/")
    fake.reply = b"RELOADING\0"
    client.reload()
    assert fake.commands == [b"zPING\0", b"zVERSION\0", b"zRELOAD\0"]
    fake.reply = b"NOPE\0"
    with pytest.raises(EngineProtocolError):
        client.ping()


def test_tcp_address() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        client = ClamdClient(f"127.0.0.1:{port}", timeout_s=0.3)
        with pytest.raises(EngineTimeout):  # accepted by the kernel, never answered
            client.ping()


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("/run/clamav/clamd.ctl", (socket.AF_UNIX, "/run/clamav/clamd.ctl")),
        ("10.201.1.101:3310", (socket.AF_INET, ("10.201.1.101", 3310))),
        ("localhost:3310", (socket.AF_INET, ("localhost", 3310))),
    ],
)
def test_parse_address(address: str, expected: tuple[int, object]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["clamd", "host:", ":3310", "host:port"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError):
        parse_address(address)


def test_engine_maps_names_to_findings(fake: FakeClamd) -> None:
    fake.reply = b"stream: Mailtower.Test.Marker.UNOFFICIAL FOUND\0"
    engine = ClamdEngine(fake.path, timeout_s=2)
    assert engine.scan(b"x") == [Finding("clamd", "Mailtower.Test.Marker.UNOFFICIAL")]


# -- pooled sessions (IDSESSION) ----------------------------------------------------------------


def test_engine_reuses_one_session_for_many_scans(fake: FakeClamd) -> None:
    engine = ClamdEngine(fake.path, timeout_s=2)
    for i in range(5):
        assert engine.scan(b"message %d" % i) == []
    assert fake.sessions == 1
    assert fake.commands == [b"zIDSESSION\0"] + [b"zINSTREAM\0"] * 5
    assert fake.streams == [b"message %d" % i for i in range(5)]


def test_session_closed_by_clamd_is_retried_on_a_new_one(fake: FakeClamd) -> None:
    fake.end_sessions = True  # clamd's IdleTimeout or a restart closes the pooled session
    engine = ClamdEngine(fake.path, timeout_s=2)
    fake.reply = b"stream: Mailtower.Test.Marker.UNOFFICIAL FOUND\0"
    for _ in range(3):
        assert engine.scan(b"x") == [Finding("clamd", "Mailtower.Test.Marker.UNOFFICIAL")]
    assert fake.sessions == 3


def test_session_error_reply_raises_and_drops_the_session(fake: FakeClamd) -> None:
    engine = ClamdEngine(fake.path, timeout_s=2)
    assert engine.scan(b"x") == []
    fake.reply = b"stream: Can't allocate memory ERROR\0"
    with pytest.raises(EngineScanError):
        engine.scan(b"x")
    fake.reply = b"stream: OK\0"
    assert engine.scan(b"x") == []
    assert fake.sessions == 2  # the session that saw an error was not reused


def test_session_reply_for_another_request_is_refused(fake: FakeClamd) -> None:
    engine = ClamdEngine(fake.path, timeout_s=2)
    engine.scan(b"x")
    # A reply numbered for another request is not an answer to this one, even if it says OK.
    fake.misnumber = True
    with pytest.raises(EngineProtocolError, match="session request 2"):
        engine.scan(b"x")


def test_session_timeout_is_not_retried(fake: FakeClamd) -> None:
    engine = ClamdEngine(fake.path, timeout_s=0.3)
    engine.scan(b"x")
    fake.hang = True
    started = time.monotonic()
    with pytest.raises(EngineTimeout):
        engine.scan(b"x")
    assert time.monotonic() - started < 2


def test_pool_keeps_at_most_size_idle_sessions(fake: FakeClamd) -> None:
    engine = ClamdEngine(fake.path, timeout_s=5, pool_size=2)
    sessions = [engine.client.open_session() for _ in range(4)]
    for session in sessions:
        engine.pool._give_back(session)
    assert len(engine.pool._idle) == 2
    engine.pool.close()
    assert engine.pool._idle == []


def test_idle_sessions_expire(fake: FakeClamd) -> None:
    engine = ClamdEngine(fake.path, timeout_s=2)
    engine.pool.max_idle_s = 0.0  # every idle session counts as expired
    engine.scan(b"x")
    engine.scan(b"x")
    assert fake.sessions == 2
    # The expired one was ended politely; the fake reads the END in its own thread, maybe
    # after the client has already moved on (a CI run once asserted before it had).
    wait_until(lambda: fake.commands.count(b"zEND\0") == 1, 5, "the expired session's END")


def test_concurrent_scans_share_the_pool(fake: FakeClamd) -> None:
    engine = ClamdEngine(fake.path, timeout_s=5, pool_size=4)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(engine.scan, [b"m%d" % i for i in range(200)]))
    assert results == [[]] * 200
    assert sorted(fake.streams) == sorted(b"m%d" % i for i in range(200))
    # Reused, not one per scan (sessions beyond the pool size are closed, then made again).
    assert fake.sessions < 50
