"""Helpers for scand tests: settings, free ports, a relay sink, a fake and a real clamd, and a
real c-icap."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailtower.customers.snapshot import Snapshot
from mailtower.scanning import testdata
from mailtower.settings import Limits, Ports, Secrets, TowerHosts, TowerSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def scand_argv(program: list[str], settings_path: Path) -> list[str]:
    """The command line of a scand on loopback: ``program`` (the console script, or
    ``python -m mailtower.scand``) with the settings and the test relay's addresses."""
    return [
        *program,
        "--settings",
        str(settings_path),
        "--listen",
        "127.0.0.1",
        "--host-address",
        "127.0.0.5",
    ]


def make_settings(
    spool: Path,
    *,
    reinject_port: int,
    filter_port: int | None = None,
    http_port: int | None = None,
    clamd_socket: str = "/nonexistent/clamd.ctl",
    engine_timeout_s: float = 5.0,
    postgres_port: int | None = None,
    policy_snapshot: bool = True,
    quarantine_store: Literal["sql", "directory"] = "directory",
) -> TowerSettings:
    """Settings for a tower on loopback: relay 127.0.0.1, nothing listening for SQL. The
    customers' policy snapshot is ``spool/policies.json``; with ``policy_snapshot`` an empty
    one is written there (a tower without customers), else there is none (scand answers 451).
    The quarantine is the spool's directory unless ``quarantine_store`` is "sql" (then a
    PostgreSQL at 127.0.0.3:``postgres_port`` must hold it)."""
    snapshot = spool / "policies.json"
    if policy_snapshot:
        spool.mkdir(parents=True, exist_ok=True)
        Snapshot().write(snapshot)
    return TowerSettings(
        name="tower-t",
        hostname="mx.tower-t.test",
        hosts=TowerHosts(
            relay=IPv4Address("127.0.0.1"),
            monitor=IPv4Address("127.0.0.2"),
            sql=[IPv4Address("127.0.0.3"), IPv4Address("127.0.0.4")],
            scanners=[IPv4Address("127.0.0.5")],
        ),
        ports=Ports(
            filter=filter_port or free_port(),
            reinject=reinject_port,
            scanner_http=http_port or free_port(),
            postgres=postgres_port or free_port(),
        ),
        limits=Limits(
            engine_timeout_s=engine_timeout_s,
            reinject_timeout_s=10.0,
            health_timeout_s=1.0,
            message_size_bytes=1024 * 1024,
        ),
        secrets=Secrets(
            sql_relay="r" * 16,
            sql_scanner="s" * 16,
            sql_monitor="m" * 16,
            sql_replication="p" * 16,
        ),
        clamd_socket=clamd_socket,
        spool_dir=str(spool),
        policy_snapshot=str(snapshot),
        quarantine_store=quarantine_store,
    )


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass
class SinkHandler:
    """Stands in for the relay's re-injection listener."""

    received: list[Received] = field(default_factory=list)
    refuse: str | None = None  # an SMTP reply to give instead of 250
    gate: threading.Event | None = None  # when set: hold each DATA until the gate opens
    holding: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.gate is not None:
            self.holding += 1
            await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 30)
        if self.refuse:
            return self.refuse
        self.received.append(
            Received(
                envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b""
            )
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.received):05d}"


def start_sink() -> tuple[Controller, SinkHandler, int]:
    handler = SinkHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    return controller, handler, port


# -- a fake clamd (protocol tests) -----------------------------------------------------------


