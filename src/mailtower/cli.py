"""``mailtower``: operator commands (quarantine, signatures, scan, rule bundles, dns)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import stat
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from mailtower import settings as settings_mod
from mailtower.errors import SettingsError
from mailtower.goc.sync import cli as sync_cli
from mailtower.scand.errors import QuarantineError
from mailtower.scand.quarantine import QuarantineStore
from mailtower.scanning import testdata
from mailtower.scanning.errors import EngineError
from mailtower.scanning.scan import Kind, Verdict
from mailtower.settings import TowerSettings

if TYPE_CHECKING:
    from mailtower.scanning.pipeline import Pipeline


def shown(text: object) -> str:
    """``text`` safe to print on a terminal: every character that is not printable (ESC, BEL,
    DEL, C1 controls, bidi overrides, line separators, and the lone surrogates that stand for
    bytes that were not UTF-8) as a backslash escape, and backslash itself doubled, so what
    mail put there can neither drive the terminal nor pass for something else."""
    out = []
    for char in str(text):
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte that was not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON spells a character beyond the BMP as its UTF-16 pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_line(value: object) -> str:
    """``value`` as one line of JSON with readable text, but every character ``shown`` would
    escape written as ``\\uXXXX``: the same JSON value, safe on a terminal."""
    text = json.dumps(value, ensure_ascii=False)  # outside strings, all printable ASCII
    return "".join(c if c.isprintable() else _json_escape(c) for c in text)


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
        findings = ",".join(str(f.get("name", "?")) for f in e.meta.get("findings", []))
        sender = e.meta.get("envelope", {}).get("mail_from", "")
        verdict = e.meta.get("verdict", "?")
        released = f"  [released {e.meta['released_at']}]" if e.meta.get("released_at") else ""
        line = f"{e.id}  {e.meta.get('size_bytes', 0):>9}  {verdict:<13}  <{sender}>  {findings}"
        print(shown(line + released))
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


def _quarantine_delete(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        entry = store.get(args.id)
        store.delete(entry.id)
    except QuarantineError as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mailtower: {shown(args.id)}: cannot delete: {exc.strerror}", file=sys.stderr)
        return 1
    verdict = shown(entry.meta.get("verdict", "?"))
    print(f"{entry.id} deleted ({verdict}, never delivered from here)")
    return 0


def _operator() -> str:
    """Who runs the command: the sudo caller if any, else the login user."""
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (OSError, KeyError):
        user = ""
    return "".join(c for c in user if c.isprintable() and c not in " ;") or "unknown"


def _release_options(raw: bytes, mail_from: str, rcpt_tos: list[str]) -> list[str]:
    """MAIL FROM options the message needs (the store keeps no options; sent if offered)."""
    options = []
    if any(b > 0x7F for b in raw):
        options.append("BODY=8BITMIME")
    if not all(addr.isascii() for addr in [mail_from, *rcpt_tos]):
        options.append("SMTPUTF8")
    return options


def _quarantine_release(args: argparse.Namespace) -> int:
    from mailtower.scand.errors import ReinjectError
    from mailtower.scand.reinject import reinject, relay_address

    try:
        settings = settings_mod.load(args.settings)
    except SettingsError as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    # The spool of the settings that name the relay, unless --spool says otherwise.
    store = QuarantineStore(Path(args.spool or settings.spool_dir) / "quarantine")
    try:
        entry = store.get(args.id)
    except QuarantineError as exc:
        print(f"mailtower: {exc}", file=sys.stderr)
        return 1
    if entry.meta.get("released_at") and not args.force:
        print(
            f"mailtower: {entry.id} was already released at {entry.meta['released_at']} "
            f"by {entry.meta.get('released_by', '?')}; use --force to release it again",
            file=sys.stderr,
        )
        return 1
    envelope = entry.meta.get("envelope") or {}
    mail_from = str(envelope.get("mail_from", ""))
    rcpt_tos = [str(r) for r in envelope.get("rcpt_tos", [])]
    if not rcpt_tos:
        print(f"mailtower: {entry.id} has no recipients in its envelope", file=sys.stderr)
        return 1
    try:
        raw = entry.message_path.read_bytes()
    except OSError as exc:
        print(f"mailtower: {entry.message_path}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    user = _operator()
    header = (
        f"X-Mailtower-Released: {now.isoformat(timespec='seconds')}; by={user}\r\n"
        f"X-Mailtower-Verdict: released; was={entry.meta.get('verdict', 'unknown')}; "
        f"tower={settings.name}; id={entry.id}\r\n"
    ).encode()
    try:
        answer = reinject(
            settings,
            raw,
            mail_from,
            rcpt_tos,
            _release_options(raw, mail_from, rcpt_tos),
            header=header,
        )
    except ReinjectError as exc:
        print(
            f"mailtower: release of {entry.id} to the relay {relay_address(settings)} failed: "
            f"{shown(exc)}; not marked released",
            file=sys.stderr,
        )
        return 1
    try:
        store.mark_released(entry.id, at=now, by=user, relay_answer=answer)
    except OSError as exc:
        print(
            f"mailtower: {entry.id} was delivered to the relay ({shown(answer)}) but could not be "
            f"marked released: {exc}",
            file=sys.stderr,
        )
        return 1
    print(f"{entry.id} released to {relay_address(settings)}: {shown(answer)}")
    return 0


def _signatures(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name, content in sorted(testdata.clamav_signatures().items()):
        (out / name).write_text(content)
        print(out / name)
    return 0


# -- scan ----------------------------------------------------------------------------------------

EXIT_CLEAN, EXIT_NOT_CLEAN, EXIT_USAGE = 0, 1, 2


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
    from mailtower.scanning.skeptic import RuleError

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


# -- bundle --------------------------------------------------------------------------------------

EXIT_REFUSED = 1  # bundle commands: refused or failed (the reason is printed); 2: usage


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive version number")
    return number


def _bundle_refused(args: argparse.Namespace, exc: Exception, *, key_is_usage: bool = True) -> int:
    """Print why (stderr; JSON on stdout with --json); exit 2 for key files given, else 1."""
    from mailtower.bundles import BundleError, InstallError, KeyFileError

    code = exc.code if isinstance(exc, BundleError) else "error"
    what = "failed" if type(exc) in (BundleError, InstallError, KeyFileError) else "refused"
    print(f"mailtower bundle {args.bcommand}: {what} ({code}): {exc}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "refused": code, "reason": str(exc)}))
    # A key file that cannot be read is the caller's configuration, not the bundle's fault.
    return EXIT_USAGE if key_is_usage and isinstance(exc, KeyFileError) else EXIT_REFUSED


def _bundle_keygen(args: argparse.Namespace) -> int:
    from mailtower import bundles

    try:
        private, public = bundles.keygen(args.out)
        key = bundles.key_id(bundles.load_public_key(public))
    except bundles.BundleError as exc:
        return _bundle_refused(args, exc, key_is_usage=False)  # e.g. a key already there
    print(f"{private} (secret: keep it at the GOC only)\n{public} (deploy to every tower)")
    print(f"key id {key}")
    return 0


def _bundle_build(args: argparse.Namespace) -> int:
    from mailtower import bundles

    try:
        key = bundles.load_signing_key(args.key)
        built = bundles.build(args.rules_dir, key, args.version, args.output)
    except bundles.BundleError as exc:
        return _bundle_refused(args, exc)
    for name in built.skipped:
        print(f"mailtower bundle build: not bundled: {name} (not a rule file)", file=sys.stderr)
    manifest = built.manifest
    print(
        f"{args.output}: bundle version {manifest.version}, {len(manifest.files)} files, "
        f"signed by key {manifest.key_id}"
    )
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    from mailtower import bundles

    try:
        bundle = bundles.verify(
            args.file, bundles.load_public_key(args.pubkey), current=args.current
        )
    except bundles.BundleError as exc:
        return _bundle_refused(args, exc)
    manifest = bundle.manifest
    if args.json:
        doc = {
            "ok": True,
            "version": manifest.version,
            "created": manifest.created,
            "key_id": manifest.key_id,
            "files": sorted(manifest.files),
        }
        print(json.dumps(doc))
    else:
        print(
            f"{args.file}: OK: bundle version {manifest.version}, created {manifest.created}, "
            f"{len(manifest.files)} files, signed by key {manifest.key_id}, rules load"
        )
    return 0


def _bundle_install(args: argparse.Namespace) -> int:
    from mailtower import bundles

    try:
        change = bundles.install(args.file, bundles.load_public_key(args.pubkey), args.rules_root)
    except bundles.BundleError as exc:
        return _bundle_refused(args, exc)
    kept = (
        f"version {change.previous} kept for rollback"
        if change.previous is not None
        else "no older one"
    )
    print(f"{args.rules_root}: bundle version {change.version} installed ({kept})")
    print("scand uses it after a reload: systemctl reload mailtower-scand")
    return 0


def _bundle_rollback(args: argparse.Namespace) -> int:
    from mailtower import bundles

    try:
        change = bundles.rollback(args.rules_root)
    except bundles.BundleError as exc:
        return _bundle_refused(args, exc)
    removed = ", ".join(map(str, change.removed)) or "none"
    back = f"bundle version {change.version}" if change.version else "the shipped rules"
    print(f"{args.rules_root}: back to {back} (removed: {removed})")
    print("scand uses it after a reload: systemctl reload mailtower-scand")
    return 0


def _bundle_publish(args: argparse.Namespace) -> int:
    from mailtower import bundles

    try:
        done = bundles.publish(
            args.file, bundles.load_public_key(args.pubkey), args.dir, keep=args.keep
        )
    except bundles.BundleError as exc:
        return _bundle_refused(args, exc)
    if args.json:
        print(json.dumps({"ok": True, **json.loads(done.latest.to_bytes())}))
    else:
        print(f"published version {done.version} at {args.dir}")
        if done.removed:
            print(f"removed older bundles: {', '.join(map(str, done.removed))}")
    return 0


def _bundle_status(args: argparse.Namespace) -> int:
    from mailtower import bundles

    try:
        state = bundles.status(args.rules_root)
    except bundles.BundleError as exc:
        return _bundle_refused(args, exc)
    if args.json:
        print(json.dumps(state))
    else:
        current = state["current"] if state["current"] is not None else "none (shipped rules)"
        previous = state["previous"] if state["previous"] is not None else "none"
        print(f"{args.rules_root}: current {current}, kept for rollback {previous}")
    return 0


def _add_bundle_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bundle = commands.add_parser(
        "bundle",
        help="signed rule bundles: keys, build, verify, publish, install, rollback",
        description="Exit status: 0 done, 1 refused or failed (the reason is printed), "
        "2 usage error or unreadable key file.",
    )
    bcommands = bundle.add_subparsers(dest="bcommand", metavar="ACTION", required=True)

    keygen = bcommands.add_parser("keygen", help="write a new signing.key + signing.pub")
    keygen.add_argument("--out", type=Path, required=True, metavar="DIR")
    keygen.set_defaults(func=_bundle_keygen)

    build = bcommands.add_parser("build", help="build and sign a bundle from a rules directory")
    build.add_argument(
        "rules_dir",
        type=Path,
        metavar="RULES_DIR",
        help="with yara/, skeptic/, reputation/, clamav/",
    )
    build.add_argument("--key", type=Path, required=True, help="signing.key")
    build.add_argument(
        "--version",
        type=_positive_int,
        required=True,
        metavar="N",
        help="bundle version: higher than every bundle published before",
    )
    build.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    build.set_defaults(func=_bundle_build)

    verify = bcommands.add_parser(
        "verify",
        help="check a bundle: signature, contents, rules load (and newer than --current)",
        description="Exit status: 0 authentic, intact, rules load and newer than --current; "
        "1 refused (the reason is printed); 2 usage error or unreadable public key.",
    )
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.add_argument("--pubkey", type=Path, required=True, help="signing.pub")
    verify.add_argument(
        "--current", type=int, metavar="N", help="the version in use: the bundle must be newer"
    )
    verify.add_argument("--json", action="store_true", help="one JSON object for programs")
    verify.set_defaults(func=_bundle_verify)

    install = bcommands.add_parser(
        "install", help="verify a bundle and make it the current rules under --rules-root"
    )
    install.add_argument("file", type=Path, metavar="FILE")
    install.add_argument("--pubkey", type=Path, required=True, help="signing.pub")
    rollback = bcommands.add_parser(
        "rollback", help="go back to the version kept before the current one"
    )
    status = bcommands.add_parser("status", help="the installed and the kept version")
    status.add_argument("--json", action="store_true", help="one JSON object for programs")
    for sub in (install, rollback, status):
        sub.add_argument(
            "--rules-root",
            type=Path,
            required=True,
            metavar="DIR",
            help="scand's rules_dir (e.g. /var/lib/mailtower/rules)",
        )
    install.set_defaults(func=_bundle_install)

    publish = bcommands.add_parser(
        "publish",
        help="verify a bundle and publish it in --dir (latest.json + rules-N.tar.gz)",
        description="Exit status: 0 published; 1 refused (the reason is printed, nothing "
        "changed in DIR); 2 usage error or unreadable public key.",
    )
    publish.add_argument("file", type=Path, metavar="FILE")
    publish.add_argument("--pubkey", type=Path, required=True, help="signing.pub")
    publish.add_argument(
        "--dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the published directory (e.g. /srv/mailtower/bundles)",
    )
    publish.add_argument(
        "--keep",
        type=_positive_int,
        default=5,
        metavar="N",
        help="bundle files kept in DIR, newest first (default 5)",
    )
    publish.add_argument("--json", action="store_true", help="one JSON object for programs")
    publish.set_defaults(func=_bundle_publish)
    rollback.set_defaults(func=_bundle_rollback)
    status.set_defaults(func=_bundle_status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailtower", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    quarantine = commands.add_parser(
        "quarantine", help="inspect and release a scanner's quarantine"
    )
    qcommands = quarantine.add_subparsers(dest="qcommand", metavar="ACTION", required=True)
    qlist = qcommands.add_parser("list", help="list quarantined messages, oldest first")
    qlist.add_argument("--json", action="store_true", help="JSON for programs")
    qshow = qcommands.add_parser("show", help="show one quarantined message's metadata")
    qshow.add_argument("id")
    qrelease = qcommands.add_parser(
        "release",
        help="re-inject a quarantined message to the relay with its original envelope",
        description="Exit status: 0 released, 1 unknown id, already released (without "
        "--force), settings or relay error.",
    )
    qrelease.add_argument("id")
    qrelease.add_argument(
        "--settings",
        type=Path,
        default=settings_mod.SETTINGS_PATH,
        help=f"tower settings JSON naming the relay (default: {settings_mod.SETTINGS_PATH})",
    )
    qrelease.add_argument("--force", action="store_true", help="release again if released")
    qdelete = qcommands.add_parser(
        "delete", help="delete a quarantined message and its metadata for good"
    )
    qdelete.add_argument("id")
    for sub in (qlist, qshow, qrelease, qdelete):
        sub.add_argument(
            "--spool",
            type=Path,
            default=None,
            help="spool directory (default: spool_dir of this host's settings)",
        )
    qlist.set_defaults(func=_quarantine_list)
    qshow.set_defaults(func=_quarantine_show)
    qrelease.set_defaults(func=_quarantine_release)
    qdelete.set_defaults(func=_quarantine_delete)

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

    _add_bundle_parser(commands)
    sync_cli.add_parser(commands)
    _add_controller_parsers(commands)
    return parser


def _add_controller_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The controller's commands (``dns``), where the controller's code is installed.

    The hosts' wheel leaves ``mailtower.controller`` out (pyproject), so on a tower host
    ``mailtower dns`` is an unknown command rather than an import error at start-up.
    """
    try:
        from mailtower.controller.dns import cli as dns_cli
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("mailtower.controller"):
            raise  # a missing dependency of the controller's code is a real error
        return
    dns_cli.add_parser(commands)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2 with a message
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
