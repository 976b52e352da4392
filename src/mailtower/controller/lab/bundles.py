"""Publish a rules directory at the lab GOC: copy it there over SSH, build and sign the bundle
on the GOC (the signing key never leaves it), publish it where the towers' monitors pull from.

    publish_at_goc(Path("my-rules"))          # version = the published one + 1; returns it

The GOC must have been deployed with ``bundles`` data (roles/goc.py; the lab's has).
"""

from __future__ import annotations

import io
import shlex
import subprocess
import tarfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from mailtower import bundles
from mailtower.controller.errors import PublishError, StepFailed

MAILTOWER = "/opt/mailtower/venv/bin/mailtower"  # in the stack's venv (roles/_common.VENV)

Say = Callable[[str], None]


# Runs a shell command on the GOC with ``stdin``; returns its stdout or raises StepFailed.
Shell = Callable[[str, bytes], str]


@dataclass(frozen=True)
class GocPaths:
    """The GOC's mailtower command, key directory and published directory."""

    mailtower: str = MAILTOWER
    key_dir: str = bundles.GOC_KEY_DIR
    publish_dir: str = bundles.GOC_PUBLISH_DIR


def ssh_shell(address: str, key: Path, known_hosts: Path, *, timeout: float = 300) -> Shell:
    """A Shell running commands as root on ``address`` (the lab's key and known hosts)."""

    def run(command: str, stdin: bytes) -> str:
        args = [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-i",
            str(key),
            f"root@{address}",
            command,
        ]
        try:
            done = subprocess.run(args, input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StepFailed(-1, f"no answer within {timeout:.0f} s") from None
        if done.returncode != 0:
            output = (done.stderr or done.stdout).decode(errors="replace").strip()
            raise StepFailed(done.returncode, output[-1500:])
        return done.stdout.decode(errors="replace").strip()

    return run


def rules_tar(rules_dir: Path) -> bytes:
    """The rule files of ``rules_dir`` (what a bundle would hold) as a tar under ``rules/``."""
    try:
        files, _ = bundles.collect(rules_dir)
    except bundles.BundleError as exc:
        raise PublishError(f"controller: {exc}") from exc
    if not files:
        raise PublishError(
            f"controller: {rules_dir} holds no rule files (expected {', '.join(bundles.SECTIONS)}"
            " directories with rule files)"
        )
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"rules/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def next_version(published: bundles.Latest | None, wanted: int | None) -> int:
    """``wanted``, or the published version + 1; refused if not newer than the published."""
    current = published.version if published else 0
    if wanted is None:
        return current + 1
    if wanted <= current:
        raise PublishError(
            f"version {wanted} is not newer than version {current} published already; "
            f"give a version above {current}, or none (then {current + 1} is used)"
        )
    return wanted


def publish_at_goc(
    rules_dir: Path,
    version: int | None = None,
    *,
    say: Say = lambda _: None,
    shell: Shell | None = None,
    host: str | None = None,
    paths: GocPaths | None = None,
) -> int:
    """Build ``rules_dir`` into a signed bundle at the GOC and publish it; return its version.

    By default the lab's GOC over SSH; ``shell`` and ``host`` reach another one.
    """
    if shell is None:
        from mailtower.controller.lab import lxc, plan

        host = host or str(plan.goc_host().address)
        shell = ssh_shell(host, lxc.ssh_key(), lxc.known_hosts())
    run: Shell = shell
    paths = paths or GocPaths()
    where = f"GOC {host or 'host'}"
    upload = rules_tar(rules_dir)

    def step(what: str, command: str, fix: str, stdin: bytes = b"") -> str:
        try:
            return run(command, stdin)
        except StepFailed as exc:
            raise PublishError(
                f"{where}: {what} failed ({exc.returncode}): {exc.output}; {fix}"
            ) from None

    say(f"{where}: copying {rules_dir} ({len(upload)} bytes)")
    work = step(
        "copying the rules",
        'set -e; work=$(mktemp -d /tmp/mailtower-publish.XXXXXX); tar -xf - -C "$work"; '
        'echo "$work"',
        "is the GOC up and reachable over SSH (invoke lab.up)?",
        upload,
    )
    try:
        latest_path = f"{paths.publish_dir}/{bundles.LATEST}"
        text = step(
            "reading what is published",
            f"if test -e {latest_path}; then cat {latest_path}; fi",
            "check the published directory on the GOC",
        )
        try:
            published = bundles.parse_latest(text.encode()) if text else None
        except bundles.MalformedBundle as exc:
            raise PublishError(
                f"{where}: {latest_path}: {exc}; move it away to publish afresh"
            ) from exc
        number = next_version(published, version)
        bundle = f"{work}/{bundles.bundle_file_name(number)}"
        mailtower = paths.mailtower
        say(f"{where}: building and signing bundle version {number}")
        step(
            f"building bundle version {number}",
            f"{mailtower} bundle build {shlex.quote(work)}/rules"
            f" --key {paths.key_dir}/signing.key --version {number} -o {shlex.quote(bundle)}",
            "fix the rules it names, or deploy the GOC with bundle keys "
            "(invoke deploy --tower lab-goc)",
        )
        say(f"{where}: publishing version {number} in {paths.publish_dir}")
        step(
            f"publishing bundle version {number}",
            f"{mailtower} bundle publish {shlex.quote(bundle)}"
            f" --pubkey {paths.key_dir}/signing.pub --dir {paths.publish_dir}",
            "see the reason above; a newer version published meanwhile needs a higher --version",
        )
    finally:
        with suppress(StepFailed):  # a leftover in /tmp does not undo the publish
            run(f"rm -rf {shlex.quote(work)}", b"")
    return number
