"""Write a pair from its answers: both towers' inventories, the GOC's, the pair file, the
secrets (one file per tower, one for the GOC), the bundle keys at the GOC's side and the DNS
update key. Everything is planned first and written only if nothing is refused; a second run
with the same answers changes nothing, and no secret is ever overwritten."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailtower.controller.errors import InitError
from mailtower.controller.firstpair.answers import InitAnswers, TowerAnswers
from mailtower.settings import GOC_SECRET_NAMES as GOC_SECRETS
from mailtower.settings import SECRET_NAMES as TOWER_SECRETS

SYNC_SECRETS = ("sql_sync", "goc_sync", "goc_status")  # a tower's, held by the GOC as well
GOC_DIR = "goc"
TSIG_FILE = "dns-update.key"
TOWER_PUBLIC_KEY = "bundle-signing.pub"
RULES_DIR = "/var/lib/mailtower/rules"
HEADER = "written by `mailtower init`"


def default_secrets_dir(pair: str) -> Path:
    """Where the pair's secrets go unless told: outside any repository, per user."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "mailtower" / pair


def inventory_file(directory: Path, name: str) -> Path:
    """inventory/<name>.py with dashes as underscores (as invoke's tasks find them)."""
    return directory / f"{name.replace('-', '_')}.py"


def _secret(name: str) -> str:
    if name == "portal_session_key":
        return secrets.token_urlsafe(48)
    if name == "eye_operator":
        return secrets.token_urlsafe(18)  # 24 characters: typed by a person, in a manager
    return secrets.token_urlsafe(32)  # 43 characters, 256 bits


def merge_extra(data: dict, extra: dict) -> dict:
    """``data`` with ``extra`` written over it: a key whose values are dicts on both sides is
    merged one level (``{"backup": {"retention_full": 4}}`` keeps init's ``tls_dir``); any
    other value replaces init's (None removes a section, e.g. ``"clamav": None``)."""
    out = dict(data)
    for key, value in extra.items():
        mine = out.get(key)
        if isinstance(mine, dict) and isinstance(value, dict):
            out[key] = {**mine, **value}
        else:
            out[key] = value
    return out


# --- rendering ------------------------------------------------------------------------------


def _literal(value: object, indent: int = 0) -> str:
    """``value`` (strings, numbers, booleans, None, lists, dicts) as Python source, one item
    a line, indented from ``indent``."""
    pad, inner = " " * indent, " " * (indent + 4)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [
            f"{inner}{json.dumps(str(k))}: {_literal(v, indent + 4)}," for k, v in value.items()
        ]
        return "{\n" + "\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        items = [f"{inner}{_literal(v, indent + 4)}," for v in value]
        return "[\n" + "\n".join(items) + f"\n{pad}]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a Python string literal
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    raise InitError(
        f"{value!r}: not a value an inventory can hold (strings, numbers, lists, dicts)"
    )


def _ssh(a: InitAnswers) -> dict[str, str]:
    ssh = {"ssh_user": a.ssh_user}
    if a.ssh_key:
        ssh["ssh_key"] = a.ssh_key
    if a.ssh_known_hosts:
        ssh["ssh_known_hosts_file"] = a.ssh_known_hosts
        ssh["ssh_strict_host_key_checking"] = "yes"
    return ssh


_PRELUDE = '''
import json
from pathlib import Path

_SECRETS = Path({secrets})
_ssh = {ssh}
_sizing = "{sizing}"  # the preflight's sizing table (mailtower.controller.preflight.sizing)


def _host(address: str) -> tuple[str, dict]:
    return (address, {{**_ssh, "preflight_sizing": _sizing}})


def _read(name: str) -> str:
    """A file of the secrets directory, or nothing (the deploy then names what is missing)."""
    path = _SECRETS / name
    return path.read_text() if path.exists() else ""


def _json(name: str) -> dict:
    return json.loads(_read(name) or "{{}}")
'''


