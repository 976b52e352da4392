"""Install the official ClamAV databases on this scanner when the monitor asks (issue 16).

The monitor opens a window (drains the scanner), then POSTs ``/clamav/apply`` with the
versions its verified mirror holds. scand runs freshclam (``/etc/mailtower/freshclam.conf``,
whose mirror is the monitor's and whose DatabaseDirectory is the staging directory, never
clamd's), checks that the staged versions are the asked ones, keeps the live files in the
previous directory, moves the staged ones into clamd's directory one by one (each a rename:
clamd's directory always holds a whole database), has clamd and the local c-icap reload, and
waits until both find a probe signature written with a fresh token beside the databases —
the bundle apply's probe (mailtower.scand.bundle_apply): only an engine loaded after the new
files were in place knows that token. A reload that does not take puts the previous files
back and reloads again. ``/clamav/rollback`` puts the previous files back the same way.

Third-party feeds (issue 16, Fangfrisch at the GOC) come with the official databases: when
the asked versions include ``"feeds": S`` (the monitor's mirror serves feed set S), scand takes
that set from the monitor's mirror (``<mirror>/index.json`` + ``feeds/<file>``, each sha256
checked: ``clamavdb.sync_feeds``) into ``<staging>/feeds`` and installs it in clamd's directory
as ``feed-<file>`` (removing the ``feed-*`` files no longer listed) with :data:`FEEDS_MANIFEST`
saying S, in the same window and reload; the previous set is kept and restored like a database.

clamd never loads these databases on its own: freshclam writes only to the staging directory
(Debian's clamav-freshclam service is disabled, the conf has no NotifyClamd) and clamd.conf
turns SelfCheck off (roles/scanner.py).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mailtower._fsio import fsync_dir, write_durable
from mailtower.clamavdb import FEEDS, DatabaseError, live_versions, sync_feeds
from mailtower.scand.bundle_apply import local_engines, probe_signature, wait_for_probe
from mailtower.scand.errors import ApplyError, ClamavApplyError
from mailtower.settings import TowerSettings

log = logging.getLogger("mailtower.scand.clamav")

ICAP_CONTROL = "/run/c-icap/c-icap.ctl"
FRESHCLAM = "/usr/bin/freshclam"
FRESHCLAM_CONF = Path("/etc/mailtower/freshclam.conf")
STAGED_DIR = Path("/var/lib/mailtower/clamav-staged")
PREVIOUS_DIR = Path("/var/lib/mailtower/clamav-previous")
# What the previous directory holds ({db: version, null: the database was not there}); written
# last, so a directory without it holds nothing to restore.
PREVIOUS_MANIFEST = "previous.json"
PROBE_NAME = "mtclamav-probe.ndb"  # not mtbundle-*: the bundle apply removes those it lacks
SUFFIXES = (".cvd", ".cld")
FEED_PREFIX = "feed-"  # a third-party feed's file in clamd's directory: feed-<its name>
FEEDS_MANIFEST = "mtfeeds.json"  # beside them: {"serial": S, "files": [...]} (not a db type)
FEEDS_TIMEOUT_S = 120.0
FRESHCLAM_TIMEOUT_S = 600.0  # main.cvd is about 160 MB, fetched from the tower's own monitor
RELOAD_TIMEOUT_S = 300.0  # a non-concurrent reload of main + daily takes a minute on a slow host
_ERROR_LINES = 5


@dataclass(frozen=True)
class Paths:
    """Where this scanner's ClamAV databases live (settings.clamav_db_dir: clamd's)."""

    live: Path
    staged: Path
    previous: Path
    freshclam_conf: Path = FRESHCLAM_CONF
    freshclam: str = FRESHCLAM
    mirror: str = ""  # the monitor's served directory (feeds): <mirror_url>/official

    @classmethod
    def of(cls, settings: TowerSettings) -> Paths:
        return cls(
            Path(settings.clamav_db_dir),
            STAGED_DIR,
            PREVIOUS_DIR,
            FRESHCLAM_CONF,
            FRESHCLAM,
            f"{settings.mirror_url}/official",
        )

    @property
    def staged_feeds(self) -> Path:
        return self.staged / FEEDS


@dataclass(frozen=True)
class ClamavApplied:
    versions: dict[str, int]  # live now
    installed: bool  # False: the asked versions were live already
    reloaded: bool
    seconds: float


def configured(settings: TowerSettings) -> list[str]:
    if settings.clamav is None:
        raise ClamavApplyError(
            "this tower's settings take no official ClamAV databases (settings.clamav unset)"
        )
    return list(settings.clamav.databases)


def live(settings: TowerSettings, paths: Paths | None = None) -> dict[str, int]:
    """{db: version} of the configured databases in clamd's directory (those present), and
    ``"feeds": S`` once a feed set is installed."""
    wanted = configured(settings)
    directory = (paths or Paths.of(settings)).live
    found = live_versions(directory)
    versions = {db: found[db] for db in wanted if db in found}
    serial = live_feeds(directory)
    if serial is not None:
        versions[FEEDS] = serial
    return versions


def live_feeds(directory: Path) -> int | None:
    """The feed set installed in ``directory`` (None: none, or its manifest unreadable)."""
    try:
        serial = json.loads((directory / FEEDS_MANIFEST).read_text())["serial"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("event=clamav_feeds_manifest_unreadable dir=%s error=%r", directory, str(exc))
        return None
    return serial if isinstance(serial, int) else None


def _feed_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"{FEED_PREFIX}*") if p.is_file())


def _copy_feeds(source: Path, directory: Path) -> None:
    """Copy the feed files and manifest of ``source`` into ``directory``."""
    for path in _feed_files(source):
        _copy_in(path, directory)
    if (source / FEEDS_MANIFEST).is_file():
        _copy_in(source / FEEDS_MANIFEST, directory)


def _replace_feeds(source: Path | None, live_dir: Path) -> None:
    """Make ``live_dir`` hold exactly the feed files and manifest of ``source`` (None: no
    feeds). The manifest goes last when added and first when removed."""
    wanted = {p.name for p in _feed_files(source)} if source is not None else set()
    if source is None or not (source / FEEDS_MANIFEST).is_file():
        (live_dir / FEEDS_MANIFEST).unlink(missing_ok=True)
    if source is not None:
        for path in _feed_files(source):
            _copy_in(path, live_dir)
    for path in _feed_files(live_dir):
        if path.name not in wanted:
            path.unlink()
    if source is not None and (source / FEEDS_MANIFEST).is_file():
        _copy_in(source / FEEDS_MANIFEST, live_dir)
    fsync_dir(live_dir)


def _install_feeds(paths: Paths, listed: dict[str, object], serial: int) -> None:
    """The staged feed set into clamd's directory as feed-<file>, then its manifest."""
    ready = paths.staged / ".feeds-ready"
    shutil.rmtree(ready, ignore_errors=True)
    ready.mkdir()
    try:
        for name in sorted(listed):
            shutil.copyfile(paths.staged_feeds / name, ready / f"{FEED_PREFIX}{name}")
        manifest = {"serial": serial, "files": sorted(listed)}
        (ready / FEEDS_MANIFEST).write_text(json.dumps(manifest) + "\n")
        _replace_feeds(ready, paths.live)
    finally:
        shutil.rmtree(ready, ignore_errors=True)


