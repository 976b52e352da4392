"""Third-party signature feeds (Fangfrisch at the GOC) in the served directory.

Fangfrisch writes each enabled feed's files into ``<feeds_dir>/<feed>/`` after checking them
against the feed's own checksum. ``publish`` then serves those that libclamav loads (each
alone: ``clamscan --database=<file>`` on an empty file, time-limited) under ``dest/feeds/``;
index.json lists them::

    "feeds": {"urlhaus_clamav.ndb": {"sha256": "…", "size": 1234, "feed": "urlhaus"}},
    "feeds_serial": 3

``feeds_serial`` grows by one whenever the set or any file's content changes: it is the feed
set's "version" in :func:`mirror_versions` (pseudo-database :data:`FEEDS`), so the monitors
roll feeds in windows like the official databases. A file that does not load is refused and
its previous copy stays served. A monitor takes the GOC's set whole or not at all (every file's
sha256 checked), keeping the GOC's serial; a scanner does the same (:func:`sync_feeds`).

(The HTTP helpers are _mirror's, imported where used: _mirror imports this module.)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mailtower._fsio import fsync_dir
from mailtower.clamavdb.errors import DatabaseError

FEEDS = "feeds"  # the pseudo-database: the feed set's serial among {db: version}
FEEDS_DIR = "feeds"  # under the served directory
# The ClamAV database types a third-party feed may bring (what libclamav loads by extension;
# never .cvd/.cld/.cdiff: those are the official databases' own path). Never the types that
# switch detections off (.ign, .ign2: ignore a signature; .fp, .sfp: trust a file): between
# the hops a feed file is protected by the sha256 of an index that is not signed, so a feed
# may add detections but never remove the official ones.
FEED_SUFFIXES = (
    ".ndb", ".hdb", ".hsb", ".ldb", ".cdb", ".ftm", ".mdb", ".msb", ".imp",
    ".pdb", ".gdb", ".wdb", ".idb",
)  # fmt: skip
FEED_MAX_BYTES = 256 << 20  # Fangfrisch's largest default max_size is 20 MB
CLAMSCAN = "clamscan"
LOAD_TIMEOUT_S = 120.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FEED = re.compile(r"[a-z0-9_-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ERROR_LINES = 3


def is_feed_file(name: str) -> bool:
    """Whether ``name`` may be served as a feed file (a plain name of a ClamAV type)."""
    return bool(_NAME.fullmatch(name)) and name.endswith(FEED_SUFFIXES)


def verify_feed(path: Path, timeout_s: float = LOAD_TIMEOUT_S) -> None:
    """libclamav must load ``path`` on its own: DatabaseError with clamscan's last lines."""
    with tempfile.TemporaryDirectory(prefix="mtfeed-") as tmp:
        empty = Path(tmp) / "empty"
        empty.touch()
        argv = [CLAMSCAN, "--no-summary", f"--database={path}", str(empty)]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, errors="replace", timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise DatabaseError(
                f"{path}: refused: libclamav did not load it within {timeout_s:.0f} s"
            ) from None
        except OSError as exc:
            raise DatabaseError(
                f"{path}: cannot be checked ({CLAMSCAN}: {exc}); fix: install clamav"
            ) from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        said = " | ".join(lines[-_ERROR_LINES:]) or "(no output)"
        raise DatabaseError(
            f"{path}: refused: libclamav does not load it (clamscan exit {done.returncode}: "
            f"{said}); the previous copy stays served"
        )


def check_feeds(document: dict[str, Any]) -> None:
    """ValueError when index.json's feeds section is malformed (absent is fine)."""
    if "feeds" not in document and "feeds_serial" not in document:
        return
    feeds, serial = document.get("feeds"), document.get("feeds_serial")
    if not isinstance(feeds, dict) or not isinstance(serial, int) or serial < 0:
        raise ValueError("feeds must be an object and feeds_serial a count")
    for name, entry in feeds.items():
        if not is_feed_file(name):
            raise ValueError(f"feeds has {name!r}")
        if (
            not isinstance(entry, dict)
            or not _SHA256.fullmatch(str(entry.get("sha256")))
            or not isinstance(entry.get("size"), int)
            or not 0 <= entry["size"] <= FEED_MAX_BYTES
            or not _FEED.fullmatch(str(entry.get("feed")))
        ):
            raise ValueError(f"feeds.{name} needs sha256, size and feed")


def served_feeds(index: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(files, serial) of an index (({}, 0) without feeds)."""
    return dict(index.get("feeds", {})), int(index.get("feeds_serial", 0))


def publish_feeds(
    feeds_dir: Path,
    dest: Path,
    feeds: list[str],
    old: dict[str, Any],
    work: Path,
    refusals: list[str],
) -> dict[str, Any]:
    """The feed files to serve: those of ``feeds_dir/<feed>/`` (each enabled feed) that load,
    installed into ``dest/feeds/``; a refused file keeps its served copy (and entry)."""
    served_dir = dest / FEEDS_DIR
    served_dir.mkdir(mode=0o755, exist_ok=True)
    out: dict[str, Any] = {}
    for feed in sorted(feeds):
        directory = feeds_dir / feed
        if not directory.is_dir():
            refusals.append(
                f"{directory}: missing; fix: check Fangfrisch's log (has feed {feed} been "
                "fetched yet?)"
            )
            out.update({n: e for n, e in old.items() if e["feed"] == feed})
            continue
        for path in sorted(directory.iterdir()):
            if not path.is_file() or not path.name.endswith(FEED_SUFFIXES):
                continue  # Fangfrisch's checksum files, temporary files
            name = path.name
            if not is_feed_file(name):
                refusals.append(f"{path}: refused: not a plain file name")
                continue
            if name in out:
                refusals.append(
                    f"{path}: refused: feed {out[name]['feed']} serves a file of that name "
                    "already; fix: give one a filename_… option in its feed's options"
                )
                continue
            try:
                out[name] = _publish_file(path, served_dir, feed, old.get(name), work)
            except DatabaseError as exc:
                refusals.append(str(exc))
                if name in old:
                    out[name] = old[name]
            except OSError as exc:
                refusals.append(f"{path}: publishing failed: {exc}")
                if name in old:
                    out[name] = old[name]
    return out


def _publish_file(
    path: Path, served_dir: Path, feed: str, old: dict[str, Any] | None, work: Path
) -> dict[str, Any]:
    size = path.stat().st_size
    if size > FEED_MAX_BYTES:
        raise DatabaseError(f"{path}: refused: {size} bytes is more than {FEED_MAX_BYTES}")
    copy = work / f"feed-{path.name}"  # what is checked is what is served
    shutil.copyfile(path, copy)
    digest = sha256_of(copy)
    entry = {"sha256": digest, "size": copy.stat().st_size, "feed": feed}
    if old == entry and (served_dir / path.name).is_file():
        return old
    verify_feed(copy)
    install(copy, served_dir / path.name)
    return entry


def remove_unlisted(dest: Path, listed: dict[str, Any]) -> None:
    served_dir = dest / FEEDS_DIR
    if not served_dir.is_dir():
        return
    removed = False
    for path in served_dir.iterdir():
        if path.is_file() and path.name not in listed:
            path.unlink()
            removed = True
    if removed:
        fsync_dir(served_dir)


def install(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically and durably (temp + fsync + rename)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            os.fchmod(out.fileno(), 0o644)
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
