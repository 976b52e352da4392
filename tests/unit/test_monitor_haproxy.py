"""The HAProxy runtime API client against a fake runtime API server."""

from __future__ import annotations

import asyncio
import socket

import pytest
from monitor_fakes import FakeHAProxy

from mailtower.monitor.errors import HAProxyError
from mailtower.monitor.haproxy import RuntimeAPI, parse_servers_state


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parse_servers_state_reads_names_and_admin_states():
    fake = FakeHAProxy({"s01": "10.201.1.101", "s02": "10.201.1.102", "s03": "10.201.1.103"})
    fake.admin["s02"] = 1
    fake.admin["s03"] = 0x09  # forced + config maintenance
    got = {s.name: s for s in parse_servers_state(fake.table())}
    assert sorted(got) == ["s01", "s02", "s03"]
    assert got["s01"].address == "10.201.1.101"
    assert [got[n].in_maintenance for n in ("s01", "s02", "s03")] == [False, True, True]
    assert got["s03"].admin_state == 9


def test_parse_servers_state_drain_only_is_not_maintenance():
    fake = FakeHAProxy({"s01": "10.201.1.101"})
    fake.admin["s01"] = 0x10  # forced drain
    (s,) = parse_servers_state(fake.table())
    assert not s.in_maintenance


def test_parse_servers_state_rejects_an_error_answer():
    with pytest.raises(HAProxyError, match="Can't find backend"):
        parse_servers_state("Can't find backend.\n\n")


def test_client_sets_states_and_reads_them_back():
    async def scenario() -> None:
        fake = FakeHAProxy({"s01": "10.201.1.101", "s02": "10.201.1.102"})
        await fake.start()
        api = RuntimeAPI("127.0.0.1", fake.port)
        try:
            await api.set_state("s02", "maint")
            states = await api.servers_state()
            assert states["s02"].in_maintenance and not states["s01"].in_maintenance
            await api.set_state("s02", "ready")
            assert not (await api.servers_state())["s02"].in_maintenance
        finally:
            await fake.stop()
        assert fake.commands == [
            "set server scanners/s02 state maint",
            "show servers state scanners",
            "set server scanners/s02 state ready",
            "show servers state scanners",
        ]

    asyncio.run(scenario())


def test_client_raises_on_haproxy_error_text():
    async def scenario() -> None:
        fake = FakeHAProxy({"s01": "10.201.1.101"})
        await fake.start()
        try:
            with pytest.raises(HAProxyError, match="No such server"):
                await RuntimeAPI("127.0.0.1", fake.port).set_state("s09", "maint")
        finally:
            await fake.stop()

    asyncio.run(scenario())


def test_client_unreachable_names_the_relay_and_port():
    port = closed_port()
    with pytest.raises(HAProxyError, match=f"127.0.0.1:{port} unreachable"):
        asyncio.run(RuntimeAPI("127.0.0.1", port).servers_state())


def test_client_times_out_on_a_silent_server():
    async def scenario() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never answers, never closes first

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(HAProxyError, match="no answer"):
                await RuntimeAPI("127.0.0.1", port, timeout_s=0.2).servers_state()
        finally:
            server.close()

    asyncio.run(scenario())


def test_sessions_are_read_per_server_and_summed():
    async def scenario() -> None:
        fake = FakeHAProxy({"s01": "10.201.1.101", "s02": "10.201.1.102"})
        fake.scur.update(s01=2, s02=5)
        await fake.start()
        api = RuntimeAPI("127.0.0.1", fake.port)
        try:
            assert await api.server_sessions() == {"s01": 2, "s02": 5}
            assert await api.sessions() == 7  # the FRONTEND and BACKEND rows are not servers
            assert await api.server_sessions("other") == {}
        finally:
            await fake.stop()

    asyncio.run(scenario())