def _file_of(directory: Path, db: str) -> Path | None:
    """The database's file there: <db>.cld over <db>.cvd (as live_versions reads them)."""
    for suffix in (".cld", ".cvd"):
        if (directory / f"{db}{suffix}").is_file():
            return directory / f"{db}{suffix}"
    return None


def run_freshclam(paths: Paths, timeout_s: float) -> tuple[bool, str]:
    """Run freshclam once into the staging directory: (it succeeded, its output).

    freshclam.dat goes first: it holds freshclam's cool-down after a 403 or 429, which protects
    ClamAV's servers; here the only server is the tower's own monitor, and a cool-down left by
    one refusal (a scanner deployed before the monitor admitted it) would keep this scanner
    from every update until it expired."""
    (paths.staged / "freshclam.dat").unlink(missing_ok=True)
    argv = [paths.freshclam, "--no-dns", "--stdout", f"--config-file={paths.freshclam_conf}"]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, errors="replace", timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        return False, f"{text}\nfreshclam did not finish within {timeout_s:.0f} s"
    except OSError as exc:
        return False, f"cannot run {paths.freshclam}: {exc}"
    return done.returncode == 0, (done.stdout or "") + (done.stderr or "")


def _staged(paths: Paths) -> dict[str, int]:
    try:
        return live_versions(paths.staged)
    except DatabaseError as exc:
        raise ClamavApplyError(f"staged databases unreadable: {exc}", 502) from exc


