"""Syntax check of a bundle's ClamAV databases before any clamd is asked to load them.

With ``clamscan`` on the machine (Debian's clamav package), libclamav itself loads the
directory: exactly the parser clamd will use. Without it, a strict parser accepts a
conservative subset of the .ndb and hash formats and refuses the rest (.ldb needs clamscan):
it may refuse a signature clamd would take, never the other way round.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from mailtower.bundles._errors import InvalidRules

CLAMSCAN_TIMEOUT_S = 120.0
_PROBE = b"mailtower rule bundle check\n"


def find_clamscan() -> str | None:
    """The clamscan program, if installed (tests replace this to exercise the parser)."""
    return shutil.which("clamscan")


def check_directory(directory: Path, *, shown_as: str = "clamav") -> None:
    """Raise InvalidRules if any database in ``directory`` does not load."""
    databases = sorted(p for p in directory.iterdir() if p.is_file())
    if not databases:
        return
    clamscan = find_clamscan()
    if clamscan is not None:
        _clamscan(clamscan, directory, shown_as)
        return
    for path in databases:
        check_file(path.name, path.read_bytes(), shown_as=shown_as)


def _clamscan(clamscan: str, directory: Path, shown_as: str) -> None:
    with tempfile.TemporaryDirectory(prefix="mailtower-clamcheck-") as tmp:
        probe = Path(tmp, "probe.txt")
        probe.write_bytes(_PROBE)
        try:
            done = subprocess.run(
                [clamscan, "--no-summary", "--infected", f"--database={directory}", str(probe)],
                capture_output=True,
                text=True,
                timeout=CLAMSCAN_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            message = f"{shown_as}: clamscan could not check the databases: {exc}"
            raise InvalidRules(message) from exc
    # 0: loaded, nothing found; 1: loaded and a signature matched the probe (still valid).
    if done.returncode in (0, 1):
        return
    errors = [
        line.replace(f"{directory}/", f"{shown_as}/")
        for line in (done.stderr + done.stdout).splitlines()
        if "error" in line.lower()
    ]
    raise InvalidRules(
        f"{shown_as}: ClamAV does not load these databases: "
        + ("; ".join(errors) or f"clamscan exited {done.returncode}")
    )


# -- the strict parser (no clamscan) -------------------------------------------------------------

_NAME = r"[^:\s][^:]*"
_HASH = r"(?:[0-9a-fA-F]{32}|[0-9a-fA-F]{40}|[0-9a-fA-F]{64})"
_SIZE = r"(?:[0-9]+|\*)"
_FLEVEL = r"(?::[0-9]+)?"
_HASH_LINE = re.compile(rf"{_HASH}:{_SIZE}:{_NAME}{_FLEVEL}")  # .hdb .hsb .fp .sfp
_SECTION_LINE = re.compile(rf"{_SIZE}:{_HASH}:{_NAME}{_FLEVEL}")  # .mdb .msb
_IGNORE_LINE = re.compile(r"[^:\s]+")  # .ign2: a signature name per line
_NDB_LINE = re.compile(
    rf"(?P<name>{_NAME}):(?P<target>[0-9]|1[0-4]):(?P<offset>[^:]+):(?P<hex>[^:]+)"
    r"(?::[0-9]+(?::[0-9]+)?)?"
)
_NDB_OFFSET = re.compile(
    r"(?:\*|[0-9]+|EOF-[0-9]+|EP[+-][0-9]+|S[0-9]+\+[0-9]+|SE[0-9]+|SL\+[0-9]+)"
)
_NDB_MAXSHIFT = re.compile(r",[0-9]+")
# One token of an .ndb body: a byte, a nibble wildcard, a gap, or an alternative of bytes.
_HEX_TOKEN = re.compile(
    r"(?P<byte>[0-9a-fA-F]{2})"
    r"|(?P<wild>\?\?|[0-9a-fA-F]\?|\?[0-9a-fA-F])"
    r"|(?P<star>\*)"
    r"|(?P<gap>\{(?:[0-9]+|[0-9]+-|-[0-9]+|[0-9]+-[0-9]+)\}|\[[0-9]+-[0-9]+\])"
    r"|(?P<alt>!?\((?:[0-9a-fA-F]{2})+(?:\|(?:[0-9a-fA-F]{2})+)+\))"
)
_LINE_FORMATS = {
    ".hdb": _HASH_LINE,
    ".hsb": _HASH_LINE,
    ".fp": _HASH_LINE,
    ".sfp": _HASH_LINE,
    ".mdb": _SECTION_LINE,
    ".msb": _SECTION_LINE,
    ".ign2": _IGNORE_LINE,
}


def check_file(name: str, data: bytes, *, shown_as: str = "clamav") -> None:
    """Check one database without clamscan; raise InvalidRules naming file and line."""
    where = f"{shown_as}: {shown_as}/{name}"  # "<section>: " first, as for the others
    suffix = Path(name).suffix
    if suffix != ".ndb" and suffix not in _LINE_FORMATS:
        raise InvalidRules(
            f"{where}: {suffix} databases can only be checked by clamscan (install clamav)"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise InvalidRules(f"{where}: not ASCII text ({exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    if not lines:
        raise InvalidRules(f"{where}: empty database")
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if line.startswith("#"):
            continue  # libclamav skips comment lines
        problem = _ndb_problem(line) if suffix == ".ndb" else _line_problem(suffix, line)
        if problem:
            raise InvalidRules(f"{where}:{number}: {problem}: {line[:80]!r}")


def _line_problem(suffix: str, line: str) -> str | None:
    if not line:
        return "empty line (libclamav refuses it)"
    return None if _LINE_FORMATS[suffix].fullmatch(line) else f"not a {suffix} signature"


def _ndb_problem(line: str) -> str | None:
    if not line:
        return "empty line (libclamav refuses it)"
    match = _NDB_LINE.fullmatch(line)
    if match is None:
        return "not Name:TargetType:Offset:HexSignature[:MinFL[:MaxFL]]"
    offset = match["offset"]
    base, comma, shift = offset.partition(",")
    if not _NDB_OFFSET.fullmatch(base) or (comma and not _NDB_MAXSHIFT.fullmatch("," + shift)):
        return f"bad offset {offset!r}"
    body = match["hex"]
    position, literal, part_literal, parts = 0, 0, 0, []
    while position < len(body):
        token = _HEX_TOKEN.match(body, position)
        if token is None:
            return f"bad hex signature at character {position + 1}"
        if token["byte"]:
            literal += 1
            part_literal += 1
        elif token["star"]:
            parts.append(part_literal)
            part_literal = 0
        position = token.end()
    parts.append(part_literal)
    # libclamav: a body needs 3 literal bytes, each part between '*' at least 2 ("too short").
    if literal < 3 or min(parts) < 2:
        return "signature too short (at least 3 bytes, 2 between '*')"
    return None
