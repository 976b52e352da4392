"""Prove the project installs everything it calls, the way a new machine would find out.

A machine where earlier sessions installed things by hand hides a missing install step. This
check starts from a freshly debootstrapped Debian 12 root (minbase: less than any new machine
has), runs the project's own ``scripts/bootstrap --apt-only`` in it, and then looks for every
program of ``mailtower.controller.lab.prereqs.PROGRAMS`` inside that root. A program the
project calls that requirements-apt.txt does not bring is reported with its package.

The minbase root is built once (debootstrap through the lab's apt proxy, about a minute) and
kept under /var/cache/mailtower; each check works on an overlay of it in a private mount
namespace, so nothing it installs survives the check and nothing touches this machine's own
packages.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from mailtower.controller.errors import LabError
from mailtower.controller.lab import plan, prereqs
from mailtower.controller.lab.lxc import Progress

CACHE = Path("/var/cache/mailtower/pristine-bookworm-minbase")
MIRROR = "http://deb.debian.org/debian"
SOURCES = (
    "deb http://deb.debian.org/debian bookworm main\n"
    "deb http://deb.debian.org/debian bookworm-updates main\n"
    "deb http://deb.debian.org/debian-security bookworm-security main\n"
)
PATH_DIRS = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")
REPO = Path(__file__).resolve().parents[4]


def _proxy() -> str:
    return f"http://{plan.HOST_ADDRESS}:{plan.APT_PROXY_PORT}"


def ensure_minbase(progress: Progress, cache: Path = CACHE) -> Path:
    """The cached minbase root, debootstrapped through the apt proxy on first use."""
    if (cache / "usr/bin/apt-get").exists():
        return cache
    shutil.rmtree(cache, ignore_errors=True)  # a half-built one is no base
    cache.parent.mkdir(parents=True, exist_ok=True)
    progress(f"pristine: debootstrap --variant=minbase bookworm into {cache} (once, ~1 min)")
    started = time.monotonic()
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    done = subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", str(partial), MIRROR],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "http_proxy": _proxy()},
    )
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise LabError(
            "controller",
            "debootstrap the pristine root",
            f"check the apt proxy ({_proxy()}) reaches Debian's mirror, then retry",
            (done.stderr or done.stdout)[-800:],
        )
    partial.rename(cache)
    progress(f"pristine: minbase root built in {time.monotonic() - started:.0f} s")
    return cache


def _script(root: Path) -> str:
    """The shell run in a private mount namespace: overlay, mounts, chroot, bootstrap."""
    lower, upper, work, merged = (root / d for d in ("lower", "upper", "work", "merged"))
    return f"""set -eu
mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} {merged}
mount -t proc proc {merged}/proc
mount -t sysfs sys {merged}/sys
mount --rbind /dev {merged}/dev
mkdir -p {merged}/opt/mailtower/scripts
cp {REPO}/scripts/bootstrap {merged}/opt/mailtower/scripts/
cp {REPO}/requirements-apt.txt {merged}/opt/mailtower/
printf 'Acquire::http::Proxy "{_proxy()}";\\nAcquire::Retries "5";\\n' \
    > {merged}/etc/apt/apt.conf.d/01mailtower-proxy
printf '{SOURCES}' > {merged}/etc/apt/sources.list
# No service starts in the chroot (Debian's policy-rc.d convention).
printf '#!/bin/sh\\nexit 101\\n' > {merged}/usr/sbin/policy-rc.d
chmod +x {merged}/usr/sbin/policy-rc.d
cp /etc/resolv.conf {merged}/etc/resolv.conf
chroot {merged} env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root /opt/mailtower/scripts/bootstrap --apt-only
{probe(merged)}"""


def probe(root: Path, programs: Iterable[prereqs.Program] = prereqs.PROGRAMS) -> str:
    """Shell that prints ``program NAME yes|no`` for each program, looked for inside ``root``
    only (names are quoted: a pattern must not match this machine's own files)."""
    names = " ".join(shlex.quote(name) for name in sorted({p.name for p in programs}))
    return f"""for p in {names}; do
    found=no
    case "$p" in
        /*) for f in {shlex.quote(str(root))}$p; do [ -e "$f" ] && found=yes; done ;;
        *) for d in {" ".join(PATH_DIRS)}; do
               [ -x {shlex.quote(str(root))}/"$d/$p" ] && found=yes
           done ;;
    esac
    echo "program $p $found"
done
"""


def found_programs(output: str) -> set[str]:
    """The names ``probe``'s output says were found."""
    return {
        fields[1]
        for fields in (line.split() for line in output.splitlines())
        if fields[:1] == ["program"] and fields[2:] == ["yes"]
    }


def check(progress: Progress, cache: Path = CACHE) -> list[prereqs.Program]:
    """Install requirements-apt.txt into an overlay of the pristine root with the project's
    bootstrap; return the programs of prereqs.PROGRAMS still missing there."""
    base = ensure_minbase(progress, cache)
    with tempfile.TemporaryDirectory(prefix="mailtower-pristine-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        for d in ("upper", "work", "merged"):
            (root / d).mkdir()
        (root / "lower").symlink_to(base)
        progress(
            f"pristine: installing {len(prereqs.apt_requirements())} packages of "
            "requirements-apt.txt with scripts/bootstrap --apt-only (a few minutes)"
        )
        started = time.monotonic()
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", _script(root)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise LabError(
                "pristine root",
                "scripts/bootstrap --apt-only",
                "the project's bootstrap fails on a new machine: read its output above and "
                "mend requirements-apt.txt or scripts/bootstrap",
                (done.stdout + done.stderr)[-1500:],
            )
        progress(f"pristine: bootstrap done in {time.monotonic() - started:.0f} s")
    found = found_programs(done.stdout)
    return [p for p in prereqs.PROGRAMS if p.name not in found]
