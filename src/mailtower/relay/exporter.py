"""mailtower-relay-exporter: the relay's Postfix queue sizes, spool free space and the expiry
of its TLS certificate."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mailtower import settings as settings_mod

log = logging.getLogger("mailtower.relay.exporter")

SPOOL = Path("/var/spool/postfix")
QUEUES = ("incoming", "active", "deferred", "hold", "maildrop")
# The chain the relay's Postfix serves (its first certificate is the relay's), put there by
# the deploy (roles/relay.py), readable by all.
CERTIFICATE = Path("/etc/mailtower/tls/relay.crt")


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


class CertificateCollector(Collector):
    """When the relay's certificate ends, read at scrape time: a renewed certificate shows at
    once, without a restart. Nothing is exported when the file cannot be read or parsed (the
    error is logged), so the alert on the metric's absence fires rather than a stale value."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mailtower_tls_certificate_not_after_seconds",
            "When the relay's STARTTLS certificate expires (Unix time), and the names it covers",
            labels=["names"],
        )
        try:
            leaf = x509.load_pem_x509_certificates(self.path.read_bytes())[0]
        except (OSError, ValueError, IndexError) as exc:
            log.error("event=certificate_unreadable path=%s error=%r", self.path, str(exc))
        else:
            try:
                san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                names = ",".join(san.value.get_values_for_type(x509.DNSName))
            except x509.ExtensionNotFound:
                names = ""
            family.add_metric([names], leaf.not_valid_after_utc.timestamp())
        yield family


def registry(spool: Path, certificate: Path = CERTIFICATE) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(QueueCollector(spool))
    reg.register(CertificateCollector(certificate))
    return reg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailtower-relay-exporter", description=__doc__)
    parser.add_argument("--settings", type=Path, default=settings_mod.SETTINGS_PATH)
    parser.add_argument("--spool", type=Path, default=SPOOL)
    parser.add_argument("--certificate", type=Path, default=CERTIFICATE)
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
    server, thread = start_http_server(
        port, addr="0.0.0.0", registry=registry(args.spool, args.certificate)
    )
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
