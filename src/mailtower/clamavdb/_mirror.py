"""The served directory (the GOC's and each monitor's): <db>.cvd, <db>-N.cdiff and index.json.

``publish`` moves verified files from a source directory (cvdupdate's, or a staging directory
``pull`` downloaded into) into the served one; ``pull`` is publish from the GOC's served
directory, so every hop checks every file the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mailtower._fsio import fsync_dir, write_durable
from mailtower.clamavdb._cvd import read_header, verify_chain, verify_cvd
from mailtower.clamavdb._feeds import (
    FEEDS,
    FEEDS_DIR,
    check_feeds,
    install,
    publish_feeds,
    remove_unlisted,
    served_feeds,
    sha256_of,
)
from mailtower.clamavdb.errors import DatabaseError

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = 1
KEEP_CDIFFS = 30  # as cvdupdate keeps ("# cdiffs to keep"): a month of daily's
INDEX_MAX_BYTES = 1 << 20
MAX_VERSION = 10**7  # daily is near 27,500 after 20 years
FILE_MAX_BYTES = 2 << 30  # main.cvd is ~170 MB; anything near this is not a database
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "last_check": 0.0,
    "last_ok": 0.0,
    "cooldown_until": 0.0,
    "refusals": 0,
    "last_error": "",
}
_WORK_PREFIX = ".clamavdb-work-"
_CHUNK = 1 << 20
_USER_AGENT = "mailtower-clamavdb"


def read_index(directory: Path) -> dict[str, Any]:
    """The served directory's index.json ({} when there is none yet)."""
    path = directory / INDEX
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise DatabaseError(f"{path}: cannot be read: {exc}") from None
    return parse_index(raw, str(path))


def mirror_versions(directory: Path) -> dict[str, int]:
    """``{db: version}`` the served directory's index.json promises; with ``"feeds": serial``
    once it has served third-party feeds (the feed set rolls like a database)."""
    index = read_index(directory)
    databases = index.get("databases", {})
    versions = {db: entry["version"] for db, entry in sorted(databases.items())}
    if index.get("feeds_serial"):
        versions[FEEDS] = index["feeds_serial"]
    return versions


def publish(
    source: Path,
    dest: Path,
    databases: list[str],
    upstream: dict[str, Any],
    feeds_dir: Path | None = None,
    feeds: list[str] | None = None,
) -> dict[str, int]:
    """Verify ``source``'s <db>.cvd and its CDIFFs and serve them in ``dest``; returns the
    served versions. A refused database keeps its served files; the others still publish; then
    DatabaseError lists every refusal (index.json tells the monitors how many, and why).

    With ``feeds`` (the enabled feeds' names, possibly none) the files Fangfrisch wrote into
    ``feeds_dir/<feed>/`` are served too, each once libclamav loads it (``_feeds``); without,
    the served feeds stay as they are."""
    with _locked(dest) as work:
        index = read_index(dest)
        served = dict(index.get("databases", {}))
        refusals: list[str] = []
        feed_files, serial = served_feeds(index)
        if feeds is not None:
            if feeds_dir is None:
                raise ValueError("publish: feeds need feeds_dir")
            new_files = publish_feeds(feeds_dir, dest, feeds, feed_files, work, refusals)
            if new_files != feed_files:
                # the set or a file changed: a new feed set for the scanners (a rebuilt served
                # directory starts at 1 again: scand compares a feed serial for equality only)
                serial += 1
            feed_files = new_files
        for db in databases:
            try:
                served[db] = _publish_db(source, dest, db, served.get(db), work, refusals, True)
            except DatabaseError as exc:
                refusals.append(str(exc))
            except OSError as exc:  # a full disk, a permission: that database keeps its files
                refusals.append(f"{dest}: publishing {db} failed: {exc}")
        merged = {**UPSTREAM_DEFAULTS, **index.get("upstream", {}), **upstream}
        merged["refusals"] = len(refusals)
        errors = [*refusals, upstream.get("last_error", "")]  # the refusals, then the run's
        merged["last_error"] = "; ".join(e for e in errors if e)[-2000:]
        _finish(dest, index, served, merged, databases, (feed_files, serial))
    if refusals:
        raise DatabaseError(
            (
                f"{len(refusals)} of {len(databases)} database(s) refused at {dest}: "
                if not feeds
                else f"{len(refusals)} refusal(s) at {dest} (databases and feeds): "
            )
            + " | ".join(refusals)
        )
    return {db: served[db]["version"] for db in databases}


