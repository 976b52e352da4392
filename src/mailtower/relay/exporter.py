"""mailtower-relay-exporter: the relay's Postfix queue sizes and spool free space."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mailtower import settings as settings_mod

log = logging.getLogger("mailtower.relay.exporter")

SPOOL = Path("/var/spool/postfix")
QUEUES = ("incoming", "active", "deferred", "hold", "maildrop")


def count_files(path: Path) -> int:
    """Regular files under ``path``, recursively (Postfix hashes queue files into subfolders)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += count_files(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total += 1
        except FileNotFoundError:  # Postfix moved or removed it while we counted
            continue
    return total


class QueueCollector(Collector):
    """Counts the queues at scrape time: a few scandir calls, no file is opened."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily(
            "mailtower_relay_queue_messages", "Messages in a Postfix queue", labels=["queue"]
        )
        for queue in QUEUES:
            queued.add_metric([queue], count_files(self.spool / queue))
        yield queued
        st = os.statvfs(self.spool)
        yield GaugeMetricFamily(
            "mailtower_relay_queue_free_bytes",
            "Free bytes for unprivileged users on the Postfix spool's file system",
            value=st.f_bavail * st.f_frsize,
        )


def registry(spool: Path) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(QueueCollector(spool))
    return reg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailtower-relay-exporter", description=__doc__)
    parser.add_argument("--settings", type=Path, default=settings_mod.SETTINGS_PATH)
    parser.add_argument("--spool", type=Path, default=SPOOL)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
    )
    try:
        tower = settings_mod.load(args.settings)
    except settings_mod.SettingsError as exc:
        log.error("event=settings_error error=%r", str(exc))
        return 2
    port = tower.ports.relay_exporter
    server, thread = start_http_server(port, addr="0.0.0.0", registry=registry(args.spool))
    log.info("event=start port=%d spool=%s", port, args.spool)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    thread.join()
    log.info("event=stop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
