"""Where the preflight's scripts run: a host over SSH (as the deploy reaches it), or this
machine. Checks take a runner, so unit tests hand them fakes."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Protocol

SSH_FAILED = 255  # ssh's own exit status: it could not connect or log in


@dataclass(frozen=True)
class Ran:
    """A script's exit status and output."""

    rc: int
    out: str
    err: str = ""


class ScriptRunner(Protocol):
    """Runs a bash script somewhere; ``where`` names it in findings."""

    @property
    def where(self) -> str: ...

    def run(self, script: str, timeout: float) -> Ran: ...


@dataclass(frozen=True)
class SshRunner:
    """A host as the inventory gives it: its user, key (else the SSH agent) and known_hosts
    file (else the user's, a new host's key accepted on first contact, as pyinfra does)."""

    where: str
    user: str = "root"
    key: str | None = None
    known_hosts: str | None = None

    @classmethod
    def of(cls, address: str, data: dict) -> SshRunner:
        return cls(
            address,
            str(data.get("ssh_user", "root")),
            data.get("ssh_key"),
            data.get("ssh_known_hosts_file"),
        )

    def command(self) -> list[str]:
        args = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
        if self.key:
            args += ["-i", self.key]
        if self.known_hosts:
            args += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
            args += ["-o", "StrictHostKeyChecking=yes"]
        else:
            args += ["-o", "StrictHostKeyChecking=accept-new"]
        return [*args, f"{self.user}@{self.where}", "bash -s"]

    def run(self, script: str, timeout: float) -> Ran:
        try:
            done = subprocess.run(
                self.command(), input=script, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return Ran(SSH_FAILED, "", f"no answer over SSH within {timeout:.0f} s")
        return Ran(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class LocalRunner:
    """This machine (the controller): DNS as the world sees it, and the unit tests' host."""

    where: str = "controller"

    def run(self, script: str, timeout: float) -> Ran:
        try:
            done = subprocess.run(
                ["bash", "-s"], input=script, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return Ran(124, "", f"took over {timeout:.0f} s")
        return Ran(done.returncode, done.stdout, done.stderr)
