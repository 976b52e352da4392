"""The twin lab as ``init`` answers, from the lab's own address plan: so CI can deploy the lab
from inventories ``init`` wrote, through the commands an operator uses."""

from __future__ import annotations

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