def _last_errors(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln or "WARNING" in ln or "did not" in ln]
    return " | ".join((errors or lines)[-_ERROR_LINES:]) or "(no output)"


def _copy_in(src: Path, directory: Path) -> None:
    """Put ``src`` into ``directory`` under its name by a rename (never half a file there)."""
    tmp = directory / f".{src.name}.mtnew"
    try:
        try:
            os.link(src, tmp)  # same file system: no copy
        except OSError:
            shutil.copyfile(src, tmp)
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, directory / src.name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _install(source: Path, live_dir: Path, db: str) -> None:
    """Make ``live_dir`` hold ``source`` (a <db>.cvd or .cld) as db's only file."""
    _copy_in(source, live_dir)
    for suffix in SUFFIXES:
        if suffix != source.suffix:
            (live_dir / f"{db}{suffix}").unlink(missing_ok=True)
    fsync_dir(live_dir)


def keep_previous(paths: Paths, dbs: list[str]) -> dict[str, int | None]:
    """Copy the live files of ``dbs`` into the previous directory; what it now holds."""
    previous = paths.previous
    previous.mkdir(parents=True, exist_ok=True)
    (previous / PREVIOUS_MANIFEST).unlink(missing_ok=True)  # until complete: nothing to restore
    for old in previous.iterdir():
        if old.is_file() and (
            old.suffix in SUFFIXES
            or old.name.startswith((".", FEED_PREFIX))
            or old.name == FEEDS_MANIFEST
        ):
            old.unlink()
    manifest: dict[str, int | None] = {}
    found = live_versions(paths.live)
    for db in dbs:
        if db == FEEDS:
            manifest[db] = live_feeds(paths.live)
            _copy_feeds(paths.live, previous)
            continue
        current = _file_of(paths.live, db)
        manifest[db] = found.get(db) if current else None
        if current is not None:
            _copy_in(current, previous)
    fsync_dir(previous)
    write_durable(previous / PREVIOUS_MANIFEST, json.dumps(manifest).encode())
    return manifest


def _read_previous(paths: Paths) -> dict[str, int | None]:
    try:
        manifest = json.loads((paths.previous / PREVIOUS_MANIFEST).read_text())
    except FileNotFoundError:
        raise ClamavApplyError(
            f"no databases kept in {paths.previous} (no apply has run here yet): "
            "nothing to roll back to"
        ) from None
    except ValueError as exc:
        raise ClamavApplyError(f"{paths.previous}/{PREVIOUS_MANIFEST} is corrupt: {exc}") from exc
    return {str(db): (int(v) if v is not None else None) for db, v in manifest.items()}


def _put_back(paths: Paths, manifest: dict[str, int | None]) -> None:
    """Make clamd's directory hold the previous files of each database in ``manifest``."""
    for db, version in sorted(manifest.items()):
        if db == FEEDS:
            _replace_feeds(paths.previous if version is not None else None, paths.live)
            continue
        kept = _file_of(paths.previous, db)
        if version is None:  # it was not there before: take it away again
            for suffix in SUFFIXES:
                (paths.live / f"{db}{suffix}").unlink(missing_ok=True)
            continue
        if kept is None:
            raise ClamavApplyError(f"{paths.previous} lacks {db} version {version}", 500)
        _install(kept, paths.live, db)
    fsync_dir(paths.live)


