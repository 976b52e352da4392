"""The engines (clamd, c-icap) restarted only in the monitor's windows (issue 19): what they
start with is part of scand's installed digest, and the refresh before scand starts restarts
them only when that changed, waits until they answer, and records it."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from mailtower.scand import engines, stack


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    conf = [tmp_path / "clamd.conf", tmp_path / "c-icap.conf", tmp_path / "engines-packages"]
    conf[0].write_text("LocalSocket /run/clamav/clamd.ctl\n")
    conf[1].write_text("Port 127.0.0.1:1344\n")
    return conf  # the packages record is absent: no upgrade yet


class Systemctl:
    """systemctl as the refresh calls it: ``enabled`` units, a restart that may fail."""

    def __init__(self, enabled: Sequence[str], restart_rc: int = 0) -> None:
        self.enabled = set(enabled)
        self.restart_rc = restart_rc
        self.restarts: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        if argv[1] == "is-enabled":
            return subprocess.CompletedProcess(argv, 0 if argv[-1] in self.enabled else 1)
        assert argv[1] == "restart", argv
        self.restarts.append(argv[2:])
        return subprocess.CompletedProcess(argv, self.restart_rc, "", "Job failed")


def test_digest_follows_each_file_and_counts_an_absent_one(files: list[Path]) -> None:
    first = engines.digest(files)
    assert engines.digest(files) == first
    files[2].write_text("clamav-daemon 1.0.7+dfsg-1~deb12u1\n")  # an upgrade recorded
    upgraded = engines.digest(files)
    assert upgraded != first
    files[0].write_text("LocalSocket /run/clamav/clamd.ctl\nMaxThreads 8\n")
    assert engines.digest(files) not in (first, upgraded)


def test_scands_installed_digest_names_the_engines(files: list[Path], tmp_path: Path) -> None:
    settings, unit = tmp_path / "tower.json", tmp_path / "unit"
    settings.write_text("{}")
    unit.write_text("[Service]\n")
    before = stack.digest(settings, unit, files)
    if before is None:
        pytest.skip("mailtower is not installed as a distribution here")
    files[1].write_text("Port 127.0.0.1:1345\n")  # only c-icap's configuration changed
    assert stack.digest(settings, unit, files) != before


def test_refresh_restarts_enabled_engines_once_per_change(files, tmp_path) -> None:
    applied = tmp_path / "state" / "applied"
    systemctl = Systemctl(enabled=["clamav-daemon.service"])  # no local c-icap
    waited: list[tuple] = []

    def refresh() -> bool:
        return engines.refresh(
            "/run/clamav/clamd.ctl",
            None,
            files=files,
            applied=applied,
            run=systemctl,
            ready=lambda *a: waited.append(a),
        )

    assert refresh() is True  # nothing recorded yet: what runs is unknown
    assert systemctl.restarts == [["clamav-daemon.service"]]
    assert waited == [("/run/clamav/clamd.ctl", None, engines.READY_TIMEOUT_S)]
    assert applied.read_text().strip() == engines.digest(files)
    assert refresh() is False  # scand restarted again (a crash, a new wheel): engines stay
    assert len(systemctl.restarts) == 1
    files[0].write_text("LocalSocket /run/clamav/clamd.ctl\nMaxThreads 8\n")
    assert refresh() is True
    assert len(systemctl.restarts) == 2


def test_refresh_that_fails_records_nothing_and_names_where_to_look(files, tmp_path) -> None:
    applied = tmp_path / "applied"
    systemctl = Systemctl(enabled=["clamav-daemon.service", "c-icap.service"], restart_rc=1)
    with pytest.raises(engines.EnginesError, match="journalctl -u clamav-daemon"):
        engines.refresh(None, None, files=files, applied=applied, run=systemctl, ready=None)
    assert systemctl.restarts == [["clamav-daemon.service", "c-icap.service"]]

    def never_ready(*_: object) -> None:
        raise engines.EnginesError("clamd did not answer PING")

    with pytest.raises(engines.EnginesError):
        engines.refresh(
            "/x",
            None,
            files=files,
            applied=applied,
            run=Systemctl(["clamav-daemon.service"]),
            ready=never_ready,
        )
    assert not applied.exists()  # the next start of scand tries again


def test_wait_ready_pings_clamd_and_connects_to_icap(tmp_path: Path) -> None:
    path = str(tmp_path / "clamd.sock")
    clamd = socket.socket(socket.AF_UNIX)
    clamd.bind(path)
    clamd.listen()
    icap = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = clamd.accept()
        with conn:
            assert conn.recv(64).startswith(b"zPING")
            conn.sendall(b"PONG\0")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    engines.wait_ready(path, icap.getsockname()[:2], 10)
    t.join(5)
    clamd.close()
    icap.close()


def test_wait_ready_gives_up_naming_the_engine(tmp_path: Path) -> None:
    with pytest.raises(engines.EnginesError, match=r"clamd .* did not answer PING within 1s"):
        engines.wait_ready(str(tmp_path / "absent.sock"), None, 1)
    port = socket.create_server(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    with pytest.raises(engines.EnginesError, match="journalctl -u c-icap"):
        engines.wait_ready(None, ("127.0.0.1", free), 1)


def test_refresh_waits_only_for_the_engines_it_restarted(files, tmp_path) -> None:
    waited: list[tuple] = []
    engines.refresh(
        "/run/clamav/clamd.ctl",
        ("127.0.0.1", 1344),
        files=files,
        applied=tmp_path / "applied",
        run=Systemctl(enabled=["clamav-daemon.service"]),  # c-icap not enabled yet
        ready=lambda *a: waited.append(a),
    )
    assert waited == [("/run/clamav/clamd.ctl", None, engines.READY_TIMEOUT_S)]
