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
    """A host reached exactly as pyinfra's SSH connector reaches it: its inventory name (or
    data ssh_hostname), ssh_port, ssh_user (else ssh's own default, as pyinfra's), ssh_key
    (else the SSH agent), ssh_known_hosts_file and ssh_strict_host_key_checking (pyinfra's
    default: accept-new)."""

    where: str
    user: str | None = None
    key: str | None = None
    known_hosts: str | None = None
    port: int | None = None
    strict: str = "accept-new"

    @classmethod
    def of(cls, name: str, data: dict) -> SshRunner:
        """``name``: the host's inventory name (not its tower-network address)."""
        port = data.get("ssh_port")
        return cls(
            str(data.get("ssh_hostname") or name),
            str(data["ssh_user"]) if data.get("ssh_user") else None,
            data.get("ssh_key") or None,
            data.get("ssh_known_hosts_file") or None,
            int(port) if port else None,
            str(data.get("ssh_strict_host_key_checking") or "accept-new"),
        )

    def command(self) -> list[str]:
        args = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
        if self.key:
            args += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        if self.port:
            args += ["-p", str(self.port)]
        if self.user:
            args += ["-l", self.user]
        if self.known_hosts:
            args += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        # pyinfra's values: yes, no, off (as no), accept-new
        strict = {"off": "no"}.get(self.strict, self.strict)
        args += ["-o", f"StrictHostKeyChecking={strict}"]
        return [*args, "--", self.where, "bash -s"]

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
