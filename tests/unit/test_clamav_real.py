"""scand's ClamAV apply with the real freshclam (the scanner role's freshclam.conf) against a
mirror served over HTTP, and a real clamd that must load the databases (ClamAV's officially
signed test databases: test-N.cvd and test-N.cdiff, database "test")."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest
from clamav_rig import clamav_settings, paths
from needs import missing
from scand_fakes import RealClamd

from mailtower.clamavdb import live_versions
from mailtower.scand import clamav_apply
from mailtower.scand.errors import ClamavApplyError

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def testfiles() -> Path:
    from mailtower.controller.lab import clamav_testfiles

    if not shutil.which("freshclam") or not Path("/usr/sbin/clamd").exists():
        missing("freshclam and clamd (clamav-freshclam, clamav-daemon)")
    return clamav_testfiles.ensure()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    served = tmp_path / "mirror" / "official"
    served.mkdir(parents=True)
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path / "mirror"))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield served, httpd.server_address[1]
    httpd.shutdown()


def publish(served: Path, testfiles: Path, version: int) -> None:
    shutil.copyfile(testfiles / f"test-{version}.cvd", served / "test.cvd")
    for k in range(2, version + 1):
        shutil.copyfile(testfiles / f"test-{k}.cdiff", served / f"test-{k}.cdiff")


def test_real_freshclam_stages_and_real_clamd_reloads(
    tmp_path: Path, testfiles: Path, mirror: tuple[Path, int]
) -> None:
    served, port = mirror
    clamd = RealClamd(tmp_path / "clamd")
    live = tmp_path / "clamd" / "db"
    settings = clamav_settings(tmp_path, ["test"], clamd_socket=str(clamd.socket))
    settings = settings.model_copy(
        update={
            "engines": ["clamd"],
            "clamav_db_dir": str(live),
            "ports": settings.ports.model_copy(update={"mirror_http": port}),
            "hosts": settings.hosts.model_copy(update={"monitor": "127.0.0.1"}),
        }
    )
    p = paths(tmp_path)
    p = clamav_apply.Paths(live, p.staged, p.previous, p.freshclam_conf, "freshclam")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(ROOT / "templates")), undefined=jinja2.StrictUndefined
    )
    conf = env.get_template("scanner/etc/mailtower/freshclam.conf.j2").render(settings=settings)
    conf = conf.replace(str(clamav_apply.STAGED_DIR), str(p.staged))
    conf = conf.replace("DatabaseOwner mailtower", "DatabaseOwner root")  # tests run as root
    p.freshclam_conf.write_text(conf)
    clamd.start()
    try:
        publish(served, testfiles, 3)
        done = clamav_apply.apply(settings, {"test": 3}, paths=p, reload_timeout_s=60)
        assert (done.versions, done.reloaded) == ({"test": 3}, True)
        assert (live / "test.cvd").exists()
        # Version 5 through the CDIFFs 4..5: freshclam writes test.cld, the .cvd leaves.
        publish(served, testfiles, 5)
        done = clamav_apply.apply(settings, {"test": 5}, paths=p, reload_timeout_s=60)
        assert done.versions == {"test": 5}
        assert sorted(x.name for x in live.glob("test.*")) == ["test.cld"]
        assert live_versions(p.previous) == {"test": 3}
        # Version 6 served without its CDIFF (a refused chain): freshclam alone gives up on
        # the missing test-6.cdiff (seen in the lab); apply has it fetch the whole signed CVD.
        for cdiff in served.glob("test-*.cdiff"):
            cdiff.unlink()
        shutil.copyfile(testfiles / "test-6.cvd", served / "test.cvd")
        done = clamav_apply.apply(settings, {"test": 6}, paths=p, reload_timeout_s=60)
        assert done.versions == {"test": 6}
        assert sorted(x.name for x in live.glob("test.*")) == ["test.cvd"]
        assert live_versions(p.previous) == {"test": 5}
        # The mirror says 6 but the monitor asks for 7: refused, nothing changes.
        with pytest.raises(ClamavApplyError, match="test: asked 7, staged 6"):
            clamav_apply.apply(settings, {"test": 7}, paths=p, reload_timeout_s=60)
        # Rollback: the kept test.cld (5) back, test.cvd gone, clamd probed with it.
        done = clamav_apply.rollback(settings, paths=p, reload_timeout_s=60)
        assert done.versions == {"test": 5}
        assert sorted(x.name for x in live.glob("test.*")) == ["test.cld"]
        assert clamd.proc is not None and clamd.proc.poll() is None
    finally:
        clamd.stop()
