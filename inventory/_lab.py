"""Builds a pyinfra inventory of a lab tower from the lab's address plan
(mailtower.controller.lab.plan)."""

from __future__ import annotations

import json

from mailtower.controller.firstpair.lab import lab_answers
from mailtower.controller.firstpair.write import merge_extra
from mailtower.controller.lab import ca, clamav_upstream, lxc, plan

LAB_PORTAL_PORT = 8027  # the lab GOC's quarantine portal (VirusEye 8025, bundles 8026)
# The GOC's repository host's node exporter (its backup metrics), scraped by tower a's monitor.
LAB_GOC_BACKUP_EXPORTER_PORT = 9100


def _ssh() -> dict[str, str]:
    return {
        "ssh_user": "root",
        "ssh_key": str(lxc.ssh_key()),
        "ssh_known_hosts_file": str(lxc.known_hosts()),
        "ssh_strict_host_key_checking": "yes",
        # The preflight's sizing table for the lab's containers (controller/preflight/sizing).
        "preflight_sizing": "lab",
    }


def lab_groups(tower: str) -> dict[str, list]:
    """Inventory groups of lab tower ``tower``: host names are their addresses."""
    scanners = int(__import__("os").environ.get("MAILTOWER_LAB_SCANNERS", plan.DEFAULT_SCANNERS))
    ssh = _ssh()
    groups: dict[str, list] = {
        "relay": [],
        "monitor": [],
        "sql": [],
        "scanners": [],
        "customers": [],
    }
    for host in plan.tower_hosts(tower, scanners) + plan.customer_hosts():
        groups[host.group].append((str(host.address), {**ssh, "lab_name": host.name}))
    return groups


def lab_tower_data(tower: str) -> dict:
    """The ``mailtower`` data of a lab tower from the lab's own code (inventory/lab_a.py): what
    ``mailtower init`` makes for the lab's answers, the lab's extra over it, and the secrets of
    the lab's state dir. The lab built by `invoke lab` takes init's inventories instead
    (init_answers: the same answers and extra; secrets from init's files)."""
    data = {
        "name": f"lab-{tower}",
        "hostname": f"mx.tower-{tower}.lab",
        # The tower's own list (its tests use it); its relay routes what the GOC publishes.
        "customers": lab_customers(),
        "goc": {"address": str(plan.goc_host().address)},
        # The controller deploys, verifies and operates the lab: SSH and the operator
        # interfaces answer it, and nothing else on the lab's internet.
        "operator_networks": [f"{plan.HOST_ADDRESS}/32"],
        "secrets": lxc.tower_secrets(f"lab-{tower}"),  # each tower its own
        # pgBackRest backups of the SQL pair to the tower's monitor, its certificates from the
        # lab's backup CA (made once per lab, beside its other secrets).
        "backup": {"tls_dir": str(lxc.state_dir() / "pgbackrest-tls")},
        # Rule bundles from the lab GOC (signed with the lab's key), rolled across the pool.
        "rules_dir": "/var/lib/mailtower/rules",
        "bundles": {"public_key": lxc.bundle_keys()[1].read_text()},
        "clamav": {},
    }
    return merge_extra(data, lab_tower_extra(tower))


