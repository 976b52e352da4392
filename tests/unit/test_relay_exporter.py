"""The relay exporter counts Postfix queue files in a spool."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from mailtower.relay.exporter import QUEUES, count_files, registry
from mailtower.settings import from_data


def make_spool(root: Path, counts: dict[str, int]) -> None:
    for queue in QUEUES:
        (root / queue).mkdir(parents=True)
    for queue, n in counts.items():
        for i in range(n):
            # Postfix hashes queue files into one-letter subfolders (hash_queue_depth).
            sub = root / queue / "ABCDEF"[i % 3] / "0123"[i % 2]
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{queue}{i:05X}").write_bytes(b"x")


def test_count_files_is_recursive_and_ignores_folders(tmp_path: Path):
    make_spool(tmp_path, {"deferred": 7})
    (tmp_path / "deferred" / "empty-dir").mkdir()
    assert count_files(tmp_path / "deferred") == 7
    assert count_files(tmp_path / "active") == 0
    assert count_files(tmp_path / "missing") == 0


def test_metrics_per_queue_and_free_bytes(tmp_path: Path):
    make_spool(tmp_path, {"incoming": 1, "active": 2, "deferred": 5, "hold": 3})
    text = generate_latest(registry(tmp_path)).decode()
    for queue, n in {"incoming": 1, "active": 2, "deferred": 5, "hold": 3, "maildrop": 0}.items():
        assert f'mailtower_relay_queue_messages{{queue="{queue}"}} {float(n)}' in text
    (line,) = [x for x in text.splitlines() if x.startswith("mailtower_relay_queue_free_bytes ")]
    assert float(line.split()[1]) > 0


def test_counts_are_taken_at_scrape_time(tmp_path: Path):
    make_spool(tmp_path, {})
    reg = registry(tmp_path)
    assert 'queue="deferred"} 0.0' in generate_latest(reg).decode()
    (tmp_path / "deferred" / "A1B2C3").write_bytes(b"x")
    assert 'queue="deferred"} 1.0' in generate_latest(reg).decode()


def test_main_serves_metrics_and_stops_on_sigterm(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = from_data(
        {
            "name": "unit",
            "hostname": "mx.unit.test",
            "hosts": {
                "relay": "127.0.0.1",
                "monitor": "127.0.0.20",
                "sql": ["127.0.0.21", "127.0.0.22"],
                "scanners": ["127.0.0.2"],
            },
            "ports": {"relay_exporter": port},
            "secrets": {
                k: "x" * 16 for k in ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication")
            },
        }
    )
    (tmp_path / "tower.json").write_text(settings.model_dump_json())
    spool = tmp_path / "spool"
    make_spool(spool, {"hold": 2})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailtower.relay.exporter",
            "--settings",
            str(tmp_path / "tower.json"),
            "--spool",
            str(spool),
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        assert 'mailtower_relay_queue_messages{queue="hold"} 2.0' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _certificate(path: Path, names: tuple[str, ...], days: int) -> datetime:
    """A chain (leaf, then its issuer) in ``path``; the leaf's end."""
    from mailtower.controller.lab import ca

    issuer_key, key = ca.new_key(), ca.new_key()
    issuer = ca.issue("Test CA", issuer_key, ca=True, days=3650)
    leaf = ca.issue(names[0], key, (issuer, issuer_key), names=names, days=days)
    path.write_bytes(ca.cert_pem(leaf, issuer))
    return leaf.not_valid_after_utc


def _not_after(text: str) -> dict[str, float]:
    found = re.findall(
        r'^mailtower_tls_certificate_not_after_seconds\{names="([^"]*)"\} (\S+)$', text, re.M
    )
    return {names: float(value) for names, value in found}


def test_the_certificate_expiry_is_the_leafs(tmp_path: Path):
    make_spool(tmp_path / "spool", {})
    cert = tmp_path / "relay.crt"
    end = _certificate(cert, ("mx.tower-a.lab", "mx2.tower-a.lab"), days=30)
    text = generate_latest(registry(tmp_path / "spool", cert)).decode()
    # the leaf's end, not its issuer's (ten years)
    assert _not_after(text) == {"mx.tower-a.lab,mx2.tower-a.lab": end.timestamp()}


def test_a_renewed_certificate_shows_at_the_next_scrape(tmp_path: Path):
    make_spool(tmp_path / "spool", {})
    cert = tmp_path / "relay.crt"
    _certificate(cert, ("mx.tower-a.lab",), days=10)
    reg = registry(tmp_path / "spool", cert)
    first = _not_after(generate_latest(reg).decode())["mx.tower-a.lab"]
    later = _certificate(cert, ("mx.tower-a.lab",), days=90)
    second = _not_after(generate_latest(reg).decode())["mx.tower-a.lab"]
    assert second == later.timestamp() and second - first > 79 * 86400


@pytest.mark.parametrize("content", [None, b"not a certificate\n"], ids=["missing", "garbage"])
def test_an_unreadable_certificate_exports_no_expiry(tmp_path: Path, content, caplog):
    make_spool(tmp_path / "spool", {})
    cert = tmp_path / "relay.crt"
    if content is not None:
        cert.write_bytes(content)
    text = generate_latest(registry(tmp_path / "spool", cert)).decode()
    assert _not_after(text) == {}
    assert "mailtower_relay_queue_free_bytes" in text  # the rest is still exported
    assert "event=certificate_unreadable" in caplog.text
