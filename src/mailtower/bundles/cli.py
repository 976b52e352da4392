"""``mailtower bundle keygen|build|verify|publish|install|rollback|status``: signed rule
bundles, from the GOC's signing key to a tower's rules root."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mailtower import bundles
from mailtower.bundles import BundleError, InstallError, KeyFileError

# Refused or failed: the reason is printed. Usage error or unreadable key file given: 2.
EXIT_REFUSED, EXIT_USAGE = 1, 2


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bundle`` and its actions to the ``mailtower`` command."""
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
    code = exc.code if isinstance(exc, BundleError) else "error"
    what = "failed" if type(exc) in (BundleError, InstallError, KeyFileError) else "refused"
    print(f"mailtower bundle {args.bcommand}: {what} ({code}): {exc}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "refused": code, "reason": str(exc)}))
    # A key file that cannot be read is the caller's configuration, not the bundle's fault.
    return EXIT_USAGE if key_is_usage and isinstance(exc, KeyFileError) else EXIT_REFUSED


def _bundle_keygen(args: argparse.Namespace) -> int:
    try:
        private, public = bundles.keygen(args.out)
        key = bundles.key_id(bundles.load_public_key(public))
    except BundleError as exc:
        return _bundle_refused(args, exc, key_is_usage=False)  # e.g. a key already there
    print(f"{private} (secret: keep it at the GOC only)\n{public} (deploy to every tower)")
    print(f"key id {key}")
    return 0


def _bundle_build(args: argparse.Namespace) -> int:
    try:
        key = bundles.load_signing_key(args.key)
        built = bundles.build(args.rules_dir, key, args.version, args.output)
    except BundleError as exc:
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
    try:
        bundle = bundles.verify(
            args.file, bundles.load_public_key(args.pubkey), current=args.current
        )
    except BundleError as exc:
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
    try:
        change = bundles.install(args.file, bundles.load_public_key(args.pubkey), args.rules_root)
    except BundleError as exc:
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
    try:
        change = bundles.rollback(args.rules_root)
    except BundleError as exc:
        return _bundle_refused(args, exc)
    removed = ", ".join(map(str, change.removed)) or "none"
    back = f"bundle version {change.version}" if change.version else "the shipped rules"
    print(f"{args.rules_root}: back to {back} (removed: {removed})")
    print("scand uses it after a reload: systemctl reload mailtower-scand")
    return 0


def _bundle_publish(args: argparse.Namespace) -> int:
    try:
        done = bundles.publish(
            args.file, bundles.load_public_key(args.pubkey), args.dir, keep=args.keep
        )
    except BundleError as exc:
        return _bundle_refused(args, exc)
    if args.json:
        print(json.dumps({"ok": True, **json.loads(done.latest.to_bytes())}))
    else:
        print(f"published version {done.version} at {args.dir}")
        if done.removed:
            print(f"removed older bundles: {', '.join(map(str, done.removed))}")
    return 0


def _bundle_status(args: argparse.Namespace) -> int:
    try:
        state = bundles.status(args.rules_root)
    except BundleError as exc:
        return _bundle_refused(args, exc)
    if args.json:
        print(json.dumps(state))
    else:
        current = state["current"] if state["current"] is not None else "none (shipped rules)"
        previous = state["previous"] if state["previous"] is not None else "none"
        print(f"{args.rules_root}: current {current}, kept for rollback {previous}")
    return 0
