"""Canary samples a bundle carries: messages with the verdict its rules must give them.

``canary/<verdict>-<name>.eml`` — e.g. ``canary/virus-new-dropper.eml`` (what the new rule is
for) or ``canary/clean-newsletter.eml`` (what it must not catch). The monitor sends each one,
besides its own EICAR and clean message, to every scanner it updates before putting it back in
service; on the first scanner of a version, a sample that comes back with another verdict
rejects the bundle (mailtower.monitor.rollout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mailtower.bundles._errors import InvalidRules

SECTION = "canary"
VERDICTS = ("clean", "virus", "banned", "suspicious")
MAX_SAMPLE_BYTES = 1024 * 1024  # a canary is sent to a scanner on every update: keep it small
_NAME = re.compile(rf"({'|'.join(VERDICTS)})-[A-Za-z0-9._-]+\.eml")


@dataclass(frozen=True)
class Canary:
    name: str  # e.g. "virus-new-dropper.eml"
    expect: str  # the verdict scand must give it
    message: bytes


def canary(name: str, data: bytes) -> Canary:
    """One sample, checked; InvalidRules naming the file otherwise."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise InvalidRules(
            f"{SECTION}/{name}: a canary is named <verdict>-<name>.eml, the verdict one of "
            f"{', '.join(VERDICTS)}"
        )
    if len(data) > MAX_SAMPLE_BYTES:
        raise InvalidRules(f"{SECTION}/{name}: {len(data)} bytes; a canary is at most 1 MiB")
    if b"\n\n" not in data.replace(b"\r\n", b"\n") or b":" not in data.split(b"\n", 1)[0]:
        raise InvalidRules(f"{SECTION}/{name}: not a message (header lines, a blank line, a body)")
    return Canary(name, match.group(1), data)


def from_files(files: dict[str, bytes]) -> list[Canary]:
    """The samples among a bundle's files (by bundle name), in name order."""
    prefix = f"{SECTION}/"
    return [
        canary(name[len(prefix) :], data)
        for name, data in sorted(files.items())
        if name.startswith(prefix)
    ]


def check_directory(directory: Path) -> None:
    """Raise InvalidRules if a sample in ``directory`` (an unpacked canary/) is not one."""
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            canary(path.name, path.read_bytes())
