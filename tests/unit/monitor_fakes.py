"""In-process fakes for the monitor's tests: HAProxy's runtime API and scanner health servers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from mailtower.settings import TowerSettings, from_data

SCANNERS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # fake scanners share one port

# HAProxy 2.6 `show servers state` header (format version 1).
SERVERS_STATE_HEADER = (
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health "
    "srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord "
    "srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port"
)


class FakeHAProxy:
    """A runtime API on 127.0.0.1: records commands, keeps admin states, answers like 2.6."""

    def __init__(self, servers: dict[str, str], backend: str = "scanners") -> None:
        self.backend = backend
        self.addresses = dict(servers)  # name → address
        self.admin = dict.fromkeys(servers, 0)  # name → srv_admin_state
        self.commands: list[str] = []
        self.shutdowns: list[str] = []  # servers whose sessions were shut down
        self.scur = dict.fromkeys(servers, 0)  # name → sessions open now ("show stat")
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def table(self) -> str:
        rows = [
            f"3 {self.backend} {i + 1} {name} {addr} {0 if self.admin[name] & 1 else 2} "
            f"{self.admin[name]} 1 1 42 6 3 4 6 0 0 0 - 10024 - 0 0 - - 0"
            for i, (name, addr) in enumerate(self.addresses.items())
        ]
        return "1\n" + SERVERS_STATE_HEADER + "\n" + "\n".join(rows) + "\n\n"

    def answer(self, command: str) -> str:
        words = command.split()
        if words[:3] == ["show", "servers", "state"]:
            if len(words) > 3 and words[3] != self.backend:
                return "Can't find backend.\n\n"
            return self.table()
        if words[:2] == ["set", "server"] and len(words) == 5 and words[3] == "state":
            backend, _, name = words[2].partition("/")
            if backend != self.backend or name not in self.admin:
                return "No such server.\n\n"
            if words[4] == "maint":
                self.admin[name] |= 1
            elif words[4] == "ready":
                self.admin[name] &= ~1
            else:
                return "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n\n"
            return "\n"
        if words == ["show", "stat"]:
            head = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,status"
            rows = ["stats,FRONTEND,,,3,5,100,9,0,0,OPEN"]
            rows += [f"{self.backend},{n},0,0,{c},4,,7,0,0,UP" for n, c in self.scur.items()]
            rows.append(f"{self.backend},BACKEND,0,0,{sum(self.scur.values())},8,,9,0,0,UP")
            return head + "\n" + "\n".join(rows) + "\n\n"
        if words[:3] == ["shutdown", "sessions", "server"] and len(words) == 4:
            backend, _, name = words[3].partition("/")
            if backend != self.backend or name not in self.admin:
                return "No such server.\n\n"
            self.shutdowns.append(name)
            return "\n"
        return "Unknown command.\n\n"

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        line = (await reader.readline()).decode().strip()
        self.commands.append(line)
        writer.write(self.answer(line).encode())
        await writer.drain()
        writer.close()

    def set_commands(self) -> list[str]:
        return [c for c in self.commands if c.startswith("set ")]


class FakeHealth:
    """A scanner's /health endpoint on host:port; ``status`` is what it answers."""

    def __init__(self, host: str, port: int = 0, status: int = 200) -> None:
        self.host = host
        self.port = port
        self.status = status
        self.silent = False  # accept, never answer (a one-process scand busy with a big scan)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self._server = None

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (await reader.readline()).strip():
            pass
        if self.silent:
            await reader.read()  # until the prober gives up and closes
            writer.close()
            return
        writer.write(f"HTTP/1.0 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()


async def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Wait until ``condition()`` holds; return the seconds it took; fail naming ``what``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tower(scanner_port: int, haproxy_port: int, monitor_port: int = 0) -> TowerSettings:
    return from_data(
        {
            "name": "unit",
            "hostname": "mx.unit.test",
            "hosts": {
                "relay": "127.0.0.1",
                "monitor": "127.0.0.20",
                "sql": ["127.0.0.21", "127.0.0.22"],
                "scanners": SCANNERS,
            },
            "ports": {
                "scanner_http": scanner_port,
                "haproxy_runtime": haproxy_port,
                "monitor_http": monitor_port,
                "postgres": free_port(),  # nothing listens: the SQL check must fail, not hang
            },
            "limits": {
                "health_interval_s": 0.1,
                "health_timeout_s": 0.3,
                "fail_after": 2,
                "recover_after": 2,
            },
            "secrets": {
                k: "x" * 16 for k in ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication")
            },
        }
    )
