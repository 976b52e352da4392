"""How big each host must be, per role: the one table the preflight checks and
docs/first-real-pair.md shows (a test keeps the two equal).

Figures from docs/benchmarks.md and docs/runbook.md: a scanner's clamd holds ClamAV's official
databases in 1,632 MiB (``clamav.engine_mib`` 1,700) beside a working set of 640 MiB (scand's
workers, c-icap), so 2.4 GB is the least a scanner deploys with and 4 GiB leaves the page cache
room; a relay keeps about 950 MB of deferred mail per GB of queue disk, for up to 3 days of a
customer's mail; the monitor holds the SQL pair's pgBackRest repository (two full backups and
their WAL), Prometheus' data and the signature mirrors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Profile = Literal["production", "lab"]
ROLES = ("relay", "scanners", "monitor", "sql", "goc", "goc_backup")
# The kernel and the filesystem report a little less than the size bought (a 4 GiB VM shows
# about 3.8 GiB of MemTotal; ext4 keeps its metadata): a host passes at 90 % of a figure.
TOLERANCE = 0.9
DISK_PATH = "/var"  # queues, databases, repositories and mirrors all live under /var


@dataclass(frozen=True)
class Size:
    """The least a host of one role needs."""

    cpus: int
    ram_mib: int
    disk_gib: int  # the filesystem holding /var
    why: str


SIZING: dict[Profile, dict[str, Size]] = {
    "production": {
        "relay": Size(2, 4096, 50, "Postfix queue for 3 days of mail, HAProxy"),
        "scanners": Size(
            2, 4096, 20, "clamd with the official databases (1.7 GB) + 640 MB working set"
        ),
        "monitor": Size(2, 4096, 100, "the SQL pair's backup repository, Prometheus, mirrors"),
        "sql": Size(2, 4096, 50, "PostgreSQL: customers, verdict events, the quarantine"),
        "goc": Size(2, 4096, 50, "the hub's PostgreSQL, VirusEye, cvdupdate's mirror"),
        "goc_backup": Size(1, 1024, 100, "the GOC's backup repository"),
    },
    # The lab's containers (docs/lab.md): 59 share one 2-core machine and a scanner runs on
    # ClamAV's small test database; the lab's inventories say so (host data preflight_sizing).
    "lab": {role: Size(1, 256, 2, "a lab container") for role in ROLES},
}


def size_of(profile: str, role: str) -> Size:
    return SIZING[profile if profile in SIZING else "production"][role]  # type: ignore[index]


def markdown_table(profile: Profile = "production") -> str:
    """The table as docs/first-real-pair.md shows it."""
    rows = [
        "| role | CPUs | RAM | disk (/var) | for |",
        "|---|---|---|---|---|",
    ]
    for role, size in SIZING[profile].items():
        ram = f"{size.ram_mib // 1024} GiB" if size.ram_mib >= 1024 else f"{size.ram_mib} MiB"
        rows.append(f"| {role} | {size.cpus} | {ram} | {size.disk_gib} GiB | {size.why} |")
    return "\n".join(rows)