def lab_tower_extra(tower: str) -> dict:
    """What the lab's towers have beyond what ``init`` makes from the lab's answers: its
    relay certificate, engines, timers and limits, alerts, bundles' and ClamAV's lab sizes,
    quarantine notices. One source for both ways the lab is built (init's ``extra``)."""
    hostname = f"mx.tower-{tower}.lab"
    return {
        # The relay's certificate from the lab CA, for its MX name (the sender verifies it).
        "tls": ca.relay_tls(f"lab-{tower}", hostname),
        # Two anti-virus engines on every message: clamd, and c-icap's virus_scan (libclamav
        # in-process) behind ICAP, the way a commercial engine plugs in.
        "engines": ["clamd", "icap"],
        "icap_url": "icap://127.0.0.1:1344/avscan",
        # Short retry timers so the lab proves deferral and recovery in seconds, not minutes.
        "limits": {
            "queue_run_delay": "5s",
            "minimal_backoff": "5s",
            "maximal_backoff": "20s",
            # the hung-engine check waits this long for its 451; 10 s was too short for clamd on a
            # 52 MB message while the lab's 59 hosts share two CPUs (CI, 2026-12-07)
            "engine_timeout_s": 20,
            # A request's time limit (60 s by default): the trickle check waits it out twice
            # (once per tower); nothing in the lab keeps an SMTP session idle that long (scand
            # closes a kept re-injection connection after 10 s idle).
            "client_request_timeout": "20s",
            # One scand process per lab scanner: 46 scanners share this machine's 2 CPUs, and
            # a worker per CPU each would cost ~130 MiB more per scanner. A real scanner host
            # keeps the default (0: one worker per CPU).
            "scan_workers": 1,
            # The controller, and the lab's sender (which stands for all of the world's senders
            # at once), send the checks' and benchmarks' mail in bursts no one internet client
            # may send.
            "client_limit_exempt": [
                f"{plan.HOST_ADDRESS}/32",
                *(f"{h.address}/32" for h in plan.internet_hosts() if h.group == "sender"),
            ],
        },
        # A scanner's restart in a roll takes ~7 s in the lab (its small test database; 3 at
        # once under the pair tests' load): a minute is ample, and the tests of a scanner that
        # never comes back wait that minute instead of the default two.
        "upgrade": {"restart_timeout_s": 60},
        # The relay's postmaster mail lands in the first customer's catch-all, where the
        # end-to-end checks read it.
        "postmaster": f"postmaster-{tower}@{plan.customer_domain(1)}",
        # Alerts (tests/pair/test_96_alerts.py): the operators' mailbox is an address in the
        # first customer's catch-all, like the postmaster's; the fallback way is the twin
        # tower's relay, which takes mail for a customer domain from anyone. Short timers so a
        # fault's mail arrives within a minute; one mail per alert name (the lab's 59 hosts
        # share one clock and one load); the load alert at a level the shared CPUs never see.
        "alerts": {
            "to": [f"mailtower-ops-{tower}@{plan.customer_domain(1)}"],
            "fallback": {"host": _twin_relay(tower)},
            "group_by": ["alertname"],
            "group_wait": "5s",
            "group_interval": "30s",
            "repeat_interval": "1h",
            "scrape_interval": "10s",
            "evaluation_interval": "10s",
            "for_max": "20s",
            "load_per_cpu": 100,
        },
        # New bundles are picked up within 2 s (merged over the public key).
        "bundles": {"poll_interval_s": 2},
        # ClamAV's signed test database from the GOC's mirror of the lab's stand-in upstream
        # (it is small: clamd with it stays far below a real tower's engine size).
        "clamav": {
            "databases": [clamav_upstream.DATABASE],
            "engine_mib": 64,
            "working_set_mib": 256,
        },
        # Quarantine notices (sent only for customers whose policy asks: the lab's customers'
        # default is none) link to the lab GOC's portal; requests are picked up within 2 s.
        "quarantine": {
            "notice_from": f"quarantine@mx.tower-{tower}.lab",
            "portal_url": f"https://{plan.goc_host().address}:{LAB_PORTAL_PORT}",
            "poll_interval_s": 2,
        },
        # Tower a's monitor scrapes the GOC's repository host (the sender, on the lab's
        # on-link net), so the backup alerts cover stanza goc too.
        **_goc_backup_metrics(tower),
    }


def _goc_backup_metrics(tower: str) -> dict:
    if tower != "a":
        return {}
    repo = _goc_repository()
    if repo is None:  # a lab-a alone: no repository host, nothing to scrape
        return {"goc_backup_metrics": None}
    return {
        "goc_backup_metrics": {
            "address": str(repo.address),
            "port": LAB_GOC_BACKUP_EXPORTER_PORT,
        }
    }


def _twin_relay(tower: str) -> str:
    """The relay address of the lab's other tower."""
    return _relay(next(t for t in plan.TOWER_NETS if t != tower))


def _relay(tower: str) -> str:
    return next(str(h.address) for h in plan.tower_hosts(tower, 0) if h.group == "relay")