def reload_engines(
    settings: TowerSettings, paths: Paths, icap_control: str | None, timeout_s: float
) -> None:
    """Have clamd and the local c-icap reload clamd's directory, and return once each scans
    with what it holds now: a probe signature with a fresh token must be found by each."""
    from mailtower.scand.sigsync import reload_clamd, reload_icap

    token = secrets.token_hex(8)
    write_durable(paths.live / PROBE_NAME, probe_signature(token), mode=0o644)
    engines = local_engines(settings)
    names = {e.name for e in engines}
    if "clamd" in names and not reload_clamd(settings.clamd_socket):
        raise ApplyError(f"clamd at {settings.clamd_socket} did not take RELOAD; is it running?")
    if "icap" in names and icap_control and not reload_icap(icap_control):
        raise ApplyError(f"c-icap did not take its reload command at {icap_control}")
    wait_for_probe(engines, token, timeout_s, present=True)


def _reload_or_put_back(
    settings: TowerSettings,
    paths: Paths,
    manifest: dict[str, int | None],
    what: str,
    icap_control: str | None,
    timeout_s: float,
) -> None:
    """Reload; when that fails, the previous files back and reload again, then raise."""
    try:
        reload_engines(settings, paths, icap_control, timeout_s)
        return
    except (ApplyError, OSError) as exc:
        failure = exc
    log.error("event=clamav_reload_failed what=%r error=%r", what, str(failure))
    try:
        _put_back(paths, manifest)
        reload_engines(settings, paths, icap_control, timeout_s)
    except (ApplyError, OSError, DatabaseError) as exc:
        log.critical("event=clamav_restore_failed error=%r", str(exc))
        raise ClamavApplyError(
            f"{what}: the engines did not take the new databases ({failure}), and putting the "
            f"previous ones back failed too ({exc}); look at clamd on this scanner",
            500,
        ) from exc
    raise ClamavApplyError(
        f"{what}: the engines did not take the new databases ({failure}); the previous ones "
        f"{_shown(manifest)} are back"
    ) from failure


def _shown(versions: dict[str, int | None]) -> str:
    return ", ".join(
        f"{db} {v if v is not None else '(none)'}" for db, v in sorted(versions.items())
    )


def apply(
    settings: TowerSettings,
    versions: dict[str, int],
    *,
    paths: Paths | None = None,
    icap_control: str | None = ICAP_CONTROL,
    freshclam_timeout_s: float = FRESHCLAM_TIMEOUT_S,
    reload_timeout_s: float = RELOAD_TIMEOUT_S,
) -> ClamavApplied:
    """Make ``versions`` ({db: N}) the live databases (blocking; see the module's doc)."""
    started = time.monotonic()
    paths = paths or Paths.of(settings)
    dbs = configured(settings)
    unknown = sorted(set(versions) - set(dbs) - {FEEDS})
    if not versions or unknown:
        raise ClamavApplyError(
            f"asked for {sorted(versions) or 'no database'}; this tower loads {dbs} "
            f"(settings.clamav.databases)"
        )
    now = live(settings, paths)
    # A CVD never goes back; a feed set's serial only names a set (a rebuilt GOC may number
    # again), so it is compared for equality only.
    older = {db: v for db, v in versions.items() if db != FEEDS and now.get(db, 0) > v}
    if older:
        raise ClamavApplyError(
            "; ".join(
                f"{db} {now[db]} is live, newer than the asked {v}" for db, v in older.items()
            )
            + ": refused (rollback?)"
        )
    if all(now.get(db) == v for db, v in versions.items()):
        return ClamavApplied(now, False, False, time.monotonic() - started)
    official = {db: v for db, v in versions.items() if db != FEEDS}
    feeds = versions.get(FEEDS)
    listed: dict[str, object] = {}
    if feeds is not None and now.get(FEEDS) != feeds:
        try:
            listed = sync_feeds(paths.mirror, paths.staged_feeds, feeds, FEEDS_TIMEOUT_S)
        except (DatabaseError, OSError) as exc:
            raise ClamavApplyError(
                f"feed set {feeds} not staged from {paths.mirror}: {exc}", 502
            ) from exc
    elif feeds is not None:
        feeds = None  # already live
    ok, output, staged = True, "", now
    if any(now.get(db) != v for db, v in official.items()):
        ok, output = run_freshclam(paths, freshclam_timeout_s)
        staged = _staged(paths)
        behind = [db for db, v in official.items() if staged.get(db, 0) < v]
        if behind:
            # freshclam takes a CDIFF it cannot download (the mirror serves a CVD without the
            # chain: a refused CDIFF, a mirror that started from a CVD) for a mirror not yet in
            # sync and gives up. Without a staged copy it fetches the whole signed CVD: the
            # live databases are elsewhere, so dropping the staged ones loses nothing.
            for db in behind:
                for suffix in (".cld", ".cvd"):
                    (paths.staged / f"{db}{suffix}").unlink(missing_ok=True)
            log.warning(
                "freshclam left %s behind the asked versions; fetching the whole CVD",
                ",".join(behind),
            )
            ok, again = run_freshclam(paths, freshclam_timeout_s)
            output = f"{output}\n{again}"
            staged = _staged(paths)
    wrong = {db: v for db, v in official.items() if staged.get(db) != v}
    if wrong:
        what = "; ".join(
            f"{db}: asked {v}, staged {staged.get(db, 'none')}" for db, v in sorted(wrong.items())
        )
        raise ClamavApplyError(
            f"freshclam {'ran' if ok else 'failed'} but {paths.staged} does not hold the asked "
            f"versions ({what}); freshclam said: {_last_errors(output)}",
            409 if ok else 502,
        )
    asked = sorted(official if feeds is None else versions)
    manifest = keep_previous(paths, asked)
    for db in asked:
        if db == FEEDS:
            assert feeds is not None
            _install_feeds(paths, listed, feeds)
            continue
        source = _file_of(paths.staged, db)
        assert source is not None  # staged holds it: its version was read above
        _install(source, paths.live, db)
    log.info("event=clamav_installed versions=%r previous=%r", versions, manifest)
    _reload_or_put_back(
        settings,
        paths,
        manifest,
        f"apply {_shown(dict(versions))}",
        icap_control,
        reload_timeout_s,
    )
    return ClamavApplied(live(settings, paths), True, True, time.monotonic() - started)


