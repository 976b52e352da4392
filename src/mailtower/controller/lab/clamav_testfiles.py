"""ClamAV's own signed test databases, for the lab's stand-in upstream and the tests.

The lab has no internet, so the official databases cannot be fetched. ClamAV's source carries
a chain of real, officially signed test databases for freshclam's own tests:
``unit_tests/input/freshclam_testfiles/`` holds ``test-1.cvd`` … ``test-6.cvd`` (versions 1–6
of a database named ``test``) and ``test-2.cdiff`` … ``test-6.cdiff`` (each turns version N-1
into N). ``sigtool --info`` says "Verification OK" for each, with ClamAV's public key.

They are taken from Debian's source package of clamav (bookworm's main pool; the security
pool's newer source is not served), with a private apt configuration so the machine's own
sources are left alone, and cached in :data:`CACHE`.

Usage::

    from mailtower.controller.lab import clamav_testfiles
    d = clamav_testfiles.ensure(progress)   # Path holding test-N.cvd and test-N.cdiff
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from mailtower.controller.errors import LabError

CACHE = Path("/var/cache/mailtower/clamav-testfiles")
VERSIONS = range(1, 7)  # test-1.cvd … test-6.cvd
MEMBER_DIR = "unit_tests/input/freshclam_testfiles/"
SOURCES = """Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def expected_names() -> list[str]:
    return [f"test-{n}.cvd" for n in VERSIONS] + [f"test-{n}.cdiff" for n in VERSIONS if n > 1]


def complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in expected_names())


def ensure(progress: Callable[[str], None] = lambda _: None, cache: Path = CACHE) -> Path:
    """The directory of ClamAV's signed test databases; fetched once, then cached."""
    if complete(cache):
        return cache
    progress("fetching ClamAV's signed test databases from Debian's clamav source package")
    with tempfile.TemporaryDirectory(prefix="mt-clamav-src-") as tmp:
        work = Path(tmp)
        (work / "parts").mkdir()
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "parts" / "clamav-src.sources").write_text(SOURCES)
        apt = [
            "apt-get",
            "-q",
            "-o",
            "Dir::Etc::SourceList=/dev/null",
            "-o",
            f"Dir::Etc::SourceParts={work / 'parts'}",
            "-o",
            f"Dir::State::Lists={work / 'lists'}",
            "-o",
            "APT::Sandbox::User=root",
        ]
        for args in (["update"], ["source", "--download-only", "clamav"]):
            done = subprocess.run(
                [*apt, *args], cwd=work, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise LabError(
                    "controller",
                    f"`apt-get {' '.join(args)}` for clamav's source (rc {done.returncode})",
                    "the machine must reach deb.debian.org's bookworm main pool (source packages)",
                    done.stderr,
                )
        origs = sorted(work.glob("clamav_*.orig.tar.*"))
        if not origs:
            raise LabError(
                "controller",
                "finding the .orig tarball of Debian's clamav source package",
                "check what `apt-get source clamav` fetches",
                f"found {[p.name for p in work.iterdir()]}",
            )
        staging = work / "out"
        staging.mkdir()
        with tarfile.open(origs[-1]) as tar:
            for member in tar:
                if not member.isfile() or MEMBER_DIR not in member.name:
                    continue
                name = member.name.rsplit("/", 1)[-1]
                if name not in expected_names():
                    continue
                source = tar.extractfile(member)
                assert source is not None
                (staging / name).write_bytes(source.read())
        if not complete(staging):
            missing = sorted(set(expected_names()) - {p.name for p in staging.iterdir()})
            raise LabError(
                "controller",
                f"taking ClamAV's test databases from {origs[-1].name}",
                "pin a clamav source version that has unit_tests/input/freshclam_testfiles",
                f"missing {missing}",
            )
        cache.parent.mkdir(parents=True, exist_ok=True)
        if cache.exists():
            shutil.rmtree(cache)
        shutil.copytree(staging, cache)
    progress(f"ClamAV's test databases cached in {cache}")
    return cache