def tower_data(a: InitAnswers, t: TowerAnswers, secrets_dir: Path) -> dict:
    """The tower's ``mailtower`` data, its secrets and public key as placeholders."""
    first = t is a.towers[0]
    data: dict = {
        "name": t.name,
        "hostname": t.mx,
        "customers": [c.model_dump(exclude_defaults=True) for c in a.customers],
        "goc": {"address": str(a.goc)},
        "operator_networks": [str(n) for n in a.operator_networks],
        "secrets": "@SECRETS@",
        # Signed rule bundles and ClamAV's official databases from the GOC, rolled across
        # the pool in drained windows (docs/runbook.md).
        "rules_dir": RULES_DIR,
        "bundles": {"public_key": "@PUBLIC_KEY@"},
        "clamav": {},
        # pgBackRest to the monitor, its CA and certificates beside the secrets.
        "backup": {"tls_dir": str(secrets_dir / t.name / "pgbackrest-tls")},
    }
    if first:  # one tower's monitor watches the GOC's backup repository
        data["goc_backup_metrics"] = {"address": str(a.goc_backup), "port": 9100}
    return merge_extra(data, a.extra.get(t.name, {}))


def render_tower(a: InitAnswers, t: TowerAnswers, secrets_dir: Path) -> str:
    data = _literal(tower_data(a, t, secrets_dir), 8)
    data = data.replace('"@SECRETS@"', '_json("secrets.json")')
    data = data.replace('"@PUBLIC_KEY@"', f'_read("{TOWER_PUBLIC_KEY}")')
    twin = next(o for o in a.towers if o is not t)
    scanners = _literal([str(ip) for ip in t.scanners], 4)
    return (
        f'"""Tower {t.name} of pair {a.pair}, at {t.site} (twin: {twin.name}); {HEADER}.\n\n'
        f"    invoke preflight --tower {t.name}\n"
        f"    invoke deploy --tower {t.name}\n"
        f"    invoke verify --tower {t.name}\n\n"
        "Host names are the hosts' addresses. Secrets are read from the directory below (mode\n"
        "0700, outside the repository). Edit freely: `mailtower init` with other answers refuses\n"
        'to overwrite this file without --force (docs/first-real-pair.md).\n"""\n'
        + _PRELUDE.format(
            secrets=_literal(str(secrets_dir / t.name)), ssh=_literal(_ssh(a)), sizing=a.sizing
        )
        + "\n\n"
        f'relay = [_host("{t.relay}")]\n'
        f'monitor = [_host("{t.monitor}")]\n'
        f"sql = [_host(a) for a in {json.dumps([str(ip) for ip in t.sql])}]  # primary, standby\n"
        + f"scanners = [\n    _host(a)\n    for a in {scanners}\n]\n\n"
        "tower = (\n"
        "    relay + monitor + sql + scanners,\n"
        "    {\n"
        f'        "mailtower": {data}\n'
        "    },\n"
        ")\n"
    )


def goc_data(a: InitAnswers, secrets_dir: Path) -> dict:
    """The GOC's ``goc`` data, its secrets and keys as placeholders."""
    data = {
        "towers": [
            {"name": t.name, "sql": [str(ip) for ip in t.sql], "monitor": str(t.monitor)}
            for t in a.towers
        ],
        "customers": [c.model_dump(exclude_defaults=True) for c in a.customers],
        "operators": {"operator": "@EYE_OPERATOR@"},
        # VirusEye over HTTPS with a certificate the deploy makes (or give eye_tls_cert/key).
        "eye_listen": "0.0.0.0:8025",
        "eye_tls_self_signed": [str(a.goc)],
        "secrets": "@GOC_SECRETS@",
        "bundles": "@BUNDLE_KEYS@",
        "clamav": {},  # cvdupdate from database.clamav.net (DNS and HTTPS out, this host only)
        "backup": {
            "repo_host": str(a.goc_backup),
            "tls_dir": str(secrets_dir / GOC_DIR / "pgbackrest-tls"),
        },
    }
    return merge_extra(data, a.extra.get("goc", {}))


