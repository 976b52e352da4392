"""Names of the sync objects, derived from the tower's name (one place, so nothing drifts).

Subscriptions are unique per tower (``mt_config_<tower>`` on the tower's primary,
``mt_events_<tower>`` at the GOC). Replication slots also carry the timeline of the tower's
primary they were made for (``mt_events_<tower>_tl<N>``): a promotion starts a new timeline, so
a slot name tells which primary it belongs to, and a fenced-off old primary that comes back
cannot consume the slot made for its successor.
"""

from __future__ import annotations

import re

SYNC_ROLE = "mt_sync"  # LOGIN REPLICATION: what the GOC's subscription to a tower connects as
CONFIG_PUBLICATION = "mt_config"  # at the GOC: the CONFIG_TABLES
EVENTS_PUBLICATION = "mt_events"  # at each tower primary: verdict_events, INSERT only
# In foreign-key order (a tower loads them in this order, deletes in the reverse).
CONFIG_TABLES = ("customers", "domains", "routes", "policies", "recipients")
PRIMARY_KEYS = {
    "customers": "id",
    "domains": "name",
    "routes": "domain",
    "policies": "customer_id",
    "recipients": "address",
}
EVENTS_TABLE = "verdict_events"

_TOWER_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")  # TowerSettings.name


def tower_key(tower: str) -> str:
    """The tower's name as an identifier fragment (``tower-a`` → ``tower_a``)."""
    if not _TOWER_RE.match(tower):
        raise ValueError(f"{tower!r} is not a tower name (lower case, digits and '-', ≤31)")
    return tower.replace("-", "_")


def goc_sync_role(tower: str) -> str:
    """The role at the GOC the tower's config subscription connects as (LOGIN REPLICATION).

    One per tower, each with the tower's own password (``secrets.goc_sync`` of that tower):
    no tower holds a password another tower uses.
    """
    return f"{SYNC_ROLE}_{tower_key(tower)}"


def config_subscription(tower: str) -> str:
    return f"mt_config_{tower_key(tower)}"


def events_subscription(tower: str) -> str:
    return f"mt_events_{tower_key(tower)}"


def config_slot_prefix(tower: str) -> str:
    return f"{config_subscription(tower)}_tl"


def events_slot_prefix(tower: str) -> str:
    return f"{events_subscription(tower)}_tl"


def config_slot(tower: str, timeline: int) -> str:
    """The GOC-side slot of the config subscription of the tower primary on ``timeline``."""
    return f"{config_slot_prefix(tower)}{timeline}"


def events_slot(tower: str, timeline: int) -> str:
    """The tower-side slot of the GOC's events subscription, on the primary of ``timeline``."""
    return f"{events_slot_prefix(tower)}{timeline}"