def pull(base_url: str, dest: Path, databases: list[str], timeout_s: float = 30) -> dict[str, int]:
    """Bring ``dest`` to what ``base_url``/index.json serves, verifying every file as publish
    does; the GOC's ``upstream`` section is copied through. A refused database keeps its
    previous files; DatabaseError (naming each URL) after the others were pulled.

    The GOC's feeds come too, whatever ``databases`` says: its whole set (each file's sha256
    checked) and its serial, or, when a file fails, the previous set."""
    base_url = base_url.rstrip("/")
    index_url = f"{base_url}/{INDEX}"
    raw = download_bytes(index_url, INDEX_MAX_BYTES, timeout_s)
    remote = parse_index(raw, index_url)
    remote_dbs = remote.get("databases", {})
    with _locked(dest) as work:
        index = read_index(dest)
        served = dict(index.get("databases", {}))
        refusals: list[str] = []
        for db in databases:
            try:
                served[db] = _pull_db(
                    base_url, dest, db, remote_dbs, served.get(db), work, timeout_s, refusals
                )
            except DatabaseError as exc:
                refusals.append(str(exc))
            except OSError as exc:
                refusals.append(f"{dest}: pulling {db} failed: {exc}")
        feeds = served_feeds(index)
        remote_feeds = served_feeds(remote)
        if remote_feeds != feeds:
            try:
                feeds = (
                    pull_feeds(base_url, dest, remote_feeds[0], feeds[0], work, timeout_s),
                    remote_feeds[1],
                )
            except DatabaseError as exc:
                refusals.append(f"{exc} (feed set {remote_feeds[1]} refused whole)")
            except OSError as exc:
                refusals.append(f"{dest}: pulling feed set {remote_feeds[1]} failed: {exc}")
        # copied through as the GOC wrote it: the monitor's metrics report the GOC's state
        _finish(dest, index, served, remote.get("upstream", {}), databases, feeds)
    if refusals:
        raise DatabaseError(
            f"{len(refusals)} of {len(databases)} database(s) refused from {base_url}: "
            + " | ".join(refusals)
        )
    return {db: served[db]["version"] for db in databases}


