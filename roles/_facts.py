"""pyinfra facts of our own."""

from __future__ import annotations

from pyinfra.api import FactBase

from mailtower.goc.sync.roles import scram_matches  # one implementation of SCRAM checks


class PostgresPasswordVerifiers(FactBase):
    """Role name → stored password verifier (SCRAM-SHA-256), read on the host as postgres."""

    def requires_command(self) -> str:
        return "psql"

    def command(self) -> str:
        return (
            "cd /tmp && su postgres -c \"psql -X -q -tA -F'|' "
            "-c 'SELECT rolname, rolpassword FROM pg_authid WHERE rolpassword IS NOT NULL'\""
        )

    def process(self, output):
        return dict(line.split("|", 1) for line in output if "|" in line)


class SyncPending(FactBase):
    """What ``mailtower sync <side> --check`` says an apply would do, run as postgres.

    An empty list: in sync. Anything the check cannot answer (the tool or its settings not
    installed yet, the server down) is returned as a pending line, so the apply runs and
    reports the real error.
    """

    def command(self, side: str) -> str:
        tool = "/opt/mailtower/venv/bin/mailtower"
        config = f"/etc/mailtower/sync/{side}.json"
        return (
            f"if [ -x {tool} ] && [ -f {config} ]; then"
            f" cd /tmp && su postgres -c '{tool} sync {side} --check' 2>&1; echo \"rc=$?\";"
            f" else echo 'pending: install mailtower and {config}'; echo rc=1; fi"
        )

    def process(self, output):
        lines = [line for line in output if not line.startswith("rc=")]
        status = next((line for line in output if line.startswith("rc=")), "rc=1")
        if status == "rc=0":
            return []
        return [line.removeprefix("pending: ") for line in lines] or [status]


__all__ = ["PostgresPasswordVerifiers", "SyncPending", "scram_matches"]
