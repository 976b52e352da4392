"""A pair file: which two tower inventories form a twin pair, and where their records go.

``inventory/pair_<name>.py`` defines ``PAIR``, a dict with ``towers`` (two inventory names),
``sites``, ``server`` (the authoritative server's address[:port]), ``tsig`` (name, algorithm,
secret — or ``tsig_file``, a BIND key file) and ``publication`` (zones, nameservers,
preference… — see :class:`mailtower.controller.dns.model.TowerPair`). The customer domains and
the relay names and addresses come from the towers' own inventories, so nothing is written twice.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from mailtower.controller import inventory
from mailtower.controller.dns.exceptions import InvalidPair
from mailtower.controller.dns.model import TowerPair, pair_from_settings
from mailtower.controller.dns.server import AuthServer, TsigKey
from mailtower.errors import SettingsError

REQUIRED = ("towers", "sites", "server", "publication")


def pair_path(root: Path, name: str) -> Path:
    return root / "inventory" / f"pair_{name.replace('-', '_')}.py"


def _read(path: Path) -> dict:
    root = str(path.resolve().parent.parent)  # pair files import inventory helpers
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_mt_pair_{path.stem}", path)
    if spec is None or spec.loader is None or not path.exists():
        raise InvalidPair(f"{path}: no such pair file (see inventory/pair_lab.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InvalidPair(f"{path}: the pair file fails to load: {exc}") from exc
    data = getattr(module, "PAIR", None)
    if not isinstance(data, dict):
        raise InvalidPair(f"{path}: defines no PAIR dict")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise InvalidPair(f"{path}: PAIR lacks {', '.join(missing)}")
    return data


def load(path: Path) -> tuple[TowerPair, AuthServer]:
    """The pair a pair file describes and the server to publish to; InvalidPair if wrong."""
    data = _read(path)
    towers = data["towers"]
    if not (isinstance(towers, (list, tuple)) and len(towers) == 2):
        raise InvalidPair(f"{path}: PAIR['towers'] must name two tower inventories")
    settings = []
    for name in towers:
        inv_path = path.parent / f"{name.replace('-', '_')}.py"
        try:
            settings.append(inventory.settings_of(inventory.load(inv_path)))
        except SettingsError as exc:
            raise InvalidPair(f"{path}: tower {name}: {exc}") from exc
    pair = pair_from_settings(
        settings[0], settings[1], sites=tuple(data["sites"]), **data["publication"]
    )
    if "tsig_file" in data:
        key = TsigKey.from_file(Path(data["tsig_file"]))
    elif "tsig" in data:
        t = data["tsig"]
        key = TsigKey(t["name"], t["secret"], t.get("algorithm", "hmac-sha256"))
    else:
        raise InvalidPair(f"{path}: PAIR needs tsig (name, secret) or tsig_file to sign updates")
    return pair, AuthServer.parse(str(data["server"]), key=key)
