"""cvdupdate's configuration at the GOC, from the settings, without touching its own state.

cvdupdate (ClamAV's mirror tool, pinned, in its own venv) keeps two JSON files: its config
(directories, nameserver, …) and its state (per database: url, DNS field, and what it learnt:
local version, CDIFFs, ``retry after`` of a 429 cool-down; and the uuid of its User-Agent).
The deploy writes what the settings want (:func:`wanted`) to :data:`WANTED`; before each run
the timer's script merges it into cvdupdate's files (:func:`merge`), so a redeploy never
clobbers what cvdupdate learnt, and never writes while cvdupdate runs.

    python -m mailtower.goc.cvdupdate --wanted /etc/mailtower/cvdupdate.json \\
        --config /var/lib/mailtower/cvdupdate/config.json
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mailtower._fsio import write_atomic
from mailtower.settings import ClamavUpstream

HOME = "/var/lib/mailtower/cvdupdate"  # the mtcvd user's home: config, state, files, logs
WANTED = "/etc/mailtower/cvdupdate.json"

# A database cvdupdate has not met yet (its own defaults for one, cvdupdate.py default_state).
_NEW_DATABASE = {
    "url": "",
    "retry after": 0,
    "last modified": 0,
    "last checked": 0,
    "DNS field": 0,
    "local version": 0,
    "CDIFFs": [],
}
# cvdupdate's own config defaults (cvdupdate.py default_config): it fills none of them into a
# config file it did not write itself (a missing "# logs to keep" is a KeyError at start).
_CONFIG_DEFAULTS = {
    "max retry": 3,
    "rotate logs": True,
    "# logs to keep": 30,
    "rotate cdiffs": True,
    "# cdiffs to keep": 30,
}
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}  # systemd: bare = s


def wanted(upstream: ClamavUpstream, home: str = HOME) -> dict:
    """What the settings fix of cvdupdate's config and of each database's state."""
    base = upstream.url.rstrip("/")
    return {
        "config": {
            "db directory": f"{home}/database",
            "log directory": f"{home}/logs",
            "state file": f"{home}/state.json",
            "nameserver": upstream.nameserver,
        },
        "dbs": {
            f"{name}.cvd": {"url": f"{base}/{name}.cvd", "DNS field": field}
            for name, field in sorted(upstream.databases.items())
        },
    }


def merge(want: dict, config: dict, state: dict) -> tuple[dict, dict]:
    """cvdupdate's config and state with ``want`` applied: the wanted keys set, every database
    not wanted dropped, and all that cvdupdate learnt (versions, cool-downs, uuid) kept."""
    config = {**_CONFIG_DEFAULTS, **copy.deepcopy(config), **want["config"]}
    state = copy.deepcopy(state)
    old = state.get("dbs") or {}
    state["dbs"] = {
        name: {**copy.deepcopy(_NEW_DATABASE), **old.get(name, {}), **fields}
        for name, fields in want["dbs"].items()
    }
    return config, state


def interval_seconds(value: str) -> int:
    """Seconds of a settings Duration (``2m``, ``1h``; a bare number is seconds, as systemd
    reads it)."""
    match = re.fullmatch(r"(\d+)([smhdw]?)", value.strip())
    if not match:
        raise ValueError(f"not a duration: {value!r}")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def _load(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cvdupdate config: {path} is unreadable ({exc}); move it away") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"cvdupdate config: {path} is not a JSON object; move it away")
    return data


def apply(wanted_path: Path, config_path: Path) -> bool:
    """Merge the wanted file into cvdupdate's files; True when either changed."""
    want = _load(wanted_path)
    if not want:
        raise SystemExit(f"cvdupdate config: {wanted_path} is missing; deploy the GOC again")
    config = _load(config_path)
    state_path = Path(want["config"]["state file"])
    state = _load(state_path)
    new_config, new_state = merge(want, config, state)
    changed = False
    for path, old, new in ((config_path, config, new_config), (state_path, state, new_state)):
        if old != new:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, (json.dumps(new, indent=4) + "\n").encode(), mode=0o644)
            changed = True
    return changed


FORBIDDEN_COOLDOWN_S = 24 * 3600  # freshclam's own for a 403 (Cisco-Talos/clamav#322)
CVDUPDATE_VERSION = "1.2.0"  # requirements-cvdupdate.txt: the User-Agent it sends


def forbidden_cooldown(
    config_path: Path, now: float | None = None, timeout_s: float = 30.0
) -> float | None:
    """After a failed ``cvd update``: ask the upstream once, as cvdupdate would, whether it
    forbids this GOC (403). cvdupdate cools down after a 429 but not after a 403 and would ask
    again at every check; ClamAV's CDN answers 403 to blocked networks and clients, and
    freshclam then waits 24 hours. On a 403 every database's ``retry after`` is set that far
    (cvdupdate skips them meanwhile; publish reports the cool-down, the monitors alert).
    Returns the end of the cool-down, or None when the upstream does not forbid us."""
    now = time.time() if now is None else now
    config = _load(config_path)
    state_path = Path(config.get("state file") or config_path.with_name("state.json"))
    state = _load(state_path)
    dbs = state.get("dbs") or {}
    urls = [d.get("url") for d in dbs.values() if isinstance(d, dict) and d.get("url")]
    if not urls:
        return None
    request = urllib.request.Request(
        str(urls[0]),
        headers={
            "User-Agent": f"CVDUPDATE/{CVDUPDATE_VERSION} ({state.get('uuid', 'mailtower')})",
            "Range": "bytes=0-95",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return None
    except urllib.error.HTTPError as exc:
        if exc.code != 403:
            return None
    except OSError:
        return None
    until = now + FORBIDDEN_COOLDOWN_S
    for entry in dbs.values():
        if isinstance(entry, dict):
            entry["retry after"] = max(float(entry.get("retry after") or 0), until)
    write_atomic(state_path, (json.dumps(state, indent=4) + "\n").encode(), mode=0o644)
    return until


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailtower.goc.cvdupdate", description=__doc__)
    parser.add_argument("--wanted", type=Path, default=Path(WANTED))
    parser.add_argument("--config", type=Path, default=Path(f"{HOME}/config.json"))
    parser.add_argument(
        "--after-failure",
        action="store_true",
        help="cvd update failed: cool down 24 h if the upstream forbids us (403)",
    )
    args = parser.parse_args(argv)
    if args.after_failure:
        until = forbidden_cooldown(args.config)
        if until is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
            print(
                f"cvdupdate: the upstream forbids this GOC (403): no check before {when}; "
                "fix: see https://docs.clamav.net (blocked networks, outdated clients)",
                file=sys.stderr,
            )
        return 0
    if apply(args.wanted, args.config):
        print(f"cvdupdate config: {args.config} and its state updated from {args.wanted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
