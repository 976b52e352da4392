"""Apply a rule bundle on this scanner when the monitor asks (mailtower.monitor.rollout).

The monitor drains the scanner in HAProxy, then POSTs ``/rules/apply`` with the version to
run. scand fetches that bundle from the tower's mirror (the monitor: nothing comes from outside
the tower), installs it under ``settings.rules_dir`` (signature, hashes, newer than the one in
use, rules compile — or nothing changes), hands its ClamAV databases to the scanner's clamd and
c-icap and waits until both scan with them, then reloads its own pipeline in-process. The
monitor checks the result with a canary message before it puts the scanner back in service,
and asks for ``/rules/rollback`` when the canary fails.

ClamAV databases of a bundle live in clamd's database directory as ``mtbundle-<name>``, beside
the mirror's (sigsync's) files, with one more: a probe signature made from the section's
content hash. After a reload, the probe is scanned through every whole-message engine until
each finds it: only then are the new databases known to be loaded everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mailtower import bundles
from mailtower._fsio import write_durable
from mailtower.bundles._format import MAX_BUNDLE_BYTES
from mailtower.scand.errors import ApplyError
from mailtower.scanning import engines as engines_mod
from mailtower.scanning.errors import EngineError
from mailtower.settings import TowerSettings

log = logging.getLogger("mailtower.scand.bundles")

ICAP_CONTROL = "/run/c-icap/c-icap.ctl"
PREFIX = "mtbundle-"
PROBE_NAME = f"{PREFIX}probe.ndb"
FETCH_TIMEOUT_S = 30.0
PROBE_EVERY_S = 0.2
# How long clamd and c-icap may take to load the new databases: with the official ones a
# blocking reload took 46 s on the benchmark machine (docs/benchmarks.md), so 60 s is too
# little; the same budget as scand's ClamAV apply.
PROBE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Applied:
    version: int | None  # the bundle now current (None: none installed)
    installed: bool  # False: it was current already
    clamav_reloaded: bool
    seconds: float


def _require(settings: TowerSettings) -> tuple[Path, str]:
    if settings.bundles is None or settings.rules_dir is None:
        raise ApplyError("this tower's settings take no rule bundles (settings.bundles unset)")
    return Path(settings.rules_dir), settings.bundles.public_key


def fetch(url: str, dest: Path, timeout_s: float = FETCH_TIMEOUT_S) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            data = reply.read(MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        raise ApplyError(f"cannot fetch {url}: {exc}; is the monitor's mirror up?") from exc
    write_durable(dest, data)


def apply(
    settings: TowerSettings,
    version: int,
    *,
    icap_control: str | None = ICAP_CONTROL,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
) -> Applied:
    """Make ``version`` this scanner's current bundle (blocking; the caller reloads scand's
    pipeline afterwards). Already current: only the ClamAV side is checked again."""
    started = time.monotonic()
    root, pem = _require(settings)
    now = bundles.installed(root)
    done = False
    if now is not None and now.version > version:
        raise ApplyError(
            f"{root} runs bundle {now.version}, newer than {version}: refused (rollback?)"
        )
    if now is None or now.version != version:
        root.mkdir(parents=True, exist_ok=True)
        download = root / f".download-{version}.tar.gz"
        try:
            fetch(f"{settings.rules_mirror_url}/rules-{version}.tar.gz", download)
            bundles.install(download, bundles.public_key_from_pem(pem), root)
        except bundles.BundleError as exc:
            raise ApplyError(f"bundle {version} refused: {exc}") from exc
        finally:
            download.unlink(missing_ok=True)
        done = True
    clamav_dir = Path(settings.clamav_db_dir)
    reloaded = sync_clamav(settings, root, clamav_dir, icap_control, probe_timeout_s)
    return Applied(version, done, reloaded, time.monotonic() - started)


def rollback(
    settings: TowerSettings,
    *,
    icap_control: str | None = ICAP_CONTROL,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
) -> Applied:
    """Go back to the bundle kept before the current one (blocking)."""
    started = time.monotonic()
    root, _ = _require(settings)
    try:
        change = bundles.rollback(root)
    except bundles.BundleError as exc:
        raise ApplyError(f"rollback refused: {exc}") from exc
    clamav_dir = Path(settings.clamav_db_dir)
    reloaded = sync_clamav(settings, root, clamav_dir, icap_control, probe_timeout_s)
    return Applied(change.version or None, True, reloaded, time.monotonic() - started)


def restore(
    settings: TowerSettings,
    version: int | None,
    *,
    icap_control: str | None = ICAP_CONTROL,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
) -> None:
    """After a failed request: make ``version`` (None: the shipped rules) current again — the
    install kept it for rollback — and the ClamAV side with it (blocking)."""
    root, _ = _require(settings)
    now = bundles.installed(root)
    if (now.version if now else None) != version:
        change = bundles.rollback(root)
        if (change.version or None) != version:
            raise ApplyError(f"{root}: went back to {change.version or 'shipped'}, not {version}")
    sync_clamav(settings, root, Path(settings.clamav_db_dir), icap_control, probe_timeout_s)


def wanted_clamav(root: Path) -> dict[str, bytes]:
    """The files clamd's directory must hold for the current bundle (name → content): its
    ClamAV section plus the probe signature; {} when no bundle is installed."""
    now = bundles.installed(root)
    if now is None:
        return {}
    section = now.path / "clamav"
    files = (
        {f"{PREFIX}{p.name}": p.read_bytes() for p in sorted(section.iterdir()) if p.is_file()}
        if section.is_dir()
        else {}
    )
    digest = hashlib.sha256()
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    files[PROBE_NAME] = probe_signature(digest.hexdigest()[:16])
    return files


def probe_text(token: str) -> bytes:
    return f"mailtower bundle probe {token}\n".encode()


def probe_signature(token: str) -> bytes:
    # .ndb: Name:TargetType:Offset:HexSignature (0 = any file, * = anywhere)
    return f"Mailtower.Bundle.Probe-{token}:0:*:{probe_text(token).hex()}\n".encode()


def local_engines(settings: TowerSettings) -> list[engines_mod.Engine]:
    """The whole-message engines that read this scanner's ClamAV directory: clamd, and an
    ICAP service on loopback (c-icap's clamav module). An ICAP server elsewhere (a commercial
    engine's appliance) has signatures of its own."""
    from mailtower.scanning.engines.icap import parse_icap_url

    local = []
    for engine in engines_mod.from_settings(settings):
        if engine.name == "icap":
            url = parse_icap_url(settings.icap_url or "")
            if url.host not in ("127.0.0.1", "localhost"):
                continue
        local.append(engine)
    return local


def _token(probe: bytes) -> str:
    return probe.split(b":", 1)[0].decode().rsplit("-", 1)[1]


def sync_clamav(
    settings: TowerSettings,
    root: Path,
    clamav_dir: Path,
    icap_control: str | None,
    probe_timeout_s: float,
) -> bool:
    """Make clamd's directory hold the current bundle's databases, and every local engine scan
    with them: reload clamd and c-icap when the files changed, or when an engine has not
    loaded them yet (a reload that failed before), then wait until each finds the probe (or,
    back on the shipped rules, no longer finds the old one). True: a reload was done."""
    wanted = wanted_clamav(root)
    present = {p.name for p in clamav_dir.glob(f"{PREFIX}*")}
    old_probe = (clamav_dir / PROBE_NAME).read_bytes() if PROBE_NAME in present else None
    changed = False
    for name, data in sorted(wanted.items()):
        path = clamav_dir / name
        if name in present and path.read_bytes() == data:
            continue
        write_durable(path, data, mode=0o644)
        changed = True
    for name in sorted(present - set(wanted)):
        (clamav_dir / name).unlink(missing_ok=True)
        changed = True
    engines = local_engines(settings)
    token = _token(wanted[PROBE_NAME]) if PROBE_NAME in wanted else None
    if not changed and (token is None or _probe_everywhere(engines, token)):
        return False
    from mailtower.scand.sigsync import reload_clamd, reload_icap

    names = {e.name for e in engines}
    if "clamd" in names and not reload_clamd(settings.clamd_socket):
        raise ApplyError(f"clamd at {settings.clamd_socket} did not take RELOAD; is it running?")
    if "icap" in names and icap_control and not reload_icap(icap_control):
        raise ApplyError(f"c-icap did not take its reload command at {icap_control}")
    if token is not None:
        wait_for_probe(engines, token, probe_timeout_s, present=True)
    elif old_probe is not None:
        wait_for_probe(engines, _token(old_probe), probe_timeout_s, present=False)
    return True


def _probe_everywhere(engines: list[engines_mod.Engine], token: str) -> bool:
    try:
        return all(_finds(engine, token) for engine in engines)
    except EngineError:
        return False


def _finds(engine: engines_mod.Engine, token: str) -> bool:
    name = f"Mailtower.Bundle.Probe-{token}"
    return any(f.name.startswith(name) for f in engine.scan(probe_text(token)))


def wait_for_probe(
    engines: list[engines_mod.Engine], token: str, timeout_s: float, *, present: bool
) -> None:
    """Scan the probe through each engine until each finds it (``present``) or none does."""
    deadline = time.monotonic() + timeout_s
    for engine in engines:
        while True:
            error: EngineError | None = None
            try:
                if _finds(engine, token) == present:
                    break
            except EngineError as exc:  # e.g. clamd busy loading: try again
                error = exc
            if time.monotonic() > deadline:
                raise ApplyError(
                    f"engine {engine.name} has not loaded the new ClamAV databases after "
                    f"{timeout_s:.0f} s (last error: {error or 'none'})"
                )
            time.sleep(PROBE_EVERY_S)


def current_version(settings: TowerSettings) -> int | None:
    if settings.rules_dir is None:
        return None
    now = bundles.installed(Path(settings.rules_dir))
    return now.version if now else None