def lab_customers() -> list[dict[str, str]]:
    return [
        {"domain": plan.customer_domain(i + 1), "server": str(h.address)}
        for i, h in enumerate(plan.customer_hosts())
    ]


def goc_groups() -> dict[str, list]:
    host = plan.goc_host()
    return {"goc": [(str(host.address), {**_ssh(), "lab_name": host.name})]}


def _goc_repository() -> plan.LabHost | None:
    """The lab GOC's backup repository host: the twin lab's sender, outside every tower (a
    lab-a alone has none, and its GOC is not backed up)."""
    sender = next(h for h in plan.internet_hosts() if h.group == "sender")
    return sender if (lxc.LXC_DIR / sender.name / "config").exists() else None


def goc_backup_groups() -> dict[str, list]:
    """The goc_backup group: the GOC's repository host, when the lab has one."""
    repo = _goc_repository()
    return {
        "goc_backup": []
        if repo is None
        else [(str(repo.address), {**_ssh(), "lab_name": repo.name})]
    }


# Segments switched each minute (the lab's tests wait for them), the stall alert's limit short.
GOC_BACKUP_TIMERS = {"archive_switch_s": 60, "alert_archive_stall_s": 900}


def goc_data() -> dict:
    """The lab GOC's data from the lab's own code (inventory/lab_goc.py): what ``init`` makes
    for the lab's answers (both lab towers, the lab customers, one operator), the lab's extra
    over it, and the secrets and bundle keys of the lab's state dir."""
    secrets = lxc.goc_secrets()
    signing_key, public_key = lxc.bundle_keys()
    towers = []
    for tower in plan.TOWER_NETS:
        hosts = {h.name.rsplit("-", 1)[1]: str(h.address) for h in plan.tower_hosts(tower, 0)}
        towers.append(
            {
                "name": f"lab-{tower}",
                "sql": [hosts["sql1"], hosts["sql2"]],
                "monitor": hosts["monitor"],
            }
        )
    repo = _goc_repository()
    data = {
        "towers": towers,
        "customers": lab_customers(),
        "operators": {"operator": secrets["eye_operator"]},
        # The controller's Chromium reaches it on the lab net, over HTTPS with a certificate
        # the deploy makes; the lab's checks trust exactly that one (fetched over SSH).
        "eye_listen": "0.0.0.0:8025",
        "secrets": {
            "eye_db": secrets["eye_db"],
            "portal_db": secrets["portal_db"],
            "portal_session_key": secrets["portal_session_key"],
            # Each tower's sync and status passwords, as that tower's own settings hold them.
            "towers": {
                t["name"]: {
                    n: lxc.tower_secrets(t["name"])[n]
                    for n in ("sql_sync", "goc_sync", "goc_status")
                }
                for t in towers
            },
        },
        # The lab's bundle key pair: the GOC signs (invoke bundle.publish), the towers verify.
        "bundles": {"signing_key": signing_key.read_text(), "public_key": public_key.read_text()},
        "clamav": {},
        "backup": None
        if repo is None
        else {"repo_host": str(repo.address), "tls_dir": str(lxc.state_dir() / "pgbackrest-tls")},
    }
    return merge_extra(data, lab_goc_extra())


def lab_goc_extra() -> dict:
    """What the lab's GOC has beyond what ``init`` makes from the lab's answers (its ``goc``
    extra): VirusEye's certificate names, the portal, the controller as a bundle reader, the
    stand-in ClamAV upstream, the backups' lab timers."""
    goc = plan.goc_host()
    relays = [_relay(t) for t in plan.TOWER_NETS]
    return {
        "eye_tls_self_signed": [str(goc.address), goc.name],
        # The customers' quarantine portal: sign-in links go out through both towers' relays
        # (scanned and routed as any customer mail); the controller's Chromium reaches it.
        "portal": {
            "listen": f"0.0.0.0:{LAB_PORTAL_PORT}",
            "public_url": f"https://{goc.address}:{LAB_PORTAL_PORT}",
            "mail_from": "quarantine@goc.lab",
            "relays": relays,
            "tls_self_signed": [str(goc.address), goc.name],
        },
        # The controller reads latest.json to check what was published.
        "bundle_readers": [str(plan.HOST_ADDRESS)],
        "clamav": lab_clamav_upstream(),
        # pgBackRest to the lab's sender (docs/runbook.md, The GOC's backups); None: lab-a alone.
        "backup": None if _goc_repository() is None else dict(GOC_BACKUP_TIMERS),
        "backup_exporter_port": LAB_GOC_BACKUP_EXPORTER_PORT,
    }


