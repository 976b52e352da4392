"""The backup repository's metrics for Prometheus: ``pgbackrest info --output=json`` and the
newest archived WAL segment, as a node-exporter textfile (``*.prom``).

Run on a repository host by the ``mailtower-backup-metrics`` timer (roles/backup.py), as
user pgbackrest; the alerts ``BackupTooOld``, ``WalArchivingStalled`` and
``BackupRepositoryError`` read it (templates/monitor/etc/prometheus/rules/backup.yml).

Standard library only, and no other module of mailtower: the deploy uploads this file as a
script, since a repository host (the GOC's) may have no mailtower venv.

    python3 backup_metrics.py --repo-path /var/lib/pgbackrest --output /run/x/backup.prom
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

PGBACKREST = "/usr/bin/pgbackrest"
PREFIX = "mailtower_backup"


@dataclass(frozen=True)
class StanzaInfo:
    """One stanza of ``pgbackrest info``: what the alerts need."""

    name: str
    status_code: int  # pgBackRest's: 0 ok, 1 missing stanza path, 2 no valid backups, …
    status_message: str
    last_full: float  # epoch seconds the newest full backup ended (0: none)
    last_backup: float  # the newest backup of any type (full, diff, incr)
    counts: Mapping[str, int]  # backups by type
    archive_segment: str | None  # the newest archived WAL segment's path in the repository,
    # relative to its archive directory, as a glob (None: nothing archived)


def parse(text: str) -> list[StanzaInfo]:
    """``pgbackrest info --output=json`` (every stanza of the repository). ValueError when it
    is not that."""
    every = json.loads(text)
    if not isinstance(every, list):
        raise ValueError(f"pgbackrest info: a list expected, got {type(every).__name__}")
    found = []
    for entry in every:
        sets = [b for b in entry.get("backup", []) if not b.get("error", False)]

        def newest(kinds: tuple[str, ...], sets: list = sets) -> float:
            stops = [float(b["timestamp"]["stop"]) for b in sets if b["type"] in kinds]
            return max(stops, default=0.0)

        counts: dict[str, int] = {"full": 0, "diff": 0, "incr": 0}
        for b in sets:
            counts[b["type"]] = counts.get(b["type"], 0) + 1
        segment = None
        archives = [a for a in entry.get("archive", []) if a.get("max")]
        if archives:
            # The current database's archive is the last (after an upgrade, older ones stay).
            current = archives[-1]
            wal = current["max"]
            segment = f"{entry['name']}/{current['id']}/{wal[:16]}/{wal}-*"
        status = entry.get("status", {})
        found.append(
            StanzaInfo(
                name=entry["name"],
                status_code=int(status.get("code", -1)),
                status_message=str(status.get("message", "")),
                last_full=newest(("full",)),
                last_backup=newest(("full", "diff", "incr")),
                counts=counts,
                archive_segment=segment,
            )
        )
    return found


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stanzas: list[StanzaInfo] | None, now: float, archived_at: Mapping[str, float]) -> str:
    """The textfile: ``stanzas`` None when ``pgbackrest info`` failed (up 0, nothing else);
    ``archived_at``: the newest segment's push time by stanza (0 or missing: none)."""
    lines = [
        f"# HELP {PREFIX}_metrics_timestamp_seconds When these metrics were written.",
        f"# TYPE {PREFIX}_metrics_timestamp_seconds gauge",
        f"{PREFIX}_metrics_timestamp_seconds {now:.0f}",
        f"# HELP {PREFIX}_info_up 1 if pgbackrest info answered and was read.",
        f"# TYPE {PREFIX}_info_up gauge",
        f"{PREFIX}_info_up {0 if stanzas is None else 1}",
    ]
    if not stanzas:
        return "\n".join(lines) + "\n"
    metrics = [
        ("status_code", "pgBackRest's stanza status (0: ok).", lambda s: s.status_code),
        (
            "last_full_timestamp_seconds",
            "End of the newest full backup (0: none).",
            lambda s: s.last_full,
        ),
        (
            "last_timestamp_seconds",
            "End of the newest backup of any type (0: none).",
            lambda s: s.last_backup,
        ),
        (
            "archive_last_push_timestamp_seconds",
            "When the newest archived WAL segment reached the repository (0: none).",
            lambda s: archived_at.get(s.name, 0.0),
        ),
    ]
    for name, help_text, value in metrics:
        lines += [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} gauge"]
        for s in stanzas:
            lines.append(f'{PREFIX}_{name}{{stanza="{_label(s.name)}"}} {value(s):.0f}')
    lines += [f"# HELP {PREFIX}_sets Backups held, by type.", f"# TYPE {PREFIX}_sets gauge"]
    for s in stanzas:
        for kind, count in sorted(s.counts.items()):
            lines.append(f'{PREFIX}_sets{{stanza="{_label(s.name)}",type="{kind}"}} {count}')
    return "\n".join(lines) + "\n"


def archived_times(stanzas: list[StanzaInfo], repo_path: str) -> dict[str, float]:
    """The modification time of each stanza's newest archived segment in the repository."""
    times = {}
    for s in stanzas:
        if s.archive_segment is None:
            continue
        paths = glob.glob(os.path.join(repo_path, "archive", s.archive_segment))
        times[s.name] = max((os.stat(p).st_mtime for p in paths), default=0.0)
    return times


def _pgbackrest(binary: str, *args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=timeout, check=True, cwd="/tmp"
    )
    return done.stdout


def probe(binary: str, stanzas: list[StanzaInfo], times: dict[str, float], after_s: float) -> bool:
    """``pgbackrest check`` for each stanza whose newest segment is older than ``after_s``: it
    writes a restore point and switches the segment, so a quiet database archives too, and
    only a failing archive-push leaves the segment old (WalArchivingStalled). True if any ran."""
    ran = False
    for s in stanzas:
        if time.time() - times.get(s.name, 0.0) <= after_s:
            continue
        ran = True
        try:
            _pgbackrest(binary, f"--stanza={s.name}", "check", timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or getattr(exc, "stdout", "") or exc
            print(f"backup metrics: pgbackrest check of {s.name} failed: {detail}", file=sys.stderr)
    return ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo-path", default="/var/lib/pgbackrest")
    parser.add_argument("--output", required=True, help="the .prom file (written whole)")
    parser.add_argument("--pgbackrest", default=PGBACKREST)
    parser.add_argument(
        "--probe-after",
        type=float,
        default=0,
        help="seconds: `pgbackrest check` a stanza whose newest segment is older (0: never)",
    )
    args = parser.parse_args(argv)
    stanzas: list[StanzaInfo] | None
    try:
        stanzas = parse(_pgbackrest(args.pgbackrest, "--output=json", "info"))
        times = archived_times(stanzas, args.repo_path)
        if args.probe_after and probe(args.pgbackrest, stanzas, times, args.probe_after):
            times = archived_times(stanzas, args.repo_path)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        print(f"backup metrics: pgbackrest info failed: {exc}", file=sys.stderr)
        stanzas, times = None, {}
    text = render(stanzas, time.time(), times)
    tmp = f"{args.output}.tmp"
    with open(tmp, "w") as out:
        out.write(text)
    os.replace(tmp, args.output)
    # 0 either way: a failed info is published (info_up 0) for the alert, not left unwritten.
    return 0


if __name__ == "__main__":
    sys.exit(main())
