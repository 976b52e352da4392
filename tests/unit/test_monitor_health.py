"""The health probe: 200 is healthy, everything else is a failure."""

from __future__ import annotations

import asyncio
import socket

from monitor_fakes import FakeHealth

from mailtower.monitor.health import check_detail, probe


def probe_fake(status: int) -> bool:
    async def scenario() -> bool:
        fake = FakeHealth("127.0.0.1", status=status)
        await fake.start()
        try:
            return await probe("127.0.0.1", fake.port, 1.0)
        finally:
            await fake.stop()

    return asyncio.run(scenario())


def test_200_is_healthy():
    assert probe_fake(200) is True


def test_503_is_a_failure():
    assert probe_fake(503) is False


def test_refused_is_a_failure():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert asyncio.run(probe("127.0.0.1", port, 1.0)) is False


def test_silence_is_a_failure_within_the_timeout():
    async def scenario() -> tuple[bool, float]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            return await probe("127.0.0.1", port, 0.2), loop.time() - start
        finally:
            server.close()

    ok, took = asyncio.run(scenario())
    assert ok is False
    assert took < 1.0


def test_silence_and_refusal_are_told_apart():
    async def scenario() -> tuple[tuple, tuple]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            quiet = await check_detail("127.0.0.1", port, 0.2)
        finally:
            server.close()
            await server.wait_closed()
        return quiet, await check_detail("127.0.0.1", port, 0.2)

    quiet, refused = asyncio.run(scenario())
    assert quiet == (False, {}, True)
    assert refused == (False, {}, False)


def test_garbage_is_a_failure():
    async def scenario() -> bool:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-OpenSSH\r\n")
            writer.close()

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await probe("127.0.0.1", port, 1.0)
        finally:
            server.close()

    assert asyncio.run(scenario()) is False