def lab_extra() -> dict[str, dict]:
    """The lab's ``extra`` answers for ``init``: each tower's and the GOC's."""
    return {
        **{f"lab-{t}": lab_tower_extra(t) for t in plan.TOWER_NETS},
        "goc": lab_goc_extra(),
    }


def init_answers() -> dict:
    """The twin lab as ``mailtower init`` answers (its address plan, SSH, sizing) with the
    lab's extra: what `invoke lab` writes the lab's inventories from."""
    scanners = int(__import__("os").environ.get("MAILTOWER_LAB_SCANNERS", plan.DEFAULT_SCANNERS))
    return {**lab_answers(scanners), "extra": lab_extra()}


def lab_clamav_upstream() -> dict:
    """The lab GOC's ClamavUpstream: the stand-in on the lab's DNS host (the twin lab has it;
    a lab-a alone has no DNS host, and its GOC's checks fail, recorded as upstream errors).
    Its check interval is short so the tests see a new version within minutes."""
    return {
        "databases": {clamav_upstream.DATABASE: clamav_upstream.TXT_FIELD},
        "url": clamav_upstream.base_url(),
        "nameserver": clamav_upstream.dns_host(),
        "check_interval": "2m",
        # One third-party feed, URLhaus-shaped, served by the stand-in too (Fangfrisch's urlhaus
        # provider with its URL pointed there); the others stay off as by default.
        "feeds": [
            {
                "name": clamav_upstream.FEED,
                "enabled": True,
                "options": clamav_upstream.feed_options(),
            }
        ],
    }


def internet_groups() -> dict[str, list]:
    """Inventory groups of the twin lab's "internet": DNS server, sender, customer servers."""
    ssh = _ssh()
    groups: dict[str, list] = {"dns": [], "sender": [], "customers": []}
    for host in plan.internet_hosts() + plan.customer_hosts():
        groups[host.group].append((str(host.address), {**ssh, "lab_name": host.name}))
    return groups


def internet_data() -> dict:
    """Host data of the internet's DNS server and sender: zones, the update key, resolver."""
    dns_host = next(h for h in plan.internet_hosts() if h.group == "dns")
    return {
        "dns": {
            # clamav.net: the stand-in upstream's current.cvd TXT record (clamav_upstream)
            "zones": [plan.LAB_ZONE, "201.10.in-addr.arpa", clamav_upstream.ZONE],
            "ns_name": f"ns.{plan.LAB_ZONE}",
            "ns_address": str(dns_host.address),
            "update_from": str(plan.HOST_ADDRESS),  # the controller publishes (invoke dns)
            "tsig": json.loads(lxc.tsig_key_file().read_text()),
        },
        "sender": {
            "domain": plan.SENDER_DOMAIN,
            "resolver": str(dns_host.address),
            "submit_from": str(plan.HOST_ADDRESS),
            # It verifies the towers' certificates against the lab CA (smtp_tls_CAfile).
            "tls_ca": ca.root_pem(),
        },
    }


def lab_pair() -> dict:
    """The twin lab's pair: towers lab-a and lab-b, published into the lab's DNS."""
    dns = internet_data()["dns"]
    return {
        "towers": ["lab-a", "lab-b"],
        "sites": ["site-a", "site-b"],
        "server": dns["ns_address"],
        "tsig": dns["tsig"],
        "publication": {
            # The towers' records only: clamav.net belongs to the stand-in ClamAV upstream.
            "zones": [z for z in dns["zones"] if z != clamav_upstream.ZONE],
            "nameservers": [{"name": dns["ns_name"], "ipv4": [dns["ns_address"]]}],
            "preference": "equal",
        },
    }
