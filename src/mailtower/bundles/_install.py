"""Installed bundles on a scanner: a rules root holding each kept version and a ``current``
link that scand loads from.

Layout of the rules root::

    versions/<N>/        an unpacked bundle (manifest.json, manifest.sig, yara/, skeptic/, …)
    current -> versions/<N>
    state.json           what was done last: {"current", "previous", "action", "at"}
    .lock                held while the root changes (one install or rollback at a time)

An install verifies the bundle (signature, hashes, newer than ``current``), unpacks it beside
the others, loads its rules as scand would, and only then replaces ``current`` by renaming a
new link over it: a reader sees the old version or the new one, never a half. The version
before is kept for ``rollback``; older ones are removed. ``current`` is the truth;
``state.json`` is the record of it for people and tools.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mailtower._fsio import fsync_dir, write_durable
from mailtower.bundles._bundle import read, unpack
from mailtower.bundles._check import check_rules
from mailtower.bundles._errors import BundleError, InstallError
from mailtower.bundles._format import MANIFEST_NAME, Manifest, utc_timestamp
from mailtower.scanning.rules import RuleDirs

CURRENT = "current"
VERSIONS = "versions"
STATE = "state.json"
LOCK = ".lock"
SHIPPED = 0  # BundleChange.version after a rollback to the rules shipped in the package


@dataclass(frozen=True)
class Installed:
    """The bundle ``current`` points at."""

    version: int
    path: Path  # versions/<N>, resolved


@dataclass(frozen=True)
class BundleChange:
    """What an install or rollback did."""

    version: int  # now current
    previous: int | None  # kept for rollback (install), or None
    removed: tuple[int, ...] = ()  # versions deleted from the root


def installed(root: Path) -> Installed | None:
    """The installed bundle under ``root``, None if none is; InstallError if the layout is
    broken (``current`` not a link, pointing nowhere, or at something not a bundle)."""
    link = root / CURRENT
    if not link.is_symlink():
        if link.exists():
            raise InstallError(f"{link} is not a symbolic link; move it away and install again")
        return None
    try:
        target = link.resolve(strict=True)
        manifest = Manifest.parse((target / MANIFEST_NAME).read_bytes())
    except (OSError, BundleError) as exc:
        raise InstallError(f"{link} does not lead to an installed bundle: {exc}") from exc
    if target.name != str(manifest.version):
        raise InstallError(f"{target} holds bundle version {manifest.version}, not {target.name}")
    return Installed(manifest.version, target)


def rule_dirs(root: Path) -> RuleDirs:
    """Where scand loads rules from: the installed bundle under ``root`` (resolved, so one load
    reads one version even if ``current`` moves meanwhile), else the shipped rules."""
    now = installed(root)
    if now is None:
        return RuleDirs.packaged()
    return RuleDirs.under(now.path, bundle_version=now.version)


def install(bundle_path: Path, public_key: Ed25519PublicKey, root: Path) -> BundleChange:
    """Verify the bundle against the installed version, unpack it, check its rules load,
    switch ``current`` to it. Any refusal (BundleError) leaves ``root`` as it was."""
    versions = root / VERSIONS
    try:
        versions.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InstallError(f"cannot create {versions}: {exc}") from exc
    with locked(root / LOCK):
        before = installed(root)
        previous = before.version if before else None
        bundle = read(bundle_path, public_key, current=previous)
        staging = versions / f".incoming-{bundle.version}-{secrets.token_hex(4)}"
        final = versions / str(bundle.version)
        try:
            unpack(bundle, staging)
            check_rules(staging)
            if final.exists():  # left by an interrupted install or a version rolled back from
                shutil.rmtree(final)
            os.rename(staging, final)
            fsync_dir(versions)
        except OSError as exc:
            raise InstallError(f"cannot unpack into {versions}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _switch(root, bundle.version)
        kept = {bundle.version} | ({previous} if previous is not None else set())
        removed = _prune(root, kept)
        _record(root, "install", bundle.version, previous)
    return BundleChange(bundle.version, previous, removed)


def rollback(root: Path) -> BundleChange:
    """Switch ``current`` back to the version kept before it, and remove the one left; the
    first bundle installed goes back to the shipped rules (BundleChange.version 0)."""
    with locked(root / LOCK):
        now = installed(root)
        if now is None:
            raise InstallError(f"{root}: no bundle installed; nothing to roll back")
        older = [v for v in _kept_versions(root) if v < now.version]
        if not older and _installed_over_shipped(root, now.version):
            # The first bundle a scanner took: before it, the rules shipped in the package.
            (root / CURRENT).unlink()
            fsync_dir(root)
            removed = _prune(root, set())
            _record(root, "rollback", None, None)
            return BundleChange(SHIPPED, None, removed)
        if not older:
            raise InstallError(
                f"{root}: no version before {now.version} is kept; install an older bundle "
                "with a new, higher version number instead"
            )
        target = max(older)
        _switch(root, target)
        removed = _prune(root, {target})
        _record(root, "rollback", target, None)
    return BundleChange(target, None, removed)


def _installed_over_shipped(root: Path, version: int) -> bool:
    """Whether ``version`` was installed where no bundle was (state.json says so)."""
    try:
        record = json.loads((root / STATE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("action") == "install"
        and record.get("current") == version
        and record.get("previous") is None
    )


def status(root: Path) -> dict[str, object]:
    """The installed version, the one kept for rollback, and the last recorded change."""
    now = installed(root)
    older = [v for v in _kept_versions(root) if now is not None and v < now.version]
    record: dict[str, object] = {}
    with suppress(OSError, ValueError):  # a lost record does not change what is installed
        record = json.loads((root / STATE).read_text())
    return {
        "rules_root": str(root),
        "current": now.version if now else None,
        "previous": max(older) if older else None,
        "last_change": record or None,
    }


# -- helpers -------------------------------------------------------------------------------------


@contextmanager
def locked(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (made if missing, 0644): one install,
    rollback or publish at a time in a directory; a second waits for the first."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InstallError(f"cannot lock {lock}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _kept_versions(root: Path) -> list[int]:
    versions = root / VERSIONS
    if not versions.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in versions.iterdir()
        if p.name.isdigit() and p.is_dir() and not p.is_symlink() and (p / MANIFEST_NAME).exists()
    )


def _switch(root: Path, version: int) -> None:
    """Point ``current`` at versions/<version> atomically (rename a new link over it)."""
    link = root / CURRENT
    tmp = root / f".{CURRENT}.{secrets.token_hex(4)}"
    try:
        os.symlink(f"{VERSIONS}/{version}", tmp)  # relative: the root may be moved or mounted
        os.replace(tmp, link)
        fsync_dir(root)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"cannot switch {link} to version {version}: {exc}") from exc


def _prune(root: Path, keep: set[int]) -> tuple[int, ...]:
    """Remove every version not in ``keep`` and any leftover of an interrupted install."""
    removed: list[int] = []
    versions = root / VERSIONS
    for path in sorted(versions.iterdir()):
        if path.name.isdigit() and int(path.name) in keep:
            continue
        if path.name.isdigit():
            removed.append(int(path.name))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return tuple(sorted(removed))


def _record(root: Path, action: str, version: int | None, previous: int | None) -> None:
    doc = {
        "current": version,
        "previous": previous,
        "action": action,
        "at": utc_timestamp(datetime.now(UTC)),
    }
    try:
        write_durable(root / STATE, (json.dumps(doc, indent=2) + "\n").encode())
        (root / STATE).chmod(0o644)
    except OSError as exc:
        # The switch is done (current is the truth); a lost record must not undo it.
        raise InstallError(f"version {version} is current, but {root / STATE}: {exc}") from exc
