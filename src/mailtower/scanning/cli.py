"""``mailtower scan`` (the scanner's pipeline over .eml files, directories and Maildirs, with
no daemon) and ``mailtower signatures`` (the lab's ClamAV test signatures)."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mailtower import settings as settings_mod
from mailtower._text import json_line, shown
from mailtower.errors import SettingsError
from mailtower.scanning import testdata
from mailtower.scanning.errors import EngineError
from mailtower.scanning.scan import Kind, Verdict

if TYPE_CHECKING:
    from mailtower.scanning.pipeline import Pipeline

EXIT_CLEAN, EXIT_NOT_CLEAN, EXIT_USAGE = 0, 1, 2


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``signatures`` and ``scan`` to the ``mailtower`` command."""
    sigs = commands.add_parser("signatures", help="write the lab's ClamAV test signatures")
    sigs.add_argument("--out", type=Path, required=True, help="directory to write them into")
    sigs.set_defaults(func=_signatures)

    scan = commands.add_parser(
        "scan",
        help="scan .eml files, directories and Maildirs with the scanner's pipeline",
        description="Exit status: 0 every message clean, 1 any not clean, 2 usage or "
        "configuration error.",
    )
    scan.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    scan.add_argument(
        "--config", type=Path, help="tower settings JSON (e.g. /etc/mailtower/tower.json)"
    )
    scan.add_argument("--json", action="store_true", help="one JSON object per message per line")
    scan.add_argument(
        "--yara-rules",
        type=Path,
        action="append",
        metavar="DIR",
        help="add the YARA rules in DIR to the project's (repeatable)",
    )
    scan.add_argument("--clamd", metavar="SOCKET", help="add clamd at /path/to/socket or host:port")
    scan.add_argument(
        "--ban-ext",
        type=_extensions,
        action="append",
        metavar="EXT[,EXT…]",
        help="ban these file extensions too (repeatable)",
    )
    scan.set_defaults(func=_scan)


def _signatures(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name, content in sorted(testdata.clamav_signatures().items()):
        (out / name).write_text(content)
        print(out / name)
    return 0


class _UsageError(Exception):
    """A path, option or configuration the scan cannot work with (exit 2)."""


def _extensions(value: str) -> list[str]:
    """``--ban-ext exe,.SCR`` → ["exe", "scr"]."""
    from mailtower.scanning.pipeline import normalise_extension

    extensions = [normalise_extension(e) for e in value.split(",")]
    if not all(extensions):
        raise argparse.ArgumentTypeError(f"empty extension in {value!r} (e.g. --ban-ext exe,scr)")
    return extensions


def _scan_pipeline(args: argparse.Namespace) -> Pipeline:
    # Imported here: the other commands need not load YARA, TLSH and the Skeptic rules.
    from mailtower.scanning import pipeline
    from mailtower.scanning.engines.yara import rule_files
    from mailtower.scanning.errors import RuleError

    engine_timeout_s = 30.0
    if args.config is not None:
        # The tower's settings provide the limits; the engines stay those the options name,
        # so a copy of tower.json scans offline the same way without a reachable clamd.
        try:
            engine_timeout_s = settings_mod.load(args.config).limits.engine_timeout_s
        except SettingsError as exc:
            raise _UsageError(str(exc)) from exc
    yara_dirs: list[Path] = args.yara_rules or []
    for directory in yara_dirs:
        try:
            if not rule_files([directory]):
                raise _UsageError(f"{directory}: no .yar/.yara rule files in this directory")
        except EngineError as exc:
            raise _UsageError(str(exc)) from exc
    policy = pipeline.Policy().with_banned_extensions(
        e for group in args.ban_ext or [] for e in group
    )
    try:
        return pipeline.in_process(
            yara_dirs=yara_dirs,
            clamd=args.clamd,
            policy=policy,
            engine_timeout_s=engine_timeout_s,
        )
    except (EngineError, RuleError, ValueError, OSError) as exc:
        raise _UsageError(str(exc)) from exc


def message_files(root: Path) -> Iterator[Path]:
    """The messages under ``root``: itself if a file, else every regular file below it.

    In a Maildir (a directory with cur/ and new/) only cur/ and new/ hold messages: tmp/ holds
    deliveries in progress and the top level the mail server's index files. Maildir++ folders
    (.Sent/ …) below it are walked the same way. Symbolic links inside directories are skipped.
    """
    if not root.is_dir():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if {"cur", "new"} <= set(dirnames):
            dirnames[:] = [d for d in dirnames if d != "tmp"]
            filenames = []
        for name in sorted(filenames):
            path = Path(dirpath, name)
            try:
                if stat.S_ISREG(path.lstat().st_mode):
                    yield path
            except OSError:
                yield path  # vanished or unreadable: reading it reports why


def _finding_text(verdict: Verdict) -> str:
    text = ", ".join(f"{f.engine}:{f.name}@{f.part}" for f in verdict.findings)
    if verdict.kind is Kind.TEMPFAIL:
        text = "; ".join(t for t in (verdict.reason, text) if t)
    return f" ({text})" if text else ""


def _scan(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"mailtower scan: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        pipeline = _scan_pipeline(args)
    except _UsageError as exc:
        print(f"mailtower scan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    status = EXIT_CLEAN
    unreadable = False
    for root in args.paths:
        for path in message_files(root):
            try:
                raw = path.read_bytes()
            except OSError as exc:
                print(
                    f"mailtower scan: {shown(path)}: cannot read: {exc.strerror}", file=sys.stderr
                )
                unreadable = True  # not scanned is not clean; exit 2 says "look at stderr"
                continue
            verdict = pipeline.scan(raw)
            if verdict.kind is not Kind.CLEAN:
                status = EXIT_NOT_CLEAN
            if args.json:
                findings = [
                    {"engine": f.engine, "name": f.name, "part": f.part} for f in verdict.findings
                ]
                line = {"path": str(path), "verdict": str(verdict.kind), "findings": findings}
                print(json_line(line), flush=True)
            else:
                print(shown(f"{path}: {verdict.kind}{_finding_text(verdict)}"), flush=True)
    return EXIT_USAGE if unreadable else status
