"""pyinfra facts of our own."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from pyinfra.api import FactBase

_SCRAM = re.compile(r"^SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)$")


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


def scram_matches(verifier: str | None, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier was made from ``password`` (RFC 5802/7677).

    Lets the deploy leave a role's password alone when it is already right, so an unchanged
    tower reports no change. (No SASLprep: the tower's passwords are ASCII.)
    """
    match = _SCRAM.match(verifier or "")
    if not match:
        return False
    iterations, salt, stored_key, _server_key = match.groups()
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hmac.compare_digest(
        base64.b64encode(hashlib.sha256(client_key).digest()).decode(), stored_key
    )