def _publish_db(
    source: Path,
    dest: Path,
    db: str,
    old: dict[str, Any] | None,
    work: Path,
    refusals: list[str],
    set_aside: bool = False,
) -> dict[str, Any]:
    """Serve source/<db>.cvd (and the CDIFFs from the served version to it) in ``dest``; the
    entry of index.json for it. Raises DatabaseError with ``dest`` untouched for ``db``.

    A CDIFF that fails its signature or its chain is refused (added to ``refusals``) and the
    verified CVD is served alone: clients then download the whole CVD. With ``set_aside`` (the
    GOC's cvdupdate directory) a refused CVD is renamed ``<db>.cvd.refused``, so cvdupdate
    fetches it again on its next run instead of taking the bad copy for its local version."""
    cvd = source / f"{db}.cvd"
    if not cvd.is_file():
        raise DatabaseError(
            f"{cvd}: missing; fix: let cvdupdate download {db} (`cvd update`), or remove "
            f"{db} from the databases"
        )
    try:
        header = read_header(cvd)
        digest = _sha256(cvd)
        if old is not None and header.version == old["version"] and digest == old["sha256"]:
            return old
        if old is not None and header.version < old["version"]:
            raise DatabaseError(
                f"{cvd}: refused: version {header.version} is older than the served "
                f"{old['version']}; fix: check the upstream mirror (a CVD never goes back)"
            )
        if old is not None and header.version == old["version"]:
            raise DatabaseError(
                f"{cvd}: refused: version {header.version} is already served with other "
                "contents; fix: fetch it again (ClamAV never rebuilds a version)"
            )
        verify_cvd(cvd)
    except DatabaseError:
        if set_aside:  # whatever the reason, cvdupdate must not keep it as its local copy
            os.replace(cvd, cvd.with_name(f"{cvd.name}.refused"))
            log.error("%s: refused; set aside as %s.refused to be fetched again", cvd, cvd.name)
        raise
    served_cvd = dest / f"{db}.cvd"
    cdiffs: dict[str, str] = {}
    new_cdiffs: list[Path] = []
    if old is not None and served_cvd.is_file():
        wanted = [source / f"{db}-{n}.cdiff" for n in range(old["version"] + 1, header.version + 1)]
        missing = [p.name for p in wanted if not p.is_file()]
        if missing:
            # No chain to verify them against: serve the CVD alone; freshclam then downloads
            # the whole CVD (the CDIFFs served so far stop short of the new version).
            log.warning(
                "%s: no CDIFF %s: serving version %d without CDIFFs",
                source,
                ", ".join(missing),
                header.version,
            )
        else:
            try:
                verify_chain(served_cvd, wanted, cvd, work)
            except DatabaseError as exc:
                # the CVD itself is signed and verified: serve it without the broken chain
                refusals.append(f"{exc}; serving {db} {header.version} without CDIFFs")
            else:
                cdiffs = dict(old.get("cdiffs", {}))
                new_cdiffs = wanted
                cdiffs.update({p.name: _sha256(p) for p in wanted})
    kept = sorted(cdiffs, key=_cdiff_number)[-KEEP_CDIFFS:]
    for path in new_cdiffs:
        if path.name in kept:
            _install(path, dest / path.name, work)
    _install(cvd, served_cvd, work)  # after its CDIFFs: freshclam reads the CVD's version first
    return {
        "version": header.version,
        "sha256": digest,
        "size": cvd.stat().st_size,
        "built": header.built,
        "sigs": header.sigs,
        "cdiffs": {name: cdiffs[name] for name in kept},
    }


