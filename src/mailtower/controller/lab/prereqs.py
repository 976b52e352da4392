"""What the controller must have before the lab or the tests run, and which package brings it.

Every program the controller calls — to build the lab, to deploy and verify it, and in the
tests that run real servers on this machine — is listed here with the Debian package that
installs it and why it is needed. ``scripts/bootstrap`` installs the packages of
``requirements-apt.txt``; a unit test keeps the two lists in step, and ``invoke
prereqs.pristine`` proves on a freshly debootstrapped root that installing exactly that list
makes every program below appear (what a new machine would find).

Usage::

    from mailtower.controller.lab import prereqs
    prereqs.check("lab")        # raises LabError naming every missing program and its package
    prereqs.missing("tests")    # [Program, ...]
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mailtower.controller.errors import PrerequisiteError

Use = Literal["lab", "tests"]

REQUIREMENTS = Path(__file__).resolve().parents[4] / "requirements-apt.txt"


@dataclass(frozen=True)
class Program:
    """A program (or file) the controller needs, the package that brings it, and what for."""

    name: str  # a command found on PATH, or an absolute path
    package: str  # the Debian package that installs it (listed in requirements-apt.txt)
    why: str
    uses: tuple[Use, ...] = ("lab",)


PROGRAMS: tuple[Program, ...] = (
    # Building the lab's hosts (mailtower.controller.lab.lxc).
    Program("lxc-create", "lxc", "creates the lab's base container"),
    Program("lxc-copy", "lxc", "snapshot clones of the base, one per lab host"),
    Program("lxc-start", "lxc", "starts lab hosts"),
    Program("lxc-stop", "lxc", "stops lab hosts (failover tests too)"),
    Program("lxc-info", "lxc", "reads a lab host's state"),
    Program("lxc-destroy", "lxc", "removes lab hosts"),
    Program("lxc-attach", "lxc", "the fixes the lab's errors name"),
    Program(
        "/usr/share/lxc/templates/lxc-debian",
        "lxc-templates",
        "the Debian template `lxc-create -t debian` runs",
    ),
    Program("debootstrap", "debootstrap", "the Debian template builds the base root with it"),
    Program("rsync", "rsync", "the Debian template copies its cached root with it"),
    Program(
        "debian-distro-info",
        "distro-info",
        "the Debian template names bookworm's security suite with it (without it apt fails "
        "in the template's chroot and the base lacks python3)",
    ),
    Program("apt-cacher-ng", "apt-cacher-ng", "the lab hosts' only way to Debian packages"),
    Program("ip", "iproute2", "the lab bridge mtlab0"),
    Program("sysctl", "procps", "raises the inotify limits 59 containers need"),
    Program("ssh-keygen", "openssh-client", "the lab's SSH key and each host's host key"),
    Program("ssh", "openssh-client", "the fixes the lab's errors name, and operators"),
    Program("git", "git", "init refuses a secrets dir inside a git work tree (tests too)"),
    Program("nft", "nftables", "the pair tests cut a site off the lab bridge"),
    Program("psql", "postgresql-client", "verification proves pg_hba refuses outsiders"),
    Program("curl", "curl", "verification fetches the monitor's and VirusEye's pages"),
    # Real servers the unit and integration tests start on this machine.
    Program("/usr/sbin/clamd", "clamav-daemon", "real clamd for the engine tests", ("tests",)),
    Program("clamscan", "clamav", "checks ClamAV signatures in rule bundles", ("tests",)),
    Program("pgbackrest", "pgbackrest", "the backup test: backups and PITR restores", ("tests",)),
    Program(
        "sigtool",
        "clamav",
        "verifies and unpacks ClamAV databases (the signature mirror's tests)",
        ("tests",),
    ),
    Program(
        "freshclam",
        "clamav-freshclam",
        "fetches ClamAV databases from a mirror as a scanner does (tests)",
        ("tests",),
    ),
    Program(
        "apt-get",
        "apt",
        "fetches ClamAV's signed test databases from Debian's clamav source package",
        ("lab", "tests"),
    ),
    Program("/usr/bin/c-icap", "c-icap", "real ICAP server for the ICAP engine", ("tests",)),
    Program(
        "/usr/lib/*/c_icap/virus_scan.so",
        "libc-icap-mod-virus-scan",
        "c-icap's anti-virus service over clamd",
        ("tests",),
    ),
    Program("named", "bind9", "a private BIND for the DNS publication tests", ("tests",)),
    Program("named-checkconf", "bind9-utils", "checks the test BIND's config", ("tests",)),
    Program("named-checkzone", "bind9-utils", "checks generated zone files", ("tests",)),
    Program("tsig-keygen", "bind9-utils", "TSIG keys for signed DNS updates", ("tests",)),
    Program("dig", "bind9-dnsutils", "reads what the DNS server serves", ("tests",)),
    Program(
        "/usr/lib/postgresql/15/bin/initdb",
        "postgresql-15",
        "throwaway PostgreSQL clusters for the sync and VirusEye tests",
        ("tests",),
    ),
    Program(
        "/usr/sbin/postmap",
        "postfix",
        "queries the relay's SQL maps as Postfix does (recipient checks)",
        ("tests",),
    ),
    Program(
        "/usr/sbin/postconf",
        "postfix",
        "checks the relay's rendered main.cf",
        ("tests",),
    ),
    Program(
        "/usr/lib/postfix/postfix-pgsql.so",
        "postfix-pgsql",
        "Postfix's pgsql tables, for postmap -q against a test cluster",
        ("tests",),
    ),
    Program(
        "/usr/bin/prometheus-alertmanager",
        "prometheus-alertmanager",
        "the monitor's Alertmanager, run on its rendered config against two SMTP sinks",
        ("tests",),
    ),
    Program("/usr/bin/amtool", "prometheus-alertmanager", "checks alertmanager.yml", ("tests",)),
    Program("/usr/bin/promtool", "prometheus", "checks the monitor's rules", ("tests",)),
    Program("pgrep", "procps", "finds scand's worker processes", ("tests",)),
    Program("openssl", "openssl", "makes VirusEye's test certificate", ("tests",)),
    Program(
        "promtool", "prometheus", "checks and unit-tests the monitor's alert rules", ("tests",)
    ),
    Program("/usr/sbin/amavisd", "amavisd-new", "the scanner bench's reference", ("tests",)),
    Program("/usr/bin/chromium", "chromium", "VirusEye's browser test", ("tests",)),
    Program("/usr/bin/chromedriver", "chromium-driver", "drives Chromium", ("tests",)),
)


# Programs of Debian's Essential packages (bash, coreutils, util-linux): on every Debian
# system, never listed.
ESSENTIAL = frozenset({"bash", "sh", "cp", "mount", "chroot", "unshare"})


def _found(name: str, which: Callable[[str], str | None]) -> bool:
    if name.startswith("/"):
        return any(os.access(path, os.R_OK) for path in glob.glob(name))
    return which(name) is not None


def missing(
    use: Use | None = None,
    *,
    programs: Iterable[Program] = PROGRAMS,
    which: Callable[[str], str | None] = shutil.which,
) -> list[Program]:
    """The programs for ``use`` (None: all) that this machine lacks."""
    return [p for p in programs if (use is None or use in p.uses) and not _found(p.name, which)]


def apt_requirements(path: Path = REQUIREMENTS) -> list[str]:
    """The packages of requirements-apt.txt, as scripts/bootstrap reads them."""
    lines = (ln.strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def explain(absent: list[Program], listed: Iterable[str] | None = None) -> str:
    """A message naming each missing program, its package, what it is for and the fix."""
    listed = set(apt_requirements() if listed is None else listed)
    lines = [f"{len(absent)} program(s) the controller needs are missing:"]
    for p in absent:
        lines.append(f"  {p.name} (package {p.package}): {p.why}")
    unlisted = sorted({p.package for p in absent} - listed)
    if unlisted:
        lines.append(
            f"  fix: add {', '.join(unlisted)} to requirements-apt.txt (a bug of the project), "
            "then run `make bootstrap`"
        )
    else:
        lines.append("  fix: run `make bootstrap` (it installs requirements-apt.txt)")
    return "\n".join(lines)


def check(use: Use | None = None) -> None:
    """Raise PrerequisiteError naming every program for ``use`` that is missing here."""
    absent = missing(use)
    if absent:
        raise PrerequisiteError(explain(absent))
