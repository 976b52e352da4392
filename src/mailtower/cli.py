"""``mailtower``: operator commands (quarantine, signatures)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mailtower import settings as settings_mod
from mailtower import testdata
from mailtower.quarantine import QuarantineError, QuarantineStore
from mailtower.settings import SettingsError, TowerSettings


def _default_spool() -> Path:
    """The spool of this host's settings, or the model's default when there are none."""
    try:
        return Path(settings_mod.load().spool_dir)
    except SettingsError:
        return Path(TowerSettings.model_fields["spool_dir"].default)


def _store(args: argparse.Namespace) -> QuarantineStore:
    spool = args.spool if args.spool is not None else _default_spool()
    return QuarantineStore(spool / "quarantine")


def _quarantine_list(args: argparse.Namespace) -> int:
    entries = _store(args).list()
    if args.json:
        print(json.dumps([e.meta for e in entries], indent=2))
        return 0
    if not entries:
        print("quarantine is empty")
        return 0
    for e in entries:
        findings = ",".join(f["name"] for f in e.meta.get("findings", []))
        sender = e.meta.get("envelope", {}).get("mail_from", "")
        print(f"{e.id}  {e.meta.get('size_bytes', 0):>9}  <{sender}>  {findings}")
    return 0


def _quarantine_show(args: argparse.Namespace) -> int:
    try:
        entry = _store(args).get(args.id)
    except QuarantineError as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(entry.meta, indent=2))
    print(f"message: {entry.message_path}")
    return 0


def _signatures(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name, content in sorted(testdata.clamav_signatures().items()):
        (out / name).write_text(content)
        print(out / name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailtower", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    quarantine = commands.add_parser("quarantine", help="inspect a scanner's quarantine")
    qcommands = quarantine.add_subparsers(dest="qcommand", metavar="ACTION", required=True)
    qlist = qcommands.add_parser("list", help="list quarantined messages, oldest first")
    qlist.add_argument("--json", action="store_true", help="JSON for programs")
    qshow = qcommands.add_parser("show", help="show one quarantined message's metadata")
    qshow.add_argument("id")
    for sub in (qlist, qshow):
        sub.add_argument(
            "--spool",
            type=Path,
            default=None,
            help="spool directory (default: spool_dir of this host's settings)",
        )
    qlist.set_defaults(func=_quarantine_list)
    qshow.set_defaults(func=_quarantine_show)

    sigs = commands.add_parser("signatures", help="write the lab's ClamAV test signatures")
    sigs.add_argument("--out", type=Path, required=True, help="directory to write them into")
    sigs.set_defaults(func=_signatures)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2 with a message
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