def _pull_db(
    base_url: str,
    dest: Path,
    db: str,
    remote: dict[str, Any],
    old: dict[str, Any] | None,
    work: Path,
    timeout_s: float,
    refusals: list[str],
) -> dict[str, Any]:
    entry = remote.get(db)
    if entry is None:
        raise DatabaseError(
            f"{base_url}/{INDEX}: does not serve {db}; fix: add it to the GOC's "
            "clamav.databases, or remove it from the tower's"
        )
    if old is not None and (entry["version"], entry["sha256"]) == (old["version"], old["sha256"]):
        return old
    staging = Path(tempfile.mkdtemp(prefix=f"pull-{db}-", dir=work))
    files = {f"{db}.cvd": (entry["sha256"], entry["size"])}
    start = old["version"] if old is not None else entry["version"]
    chain = (
        [f"{db}-{n}.cdiff" for n in range(start + 1, entry["version"] + 1)]
        if entry["version"] - start <= KEEP_CDIFFS
        else []  # too far behind for CDIFFs: the whole CVD
    )
    if chain and all(name in entry["cdiffs"] for name in chain):
        files.update({name: (entry["cdiffs"][name], FILE_MAX_BYTES) for name in chain})
    try:
        for name, (digest, size) in files.items():
            download_file(f"{base_url}/{name}", staging / name, digest, size, timeout_s)
        noted: list[str] = []
        entry_out = _publish_db(staging, dest, db, old, work, noted)
        refusals.extend(n.replace(f"{staging}/", f"{base_url}/") for n in noted)
        return entry_out
    except DatabaseError as exc:  # name what the operator can look at: the GOC's URL
        raise DatabaseError(str(exc).replace(f"{staging}/", f"{base_url}/")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finish(
    dest: Path,
    index: dict[str, Any],
    served: dict[str, Any],
    upstream: dict[str, Any],
    databases: list[str],
    feeds: tuple[dict[str, Any], int] = ({}, 0),
) -> None:
    """Write index.json (only when something changed) and drop CDIFFs and feed files no
    longer listed. No feeds section until a feed set was served (serial 0)."""
    feed_files, serial = feeds
    if (
        served != index.get("databases")
        or upstream != index.get("upstream")
        or feeds != served_feeds(index)
    ):
        document: dict[str, Any] = {
            "format": FORMAT,
            "databases": dict(sorted(served.items())),
            "published_at": time.time(),
            "upstream": upstream,
        }
        if serial:
            document["feeds"] = dict(sorted(feed_files.items()))
            document["feeds_serial"] = serial
        write_durable(dest / INDEX, json.dumps(document, indent=1).encode() + b"\n", mode=0o644)
    remove_unlisted(dest, feed_files)
    removed = False
    for db in databases:
        listed = set(served.get(db, {}).get("cdiffs", {}))
        for path in dest.glob(f"{db}-*.cdiff"):
            if _cdiff_number(path.name) >= 0 and path.name not in listed:
                path.unlink()
                removed = True
    if removed:
        fsync_dir(dest)


def parse_index(raw: bytes, where: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"not an index of format {FORMAT}")
        databases = document.get("databases")
        upstream = document.get("upstream", {})
        if not isinstance(databases, dict) or not isinstance(upstream, dict):
            raise ValueError("databases and upstream must be objects")
        for db, entry in databases.items():
            _check_entry(db, entry)
        check_feeds(document)
    except (ValueError, TypeError, KeyError) as exc:
        raise DatabaseError(
            f"{where}: malformed index ({exc}); fix: run `mailtower clamavdb publish` (or pull) "
            "again at its source"
        ) from None
    return document


def _check_entry(db: str, entry: Any) -> None:
    if not re.fullmatch(r"[a-z0-9_-]+", db):
        raise ValueError(f"database name {db!r}")
    if not isinstance(entry, dict):
        raise ValueError(f"{db} is not an object")
    for key, kind in (("version", int), ("size", int), ("sha256", str), ("cdiffs", dict)):
        if not isinstance(entry.get(key), kind):
            raise ValueError(f"{db}.{key} missing or not {kind.__name__}")
    if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        raise ValueError(f"{db}.sha256 is not a sha256")
    # bounds before anything is sized or counted from them (an index is not signed)
    if not 0 < entry["version"] < MAX_VERSION:
        raise ValueError(f"{db}.version {entry['version']} is out of range")
    if not 0 < entry["size"] <= FILE_MAX_BYTES:
        raise ValueError(f"{db}.size {entry['size']} is out of range")
    for name, digest in entry["cdiffs"].items():
        if not re.fullmatch(rf"{re.escape(db)}-[0-9]+\.cdiff", name) or not re.fullmatch(
            r"[0-9a-f]{64}", str(digest)
        ):
            raise ValueError(f"{db}.cdiffs has {name!r}")


def _cdiff_number(name: str) -> int:
    match = re.search(r"-([0-9]+)\.cdiff$", name)
    return int(match[1]) if match else -1


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[Path]:
    """One publish/pull at a time on ``dest``; yields a private work directory inside it (the
    same disk: unpacked databases are large, and /tmp may be in RAM)."""
    dest.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in dest.glob(f"{_WORK_PREFIX}*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=_WORK_PREFIX, dir=dest))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        os.close(fd)  # releases the lock


def _install(source: Path, target: Path, work: Path) -> None:
    """Copy ``source`` to ``target`` atomically and durably (temp + fsync + rename)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            os.fchmod(out.fileno(), 0o644)
            shutil.copyfileobj(src, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open(url: str, timeout_s: float) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 (http by design)
    except urllib.error.HTTPError as exc:
        raise DatabaseError(
            f"{url}: HTTP {exc.code}; fix: check the served directory there (`mailtower "
            "clamavdb status /srv/mailtower/clamav` on the GOC, /srv/mailtower/mirror/official "
            "on a monitor)"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DatabaseError(
            f"{url}: unreachable ({reason}); fix: check that nginx there answers this host "
            "(the GOC's for a monitor: goc.address, goc.bundle_port; the monitor's for a "
            "scanner: ports.mirror_http) and the network between them"
        ) from None


def download_bytes(url: str, cap: int, timeout_s: float) -> bytes:
    with _open(url, timeout_s) as response:
        try:
            body: bytes = response.read(cap + 1)
        except OSError as exc:
            raise DatabaseError(f"{url}: download failed ({exc}); fix: try again") from None
    if len(body) > cap:
        raise DatabaseError(f"{url}: larger than {cap} bytes; refused (not an index)")
    return body


def download_file(url: str, target: Path, digest: str, size: int, timeout_s: float) -> None:
    """Download ``url`` into ``target``: at most ``size`` bytes, whose sha256 must be
    ``digest`` (a CVD's size is in the index; a CDIFF's is only capped)."""
    hasher, total = hashlib.sha256(), 0
    with _open(url, timeout_s) as response, target.open("wb") as out:
        try:
            while chunk := response.read(_CHUNK):
                total += len(chunk)
                if total > size:
                    raise DatabaseError(f"{url}: refused: larger than the index says ({size})")
                hasher.update(chunk)
                out.write(chunk)
        except OSError as exc:
            raise DatabaseError(f"{url}: download failed ({exc}); fix: try again") from None
    if hasher.hexdigest() != digest:
        raise DatabaseError(
            f"{url}: refused: sha256 {hasher.hexdigest()} is not the index's {digest} "
            f"({total} bytes); the mirror keeps its previous version; fix: check the GOC's "
            "served file (a transfer or disk fault there)"
        )


def pull_feeds(
    base_url: str,
    dest: Path,
    remote: dict[str, Any],
    old: dict[str, Any],
    work: Path,
    timeout_s: float,
) -> dict[str, Any]:
    """Bring ``dest/feeds/`` to ``remote``'s files, all or none: every changed file downloaded
    and its sha256 checked first; DatabaseError (``dest`` untouched) otherwise."""
    served_dir = dest / FEEDS_DIR
    served_dir.mkdir(mode=0o755, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="pull-feeds-", dir=work))
    try:
        fetched = []
        for name, entry in sorted(remote.items()):
            if old.get(name) == entry and (served_dir / name).is_file():
                continue
            download_file(
                f"{base_url}/{FEEDS_DIR}/{name}",
                staging / name,
                entry["sha256"],
                entry["size"],
                timeout_s,
            )
            fetched.append(name)
        for name in fetched:
            install(staging / name, served_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dict(remote)


def sync_feeds(
    base_url: str, directory: Path, serial: int, timeout_s: float = 30
) -> dict[str, Any]:
    """Make ``directory`` (a scanner's staging) hold exactly the feed files of serial
    ``serial`` that ``base_url``/index.json lists, each file's sha256 checked (kept copies
    are checked again). DatabaseError when the mirror serves another serial or a file fails."""
    base_url = base_url.rstrip("/")
    index_url = f"{base_url}/{INDEX}"
    remote = parse_index(download_bytes(index_url, INDEX_MAX_BYTES, timeout_s), index_url)
    files, served_serial = served_feeds(remote)
    if served_serial != serial:
        raise DatabaseError(
            f"{index_url}: serves feed set {served_serial}, not the asked {serial}; fix: let "
            "the monitor pull again (its rollout asks for what its mirror serves)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    for name, entry in sorted(files.items()):
        target = directory / name
        if target.is_file() and sha256_of(target) == entry["sha256"]:
            continue
        part = directory / f".{name}.part"
        try:
            download_file(
                f"{base_url}/{FEEDS_DIR}/{name}", part, entry["sha256"], entry["size"], timeout_s
            )
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
    for path in directory.iterdir():
        if path.name not in files:
            path.unlink()
    return files
