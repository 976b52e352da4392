"""A hand-driven SMTP session, for what smtplib will not do: talk before the greeting, trickle
DATA, send a bare line feed. Standard library only: a check can run it on a lab host too, by
sending this file's source ahead of its script (``remote_script``)."""

from __future__ import annotations

import socket
from pathlib import Path


class RawSmtp:
    """One SMTP connection, a line at a time. A reply is read to its last line, so a multi-line
    reply ("250-…") is one reply, and so is postscreen's greeting to a client it has not seen
    yet: "220-" and the banner first, "220 " and the banner once the client has waited."""

    def __init__(self, address: str, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection((address, port), timeout)
        self.file = self.sock.makefile("rwb")
        self.lines: list[bytes] = []  # every line the server sent, in order

    def __enter__(self) -> RawSmtp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.sock.close()

    def reply(self) -> bytes:
        """The last line of the server's next reply; b"" when it closed the connection."""
        while True:
            line = self.file.readline()
            self.lines.append(line)
            if line[3:4] != b"-":
                return line

    def send(self, data: bytes) -> None:
        self.file.write(data)
        self.file.flush()

    def say(self, line: bytes) -> bytes:
        """Send one command line and read its reply."""
        self.send(line + b"\r\n")
        return self.reply()


def remote_script(script: str) -> str:
    """A python3 program for a lab host: this module, then ``script``, which may use RawSmtp."""
    source = Path(__file__).read_text()
    return f"python3 - <<'PY'\n{source}\n{script}\nPY"
