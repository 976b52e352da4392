"""What the supervisor and its workers agree on: how many workers and their share of the
scans, the ``--worker`` argument a worker is started with, and the status lines it writes back.

A worker writes one JSON object per line to its status pipe: ``{"ready": true,
"rules_bundle": N}`` once it accepts mail, ``{"rules_bundle": N}`` after each reload (N null:
the shipped rules).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from mailtower.settings import TowerSettings

# Set by the supervisor, inherited by its workers: prometheus_client's multiprocess directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_count(settings: TowerSettings, override: int | None = None) -> int:
    """Workers to run: ``override``, else ``limits.scan_workers``, 0 meaning one per CPU."""
    wanted = override if override is not None else settings.limits.scan_workers
    return wanted or os.cpu_count() or 1


def worker_concurrency(settings: TowerSettings, workers: int) -> int:
    """One worker's share of ``limits.scan_concurrency`` (at least 1), so that the scanner as a
    whole scans about as many messages at once as the setting says."""
    return max(1, -(-settings.limits.scan_concurrency // workers))


@dataclass(frozen=True)
class WorkerSpec:
    """``--worker LISTEN_FD,STATUS_FD,PARENT_PID,CONCURRENCY``: what a worker inherits."""

    listen_fd: int
    status_fd: int
    parent_pid: int
    concurrency: int

    def arg(self) -> str:
        return f"{self.listen_fd},{self.status_fd},{self.parent_pid},{self.concurrency}"

    @classmethod
    def parse(cls, spec: str) -> WorkerSpec:
        listen_fd, status_fd, parent_pid, concurrency = (int(x) for x in spec.split(","))
        return cls(listen_fd, status_fd, parent_pid, concurrency)


def status_line(**status: object) -> bytes:
    """One status line (short: written at once, so it arrives whole)."""
    return json.dumps(status).encode() + b"\n"


def parse_status(line: bytes) -> dict[str, Any]:
    """A status line's fields; ValueError when it is not one."""
    status = json.loads(line)
    if not isinstance(status, dict):
        raise ValueError(f"not a status object: {line!r}")
    return status