def render_goc(a: InitAnswers, secrets_dir: Path) -> str:
    data = _literal(goc_data(a, secrets_dir))
    data = data.replace('"@EYE_OPERATOR@"', '_goc.get("eye_operator")')
    data = data.replace('"@GOC_SECRETS@"', "_goc_secrets")
    data = data.replace('"@BUNDLE_KEYS@"', "_bundle_keys")
    names = [t.name for t in a.towers]
    sync = json.dumps(list(SYNC_SECRETS))
    return (
        f'"""The GOC of pair {a.pair} (towers {" and ".join(names)}); {HEADER}.\n\n'
        f"    invoke preflight --tower {a.goc_name}\n"
        f"    pyinfra inventory/{inventory_file(Path(), a.goc_name).name} deploys/goc.py\n\n"
        "Its secrets, and the bundle signing key (it never leaves the GOC), are in the directory\n"
        "below; each tower's sync passwords are read from that tower's own secrets file.\n"
        '"""\n'
        + _PRELUDE.format(
            secrets=_literal(str(secrets_dir)), ssh=_literal(_ssh(a)), sizing=a.sizing
        )
        + "\n\n"
        f'_goc = _json("{GOC_DIR}/secrets.json")\n'
        "_goc_secrets = {\n"
        '    **{k: _goc.get(k) for k in ("eye_db", "portal_db", "portal_session_key")},\n'
        '    "towers": {\n'
        f'        t: {{k: _json(f"{{t}}/secrets.json").get(k) for k in {sync}}}\n'
        f"        for t in {json.dumps(names)}\n"
        "    },\n"
        "}\n"
        "_bundle_keys = {\n"
        f'    "signing_key": _read("{GOC_DIR}/bundle-keys/signing.key"),\n'
        f'    "public_key": _read("{GOC_DIR}/bundle-keys/signing.pub"),\n'
        "}\n"
        f"_data = {data}\n\n"
        f'goc = ([_host("{a.goc}")], {{"goc": _data}})\n'
        "# Its pgBackRest repository host (not the GOC, no tower's host).\n"
        f'goc_backup = ([_host("{a.goc_backup}")], {{"goc": _data}})\n'
    )


def render_pair(a: InitAnswers, tsig_file: Path) -> str:
    pair = {
        "towers": [t.name for t in a.towers],
        "sites": [t.site for t in a.towers],
        "server": str(a.dns_server),
        "tsig_file": str(tsig_file),
        "publication": {
            "zones": a.published_zones(),
            "nameservers": [{"name": a.dns_name, "ipv4": [str(a.dns_server)]}],
            "preference": "equal",
        },
    }
    return (
        f'"""Pair {a.pair}: towers {a.towers[0].name} and {a.towers[1].name}, linked by MX '
        f"records; {HEADER}.\n\n"
        f"    invoke dns --pair {a.pair}\n\n"
        "The customer domains and the relays' names and addresses come from the towers'\n"
        "inventories. The DNS server must accept updates signed with the key in tsig_file for\n"
        "every zone below (docs/first-real-pair.md, DNS).\n"
        '"""\n\n'
        f"PAIR = {_literal(pair)}\n"
    )


# --- planning and writing -------------------------------------------------------------------


@dataclass
class Step:
    """One file: what init does with it (created, unchanged, replaced, kept, added …)."""

    path: Path
    action: str
    write: Callable[[], None] | None = field(default=None, repr=False)


@dataclass
class InitPlan:
    steps: list[Step]

    @property
    def changed(self) -> bool:
        return any(s.write is not None for s in self.steps)

    def lines(self) -> list[str]:
        return [f"{s.action:10} {s.path}" for s in self.steps]


