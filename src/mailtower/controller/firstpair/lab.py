"""The twin lab as ``init`` answers, from the lab's own address plan: so CI deploys the lab
from inventories ``init`` wrote, through the commands an operator uses (tasks.py, `invoke
lab`); and where the lab's tasks and tests then find those inventories and secrets."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mailtower.controller.inventory import Inventory, InventoryHost
from mailtower.controller.lab import plan


def lab_answers(scanners: int = plan.DEFAULT_SCANNERS) -> dict:
    """The answers of the twin lab (towers lab-a and lab-b, its GOC, customers and DNS)."""
    towers = []
    for tower in plan.TOWER_NETS:
        hosts: dict[str, list[str]] = {}
        for h in plan.tower_hosts(tower, scanners):
            hosts.setdefault(h.group, []).append(str(h.address))
        towers.append(
            {
                "name": f"lab-{tower}",
                "site": f"site-{tower}",
                "mx": f"mx.tower-{tower}.lab",
                "relay": hosts["relay"][0],
                "monitor": hosts["monitor"][0],
                "sql": hosts["sql"],
                "scanners": hosts["scanners"],
            }
        )
    internet = {h.group: h for h in plan.internet_hosts()}
    ssh_dir = plan.STATE_DIR / "ssh"
    return {
        "pair": "lab",
        "towers": towers,
        "goc": str(plan.goc_host().address),
        "goc_backup": str(internet["sender"].address),  # as inventory/_lab.py: the sender
        "customers": [
            {"domain": plan.customer_domain(i + 1), "server": str(h.address)}
            for i, h in enumerate(plan.customer_hosts())
        ],
        "dns_server": str(internet["dns"].address),
        "dns_name": f"ns.{plan.LAB_ZONE}",
        "zones": [plan.LAB_ZONE, "201.10.in-addr.arpa"],
        "operator_networks": [f"{plan.HOST_ADDRESS}/32"],
        "ssh_key": str(ssh_dir / "id_ed25519"),
        "ssh_known_hosts": str(ssh_dir / "known_hosts"),
        "sizing": "lab",
    }


# --- the lab built from init's inventories (`invoke lab`, CI) ----------------------------------

# Which inventories the lab was deployed from, so its tasks and tests load the same ones:
# "init" (init's, in .lab/inventory/, secrets in lab_secrets_dir()) or "repo" (the lab's own
# inventory/lab_*.py, secrets in .lab/secrets.json). `invoke lab` writes SOURCE_FILE; the
# environment variable overrides it (MAILTOWER_LAB_INVENTORY=repo invoke lab: the old way).
SOURCE_ENV = "MAILTOWER_LAB_INVENTORY"
SOURCE_FILE = "inventory-source"
SOURCES = ("init", "repo")
# The files init writes for the lab's answers (pair "lab", towers lab-a and lab-b).
GENERATED = ("lab_a.py", "lab_b.py", "lab_goc.py", "pair_lab.py")


def generated_dir() -> Path:
    """Where `invoke lab` has init write the lab's inventories (no secrets in them)."""
    return plan.STATE_DIR / "inventory"


def lab_secrets_dir() -> Path:
    """Where init keeps the lab's secrets: outside any git work tree (init refuses one, and
    the lab's state dir is inside the clone), one directory per clone
    ($XDG_STATE_HOME/mailtower/lab-<digest of the clone's .lab>)."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(str(plan.STATE_DIR.resolve()).encode()).hexdigest()[:12]
    return base / "mailtower" / f"lab-{digest}"


def inventory_source() -> str:
    """ "init" or "repo": the environment's choice, else what `invoke lab` recorded, else
    "repo" (a lab never built through init)."""
    given = os.environ.get(SOURCE_ENV, "").strip()
    if given:
        if given not in SOURCES:
            raise ValueError(f"{SOURCE_ENV}={given!r}: give one of {', '.join(SOURCES)}")
        return given
    path = plan.STATE_DIR / SOURCE_FILE
    recorded = path.read_text().strip() if path.exists() else ""
    return recorded if recorded in SOURCES else "repo"


def record_inventory_source(source: str) -> None:
    """Remember which inventories the lab is deployed from (its tests read it)."""
    if source not in SOURCES:
        raise ValueError(f"inventory source {source!r}: give one of {', '.join(SOURCES)}")
    plan.STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    (plan.STATE_DIR / SOURCE_FILE).write_text(source + "\n")


def lab_inventory(root: Path, file: str) -> Path:
    """``inventory/<file>`` of the repository at ``root``, or, for the lab's towers, GOC and
    pair file when the lab is built from init's inventories, init's (.lab/inventory/<file>).
    The one lookup of the lab's tasks (tasks.py) and tests (tests/towerlib.py)."""
    if file in GENERATED and inventory_source() == "init":
        return generated_dir() / file
    return root / "inventory" / file


def complete(inventory: Inventory) -> Inventory:
    """What the lab's checks read beyond an inventory init wrote, from the lab's address plan:
    each lab host's container name (host data ``lab_name``: the checks stop and start
    containers) and, in a tower's, the lab's customer mail servers (group ``customers``,
    deployed with the lab's internet; the checks read delivered mail there, with the tower's
    SSH settings). An inventory that has them (the lab's own) is left as it is."""
    # every lab host (the twin lab's internet too), scanners up to .255 of each tower's net
    names = {str(h.address): h.name for h in plan.lab_hosts(tuple(plan.TOWER_NETS), 155)}
    every = [h for hosts in inventory.groups.values() for h in hosts]
    for h in every:
        if h.address in names:
            h.data.setdefault("lab_name", names[h.address])
    lab_tower = inventory.groups.get("relay") and all(h.address in names for h in every)
    if lab_tower and "customers" not in inventory.groups:
        ssh = {k: v for k, v in every[0].data.items() if k.startswith("ssh_")}
        inventory.groups["customers"] = [
            InventoryHost(str(h.address), {**ssh, "lab_name": h.name})
            for h in plan.customer_hosts()
        ]
        inventory.group_data["customers"] = {}
    return inventory


def forget_init_lab() -> list[Path]:
    """After the lab's hosts are destroyed: remove the record that the lab was deployed from
    init's inventories, those inventories, and the secrets init wrote for them. Returns what
    was removed."""
    import shutil

    removed = []
    record = plan.STATE_DIR / SOURCE_FILE
    if record.exists():
        record.unlink()
        removed.append(record)
    for directory in (generated_dir(), lab_secrets_dir()):
        if directory.exists():
            shutil.rmtree(directory)
            removed.append(directory)
    return removed
