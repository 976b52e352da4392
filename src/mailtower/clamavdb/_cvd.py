"""One database file: its header, its signature (``sigtool --info``) and a CDIFF chain
(``sigtool --unpack`` + ``--run-cdiff``, compared with the CVD it must lead to)."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mailtower.clamavdb.errors import DatabaseError

MAGIC = b"ClamAV-VDB:"
HEADER_SIZE = 512
# sigtool on main.cvd (~170 MB) takes seconds; a hung one must not hold the timer forever.
SIGTOOL_TIMEOUT_S = 600.0
_CDIFF_NAME = re.compile(r"^(?P<db>[a-z0-9_-]+?)-(?P<version>[0-9]+)\.cdiff$")
_DB_FILE = re.compile(r"^(?P<db>[a-z0-9_-]+)\.(?P<ext>cvd|cld)$")
_TIME_DASH = re.compile(r"(\d\d)-(\d\d)")  # the header spells 21:34 as 21-34 (":" separates)


@dataclass(frozen=True)
class CvdHeader:
    """The first fields of a CVD/CLD header ("ClamAV-VDB:built:version:sigs:flevel:…")."""

    version: int
    built: str  # as sigtool shows it: "22 Jun 2021 21:34 -0400"
    sigs: int
    flevel: int


def read_header(path: Path) -> CvdHeader:
    """The header in the first 512 bytes of a .cvd or .cld (no signature check)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(HEADER_SIZE)
    except OSError as exc:
        raise DatabaseError(f"{path}: cannot read the database header: {exc}") from None
    fields = raw.split(b":")
    if not raw.startswith(MAGIC) or len(raw) < HEADER_SIZE or len(fields) < 5:
        raise DatabaseError(
            f"{path}: not a ClamAV database (no 512-byte ClamAV-VDB header); "
            "fix: fetch the file again from the mirror"
        )
    try:
        built = _TIME_DASH.sub(r"\1:\2", fields[1].decode("ascii").strip())
        version, sigs, flevel = (int(f) for f in fields[2:5])
    except (UnicodeDecodeError, ValueError):
        raise DatabaseError(
            f"{path}: malformed ClamAV-VDB header {raw[:80]!r}; fix: fetch the file again"
        ) from None
    return CvdHeader(version=version, built=built, sigs=sigs, flevel=flevel)


def verify_cvd(path: Path) -> CvdHeader:
    """The header of ``path`` once ``sigtool --info`` says its digital signature is ClamAV's."""
    header = read_header(path)
    out = _sigtool(["--info", str(path.resolve())], what=f"{path}: signature check")
    if "Verification OK." not in out or _error_in(out):
        raise DatabaseError(
            f"{path}: refused: sigtool --info does not verify it ({_tail(out)}); the file is "
            "damaged or not signed by ClamAV; fix: fetch it again (the published copy is kept)"
        )
    return header


def verify_chain(base: Path, cdiffs: list[Path], new: Path, work: Path | None = None) -> None:
    """Apply ``cdiffs`` (each signature-checked by sigtool) to the unpacked ``base``; the result
    must equal the unpacked ``new`` byte for byte. Raises DatabaseError naming the bad file."""
    first, last = read_header(base).version, read_header(new).version
    expected = list(range(first + 1, last + 1))
    found = [_cdiff_version(p) for p in cdiffs]
    if found != expected:
        raise DatabaseError(
            f"{new}: the CDIFFs {[p.name for p in cdiffs]} do not lead from version {first} "
            f"({base}) to {last}: versions {expected} are needed, in order"
        )
    # ``work``: a directory on the mirror's own disk (main.cvd unpacks to hundreds of MB; /tmp
    # may be in RAM)
    with tempfile.TemporaryDirectory(prefix="mt-cdiff-chain-", dir=work) as tmp:
        applied, unpacked = Path(tmp) / "applied", Path(tmp) / "new"
        _unpack(base, applied)
        for cdiff in cdiffs:
            out = _sigtool(
                [f"--run-cdiff={cdiff.resolve()}"], what=f"{cdiff}: applying it", cwd=applied
            )
            if _error_in(out):
                raise DatabaseError(
                    f"{cdiff}: refused: sigtool --run-cdiff fails on it ({_tail(out)}); the "
                    "CDIFF is damaged, not signed by ClamAV or not for this base; fix: fetch "
                    "it again (the published files are kept)"
                )
        _unpack(new, unpacked)
        difference = _tree_difference(applied, unpacked)
        if difference:
            raise DatabaseError(
                f"{new}: refused: the CDIFFs from version {first} do not give this CVD "
                f"({difference}); fix: fetch the CVD and its CDIFFs again"
            )


def live_versions(directory: Path) -> dict[str, int]:
    """``{db: version}`` of the <db>.cvd / <db>.cld in ``directory`` (the .cld when both)."""
    found: dict[str, tuple[str, int]] = {}
    try:
        names = sorted(p.name for p in directory.iterdir())
    except FileNotFoundError:
        return {}
    for name in names:
        match = _DB_FILE.match(name)
        if match is None:
            continue
        db, ext = match["db"], match["ext"]
        if db in found and found[db][0] == "cld":
            continue
        found[db] = (ext, read_header(directory / name).version)
    return {db: version for db, (_, version) in sorted(found.items())}


def _cdiff_version(path: Path) -> int:
    match = _CDIFF_NAME.match(path.name)
    if match is None:
        raise DatabaseError(f"{path}: not named <database>-<version>.cdiff")
    return int(match["version"])


def _unpack(cvd: Path, into: Path) -> None:
    into.mkdir()
    out = _sigtool(["--unpack", str(cvd.resolve())], what=f"{cvd}: unpacking it", cwd=into)
    if _error_in(out) or not any(into.iterdir()):
        raise DatabaseError(
            f"{cvd}: refused: sigtool --unpack fails on it ({_tail(out)}); fix: fetch it again"
        )


def _tree_difference(left: Path, right: Path) -> str:
    """'' when both trees hold the same files with the same bytes, else the first difference."""

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}

    mine, theirs = files(left), files(right)
    if mine != theirs:
        return f"files only after the CDIFFs: {sorted(mine - theirs)}, only in the CVD: " + str(
            sorted(theirs - mine)
        )
    for name in sorted(mine):
        if not filecmp.cmp(left / name, right / name, shallow=False):
            return f"{name} differs"
    return ""


def _sigtool(args: list[str], *, what: str, cwd: Path | None = None) -> str:
    """sigtool's stdout + stderr (its exit status is not reliable: callers parse the text)."""
    program = shutil.which("sigtool")
    if program is None:
        raise DatabaseError(
            f"{what}: sigtool is not installed; fix: install Debian's clamav package"
        )
    try:
        done = subprocess.run(
            [program, *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=SIGTOOL_TIMEOUT_S,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except subprocess.TimeoutExpired:
        raise DatabaseError(
            f"{what}: sigtool did not finish within {SIGTOOL_TIMEOUT_S:.0f} s; fix: check the "
            "machine's load and disk, then run again"
        ) from None
    out = done.stdout + done.stderr
    if done.returncode != 0 and not _error_in(out):
        out += f"\nERROR: sigtool exited with status {done.returncode}"
    return out


def _error_in(out: str) -> bool:
    return any(
        line.startswith(("ERROR", "LibClamAV Error")) or "error" in line.lower().split(":")[0]
        for line in out.splitlines()
    )


def _tail(out: str) -> str:
    lines = [line.strip() for line in out.splitlines() if "rror" in line] or out.splitlines()
    return "; ".join(lines[-3:])[-400:] or "no output"