def _write_private(path: Path, text: str, *, new: bool = False) -> None:
    """``path`` with ``text``, mode 0600 from the start, replaced atomically; ``new``: only if
    no file is there (linked in, never replacing one that appeared since the plan)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    _write_via_temp(path, text, 0o600, new)


def _write_via_temp(path: Path, text: str, mode: int, new: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
        if new:
            try:
                os.link(tmp, path)  # fails if a file is there: nothing is ever replaced
            except FileExistsError:
                raise InitError(
                    f"{path}: appeared after init planned to create it; it was left as it is"
                    " (run init again to see what it would do)"
                ) from None
        else:
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_public(path: Path, text: str, *, new: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_via_temp(path, text, 0o644, new)


def _plan_text(path: Path, text: str, force: bool, refused: list[str], private: bool) -> Step:
    writer = _write_private if private else _write_public
    if not path.exists():
        return Step(path, "created", lambda: writer(path, text, new=True))
    if path.read_text() == text:
        return Step(path, "unchanged")
    if not force:
        refused.append(f"{path}: exists with other contents (--force replaces it)")
        return Step(path, "refused")
    return Step(path, "replaced", lambda: writer(path, text))


def _plan_secrets(path: Path, names: tuple[str, ...], force: bool, refused: list[str]) -> Step:
    if not path.exists():
        made = {n: _secret(n) for n in names}
        text = json.dumps(made, indent=2) + "\n"
        return Step(path, "created", lambda: _write_private(path, text, new=True))
    try:
        known = json.loads(path.read_text())
        if not isinstance(known, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        refused.append(f"{path}: not a secrets file ({exc}); move it away (it is never replaced)")
        return Step(path, "refused")
    missing = [n for n in names if not known.get(n)]
    if not missing:
        return Step(path, "unchanged")
    if not force:
        refused.append(
            f"{path}: lacks {', '.join(missing)} (--force adds them, keeping every existing one)"
        )
        return Step(path, "refused")
    merged = {**known, **{n: _secret(n) for n in missing}}
    text = json.dumps(merged, indent=2) + "\n"
    kept = len(names) - len(missing)
    return Step(path, f"kept {kept}, added {len(missing)}", lambda: _write_private(path, text))


def _plan_bundle_keys(goc_dir: Path, refused: list[str]) -> Step:
    from mailtower import bundles

    out = goc_dir / "bundle-keys"
    key, pub = out / "signing.key", out / "signing.pub"
    if key.exists() and pub.exists():
        return Step(out, "unchanged")
    if key.exists() or pub.exists():
        refused.append(f"{out}: one half of the bundle key pair is missing; restore it from backup")
        return Step(out, "refused")

    def make() -> None:
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        bundles.keygen(out)  # signing.key 0600, signing.pub; refuses to overwrite
        out.chmod(0o700)

    return Step(out, "created", make)


def _check_tsig_file(path: Path, refused: list[str]) -> None:
    from mailtower.controller.dns.server import TsigKey

    if not path.is_file():
        refused.append(f"--tsig-file {path}: no such file (the DNS server's update key)")
        return
    try:
        TsigKey.from_file(path)
    except Exception as exc:  # TsigKeyError, or a file that is not BIND syntax
        refused.append(
            f"--tsig-file {path}: not a TSIG key file ({exc}); give the DNS server's update key"
            " in BIND syntax (as tsig-keygen writes it)"
        )


def _plan_tsig(path: Path, name: str, refused: list[str]) -> Step:
    import base64

    from mailtower.controller.dns.server import TsigKey

    if path.exists():
        try:
            TsigKey.from_file(path)
        except Exception as exc:  # TsigKeyError, or a file that is not BIND syntax
            refused.append(f"{path}: not a TSIG key file ({exc}); move it away")
            return Step(path, "refused")
        return Step(path, "unchanged")
    key = TsigKey(name, base64.b64encode(secrets.token_bytes(32)).decode(), "hmac-sha256")
    return Step(path, "created", lambda: _write_private(path, key.to_bind(), new=True))


def plan(
    a: InitAnswers,
    inventory_dir: Path,
    secrets_dir: Path,
    *,
    force: bool = False,
    tsig_file: Path | None = None,
) -> InitPlan:
    """What init would do; InitError listing every file it refuses to overwrite."""
    secrets_dir = secrets_dir.expanduser().resolve()
    inventory_dir = inventory_dir.expanduser().resolve()
    _secrets_apart(secrets_dir, inventory_dir)
    refused: list[str] = []
    steps: list[Step] = []
    goc_dir = secrets_dir / GOC_DIR
    steps.append(_plan_secrets(goc_dir / "secrets.json", GOC_SECRETS, force, refused))
    keys = _plan_bundle_keys(goc_dir, refused)
    steps.append(keys)
    if tsig_file is None:
        tsig = secrets_dir / TSIG_FILE
        steps.append(_plan_tsig(tsig, f"{a.pair}-update", refused))
    else:  # the pair file holds its absolute path: `invoke dns` runs from anywhere
        tsig = tsig_file.expanduser().resolve()
        _check_tsig_file(tsig, refused)
    for t in a.towers:
        tower_dir = secrets_dir / t.name
        steps.append(_plan_secrets(tower_dir / "secrets.json", TOWER_SECRETS, force, refused))
        steps.append(_plan_public_key(goc_dir, tower_dir / TOWER_PUBLIC_KEY, keys, force, refused))
        path = inventory_file(inventory_dir, t.name)
        steps.append(_plan_text(path, render_tower(a, t, secrets_dir), force, refused, False))
    path = inventory_file(inventory_dir, a.goc_name)
    steps.append(_plan_text(path, render_goc(a, secrets_dir), force, refused, False))
    path = inventory_dir / f"pair_{a.pair.replace('-', '_')}.py"
    steps.append(_plan_text(path, render_pair(a, tsig), force, refused, False))
    _distinct_paths(steps, [] if tsig_file is None else [tsig], refused)
    if refused:
        raise InitError(
            "refused, nothing was written:\n  "
            + "\n  ".join(refused)
            + "\nsecrets are never overwritten: with --force existing ones are kept and only"
            " missing ones added"
        )
    return InitPlan(steps)


def _secrets_apart(secrets_dir: Path, inventory_dir: Path) -> None:
    """InitError unless the secrets stay out of the inventories and out of any git work tree
    (a commit would publish them)."""
    if inventory_dir == secrets_dir or secrets_dir in inventory_dir.parents:
        raise InitError(f"--secrets-dir {secrets_dir} holds the inventories: keep secrets apart")
    if inventory_dir in secrets_dir.parents:
        raise InitError(
            f"--secrets-dir {secrets_dir} is inside the inventory dir {inventory_dir}: keep"
            " secrets outside it (default ~/.config/mailtower/<pair>); nothing was written"
        )
    top = git_work_tree(secrets_dir)
    if top is not None:
        raise InitError(
            f"--secrets-dir {secrets_dir} is inside the git work tree {top}: a commit would"
            " publish the secrets; choose a directory outside any repository (default"
            " ~/.config/mailtower/<pair>); nothing was written"
        )


def git_work_tree(path: Path) -> Path | None:
    """The git work tree holding ``path`` (from its nearest existing parent), or None: not in
    one, or no git on this machine."""
    import shutil
    import subprocess

    where = next((p for p in (path, *path.parents) if p.is_dir()), None)
    git = shutil.which("git")
    if where is None or git is None:
        return None
    # the directory's own repository, not one a GIT_DIR in the environment names
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE")}
    try:
        done = subprocess.run(
            [git, "-C", str(where), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None


def _plan_public_key(
    goc_dir: Path, path: Path, keys: Step, force: bool, refused: list[str]
) -> Step:
    """The tower's copy of the GOC's public key (the towers never hold the signing key)."""
    source = goc_dir / "bundle-keys" / "signing.pub"
    if keys.action == "refused":  # a half pair: refused already, nothing to copy from
        return Step(path, "refused")
    if keys.write is None:  # the pair exists: the copy must be that key
        return _plan_text(path, source.read_text(), force, refused, True)
    if path.exists() and not force:
        refused.append(f"{path}: a public key of another pair (--force replaces it)")
        return Step(path, "refused")
    if path.exists():  # --force: another pair's key replaced
        return Step(path, "replaced", lambda: _write_private(path, source.read_text()))
    return Step(path, "created", lambda: _write_private(path, source.read_text(), new=True))


def apply(outcome: InitPlan, secrets_dir: Path) -> None:
    """Write what the plan says, in its order (the GOC's keys before the towers' copies)."""
    if outcome.changed:
        secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        secrets_dir.chmod(0o700)
    for step in outcome.steps:
        if step.write is not None:
            step.write()


def run(
    a: InitAnswers,
    inventory_dir: Path,
    secrets_dir: Path | None = None,
    *,
    force: bool = False,
    tsig_file: Path | None = None,
) -> InitPlan:
    """Plan and write; InitError (nothing written) when refused."""
    secrets_dir = (secrets_dir or default_secrets_dir(a.pair)).expanduser().resolve()
    outcome = plan(a, inventory_dir, secrets_dir, force=force, tsig_file=tsig_file)
    apply(outcome, secrets_dir)
    return outcome


def _distinct_paths(steps: list[Step], given: list[Path], refused: list[str]) -> None:
    """Refuse two planned files at one path (a tower named like the GOC's directory or the
    pair file): the second would overwrite the first."""
    seen: set[Path] = set()
    for path in [s.path for s in steps] + given:
        if path in seen:
            refused.append(
                f"{path}: two of the files init writes would be this one (rename a tower)"
            )
        seen.add(path)
