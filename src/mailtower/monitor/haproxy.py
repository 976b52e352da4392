"""A client of HAProxy's runtime API (the relay's stats socket, exposed on TCP)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from mailtower.monitor.errors import HAProxyError
from mailtower.monitor.pool import Target

BACKEND = "scanners"
ADMIN_FORCED_MAINT = 0x01  # SRV_ADMF_FMAINT: put in maintenance by "set server … state maint"


@dataclass(frozen=True)
class ServerState:
    """One row of ``show servers state``, the columns the monitor uses."""

    name: str
    address: str
    admin_state: int

    @property
    def in_maintenance(self) -> bool:
        return bool(self.admin_state & ADMIN_FORCED_MAINT)


def parse_servers_state(text: str) -> list[ServerState]:
    """Parse the answer of ``show servers state <backend>`` (a version line, a # header, rows)."""
    header: list[str] | None = None
    servers: list[ServerState] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            header = line.lstrip("#").split()
            continue
        if header is None:
            continue  # the format version line ("1") comes before the header
        row = dict(zip(header, line.split(), strict=False))
        try:
            servers.append(
                ServerState(row["srv_name"], row.get("srv_addr", ""), int(row["srv_admin_state"]))
            )
        except (KeyError, ValueError) as exc:
            raise HAProxyError(f"unexpected row in show servers state: {line!r}") from exc
    if header is None:
        raise HAProxyError(f"show servers state gave no table: {text.strip()[:200]!r}")
    return servers


class RuntimeAPI:
    """HAProxy's runtime API at host:port; one command per connection."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 2.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    async def command(self, line: str) -> str:
        """Send one command and return everything HAProxy answers before it closes."""
        try:
            return await asyncio.wait_for(self._exchange(line), self.timeout_s)
        except TimeoutError as exc:
            raise HAProxyError(
                f"HAProxy runtime API at {self}: no answer to {line!r} within {self.timeout_s}s"
            ) from exc
        except OSError as exc:
            raise HAProxyError(
                f"HAProxy runtime API at {self} unreachable ({exc}); "
                "is HAProxy running on the relay and the port open to the monitor?"
            ) from exc

    async def _exchange(self, line: str) -> str:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            data = await reader.read()  # until EOF: HAProxy closes after one command
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return data.decode(errors="replace")

    async def set_state(self, server: str, state: Target, backend: str = BACKEND) -> None:
        """``set server <backend>/<server> state maint|ready``; raise on any error text."""
        answer = await self.command(f"set server {backend}/{server} state {state}")
        # Success is an empty answer; errors are text such as "No such server."
        if answer.strip():
            raise HAProxyError(
                f"HAProxy at {self} refused 'set server {backend}/{server} state {state}': "
                f"{answer.strip()}"
            )

    async def shutdown_sessions(self, server: str, backend: str = BACKEND) -> None:
        """Close the sessions still open to a failed server.

        A scanner host that died holds its connections open without answering; the relay
        would wait out its SMTP timeouts. Closed, they fail at once and Postfix retries the
        messages on another scanner after its backoff.
        """
        answer = await self.command(f"shutdown sessions server {backend}/{server}")
        if answer.strip():
            raise HAProxyError(
                f"HAProxy at {self} refused 'shutdown sessions server "
                f"{backend}/{server}': {answer.strip()}"
            )

    async def servers_state(self, backend: str = BACKEND) -> dict[str, ServerState]:
        """The servers of ``backend`` by name."""
        answer = await self.command(f"show servers state {backend}")
        return {s.name: s for s in parse_servers_state(answer)}

    async def sessions(self, backend: str = BACKEND) -> int:
        """Sessions open now to the backend's servers (``show stat``, column scur)."""
        return sum((await self.server_sessions(backend)).values())

    async def server_sessions(self, backend: str = BACKEND) -> dict[str, int]:
        """Sessions open now to each of the backend's servers, by name (``show stat``, scur)."""
        text = await self.command("show stat")
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            raise HAProxyError(f"HAProxy at {self}: 'show stat' answered {text[:80]!r}")
        columns = lines[0][2:].split(",")
        try:
            px, sv, scur = columns.index("pxname"), columns.index("svname"), columns.index("scur")
        except ValueError as exc:
            raise HAProxyError(f"HAProxy at {self}: 'show stat' lacks {exc}") from exc
        found: dict[str, int] = {}
        for line in lines[1:]:
            row = line.split(",")
            if len(row) > scur and row[px] == backend and row[sv] not in ("BACKEND", "FRONTEND"):
                found[row[sv]] = int(row[scur] or 0)
        return found