class FakeClamd:
    """A clamd stand-in on a unix socket; records streams, answers ``reply`` (or hangs)."""

    def __init__(self, path: Path, reply: bytes = b"stream: OK\0"):
        self.path = str(path)
        self.reply = reply
        self.hang = False
        self.close_early = False  # close after the first chunk, like StreamMaxLength
        self.end_sessions = False  # close every session after one reply, like IdleTimeout
        self.sessions = 0  # IDSESSION connections opened
        self.misnumber = False  # number session replies wrongly (a reply to another request)
        self.streams: list[bytes] = []
        self.commands: list[bytes] = []
        self.chunk_sizes: list[int] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            # A thread per connection: pooled sessions stay open between scans.
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            self._one(conn)

    def _read_exact(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            data = conn.recv(n - len(buf))
            if not data:
                raise ConnectionError("client closed")
            buf += data
        return buf

    def _read_command(self, conn: socket.socket) -> bytes:
        command = b""
        while not command.endswith(b"\0"):
            command += self._read_exact(conn, 1)
        self.commands.append(command)
        return command

    def _one(self, conn: socket.socket) -> None:
        try:
            command = self._read_command(conn)
            if command != b"zIDSESSION\0":
                self._answer(conn, command, prefix=b"")
                return
            # A session: numbered replies until zEND or the client goes away.
            self.sessions += 1
            number = 0
            while True:
                command = self._read_command(conn)
                if command == b"zEND\0":
                    return
                number += 1
                shown = number + 1 if self.misnumber else number
                if not self._answer(conn, command, prefix=b"%d: " % shown):
                    return
                if self.end_sessions:
                    return
        except ConnectionError:
            return

    def _answer(self, conn: socket.socket, command: bytes, prefix: bytes) -> bool:
        """Answer one command; False when the connection is finished."""
        if command == b"zINSTREAM\0":
            stream = b""
            while True:
                (size,) = struct.unpack("!L", self._read_exact(conn, 4))
                if size == 0:
                    break
                self.chunk_sizes.append(size)
                stream += self._read_exact(conn, size)
                if self.close_early:
                    conn.sendall(self.reply)
                    return False
            self.streams.append(stream)
        if self.hang:
            self._stop.wait(10)
            return False
        if not self.reply:
            return False  # close without a word
        conn.sendall(prefix + self.reply)
        return True

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


# -- a real clamd (integration tests) --------------------------------------------------------


class RealClamd:
    """A private clamd with the project's test signatures, run in the foreground."""

    def __init__(
        self,
        workdir: Path,
        *,
        stream_max_length: str = "60M",
        max_threads: int = 10,
        databases: Path | None = None,
        extra_config: Sequence[str] = (),
    ):
        """``databases``: a directory of more signature files (e.g. the benchmark's generated
        ClamAV database), linked in beside the test signatures; ``extra_config``: more
        clamd.conf lines (e.g. ``ConcurrentDatabaseReload no``)."""
        self.workdir = workdir
        db = workdir / "db"
        db.mkdir(parents=True, exist_ok=True)
        self.db = db
        for name, content in testdata.clamav_signatures().items():
            (db / name).write_text(content)
        if databases is not None:
            for source in sorted(databases.iterdir()):
                if source.is_file() and not source.name.startswith("."):
                    (db / source.name).symlink_to(source.resolve())
        self.socket = workdir / "clamd.sock"
        self.config = workdir / "clamd.conf"
        self.log = workdir / "clamd.log"
        self.config.write_text(
            "\n".join(
                [
                    "Foreground yes",
                    f"LocalSocket {self.socket}",
                    f"DatabaseDirectory {db}",
                    f"LogFile {self.log}",
                    f"PidFile {workdir / 'clamd.pid'}",
                    f"TemporaryDirectory {workdir}",
                    "User root",
                    f"StreamMaxLength {stream_max_length}",
                    f"MaxThreads {max_threads}",
                    *extra_config,
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> RealClamd:
        self.proc = subprocess.Popen(
            ["/usr/sbin/clamd", "--config-file", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                log = self.log.read_text() if self.log.exists() else "(no log)"
                raise RuntimeError(f"clamd exited with {self.proc.returncode}:\n{log}")
            if self._pongs():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"clamd did not answer PING within {timeout_s}s")
            time.sleep(0.05)

    def _pongs(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(str(self.socket))
                sock.sendall(b"zPING\0")
                return sock.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- a real c-icap (integration tests of the ICAP engine) ------------------------------------


class RealCicap:
    """A private c-icap (Debian's) whose virus_scan service asks the clamd at ``clamd_socket``.

    It listens on a free loopback port and offers the service twice: ``avscan`` in simple mode
    (it answers only after the whole object was scanned — what mail needs) and plain
    ``virus_scan`` in Debian's default trickle mode (it starts sending a large object back
    before scanning it, and can then only cut it short when it finds something).
    """

    SIMPLE = "avscan"
    TRICKLE = "virus_scan"

    def __init__(self, workdir: Path, clamd_socket: Path | str):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = workdir / "c-icap.conf"
        self.log = workdir / "server.log"
        modules = next(Path("/usr/lib").glob("*/c_icap/virus_scan.so")).parent
        self.config.write_text(
            "\n".join(
                [
                    f"Port 127.0.0.1:{self.port}",
                    f"PidFile {workdir / 'c-icap.pid'}",
                    f"CommandsSocket {workdir / 'c-icap.ctl'}",
                    f"TmpDir {workdir}",  # bodies are spooled here; clamd reads them by name
                    f"ServerLog {self.log}",
                    f"AccessLog {workdir / 'access.log'}",
                    "ServerName mailtower-test",
                    "Timeout 60",
                    "StartServers 1",
                    "MaxServers 2",
                    "ThreadsPerChild 10",
                    "MinSpareThreads 2",
                    "MaxSpareThreads 10",
                    "DebugLevel 1",
                    f"ModulesDir {modules}",
                    f"ServicesDir {modules}",
                    "TemplateDir /usr/share/c_icap/templates/",
                    "TemplateDefaultLanguage en",
                    "LoadMagicFile /etc/c-icap/c-icap.magic",
                    "Module common clamd_mod.so",
                    f"clamd_mod.ClamdSocket {clamd_socket}",
                    "Service virus_scan virus_scan.so",
                    "virus_scan.DefaultEngine clamd",
                    # Types not listed pass unscanned: list every group c-icap.magic knows.
                    "virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GRAPHICS STREAM"
                    " DOCUMENT",
                    # Over MaxObjectSize an object passes unscanned (trickle) or fails (simple).
                    "virus_scan.MaxObjectSize 100M",
                    "virus_scan.PassOnError off",  # a failed scan is a 500, never a pass
                    "virus_scan.SendPercentData 5",  # Debian's defaults, for the trickle service
                    "virus_scan.StartSendPercentDataAfter 2M",
                    f"ServiceAlias {self.SIMPLE} virus_scan?allow204=on&sizelimit=off&mode=simple",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, service: str = SIMPLE) -> str:
        return f"icap://127.0.0.1:{self.port}/{service}"

    def start(self, timeout_s: float = 30.0) -> RealCicap:
        with (self.workdir / "c-icap.out").open("ab") as out:
            # Its own session: c-icap forks children, and stop() ends the whole group.
            self.proc = subprocess.Popen(
                ["/usr/bin/c-icap", "-N", "-f", str(self.config)],
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"c-icap exited with {self.proc.returncode}:\n{self.logs()}")
            if self._answers_options():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"c-icap did not answer OPTIONS within {timeout_s}s")
            time.sleep(0.05)

    def _answers_options(self) -> bool:
        request = (
            f"OPTIONS {self.url()} ICAP/1.0\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Encapsulated: null-body=0\r\n\r\n"
        ).encode()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(request)
                return sock.recv(64).startswith(b"ICAP/1.0 200")
        except OSError:
            return False

    def logs(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")
            for path in (self.workdir / "c-icap.out", self.log)
            if path.exists()
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # c-icap stops its children on TERM
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        wait_until(self._group_gone, 10, "c-icap's children to exit")

    def _group_gone(self) -> bool:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False