def rollback(
    settings: TowerSettings,
    *,
    paths: Paths | None = None,
    icap_control: str | None = ICAP_CONTROL,
    reload_timeout_s: float = RELOAD_TIMEOUT_S,
) -> ClamavApplied:
    """Put the databases kept by the last apply back and reload (blocking)."""
    started = time.monotonic()
    paths = paths or Paths.of(settings)
    configured(settings)
    manifest = _read_previous(paths)
    before = live(settings, paths)
    if all(before.get(db) == v for db, v in manifest.items()):
        # already what was kept (e.g. a second rollback): check the engines load it
        reload_engines(settings, paths, icap_control, reload_timeout_s)
        return ClamavApplied(before, False, True, time.monotonic() - started)
    # What is live now, to go back to should the kept files not load either.
    current = {db: before.get(db) for db in manifest}
    staging = paths.previous / ".rollback-from"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for db in manifest:
            if db == FEEDS:
                _copy_feeds(paths.live, staging)
                continue
            live_file = _file_of(paths.live, db)
            if live_file is not None:
                _copy_in(live_file, staging)
        _put_back(paths, manifest)
        try:
            reload_engines(settings, paths, icap_control, reload_timeout_s)
        except (ApplyError, OSError) as failure:
            log.error("event=clamav_rollback_reload_failed error=%r", str(failure))
            saved = Paths(paths.live, paths.staged, staging)
            try:
                _put_back(saved, current)
                reload_engines(settings, paths, icap_control, reload_timeout_s)
            except (ApplyError, OSError) as exc:
                raise ClamavApplyError(
                    f"rollback to {_shown(manifest)}: not taken ({failure}), and going back "
                    f"to {_shown(current)} failed too ({exc}); look at clamd on this scanner",
                    500,
                ) from exc
            raise ClamavApplyError(
                f"rollback to {_shown(manifest)}: the engines did not take them ({failure}); "
                f"{_shown(current)} are live again"
            ) from failure
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ClamavApplied(live(settings, paths), True, True, time.monotonic() - started)
