"""Rule updates from the GOC to every scanner of both towers, while mail flows (issue 6).

A new bundle is published at the GOC: the shipped rules plus a YARA rule and a ClamAV
signature, each for a marker no rule knew. Before, messages carrying the markers are
delivered; the monitors pull, verify and mirror the bundle and roll it across their 23
scanners (drain, apply, canary, back) while the sender keeps mail coming; after, the same
messages are quarantined at both towers, found by the new YARA rule and by clamd. A bundle
whose rule matches everything fails its canary on the first scanner of each tower, is rolled
back there and goes no further. Then ``MAILTOWER_BUNDLE_UPDATES`` more updates (default 2;
20 for the figures in docs/benchmarks.md) in a row. Every message sent meanwhile is delivered,
none tempfailed by a scanner, none lost.

Figures: tests/output/figures.json (rule_bundles).
"""

from __future__ import annotations

import os
import shutil
import smtplib
import threading
import time
import uuid
from pathlib import Path

from conftest import Pair
from towerlib import record_figure, wait_for

from mailtower.controller.lab.bundles import publish_at_goc
from mailtower.scanning.rules import RULES_DIR

UPDATES = int(os.environ.get("MAILTOWER_BUNDLE_UPDATES", "2"))
ROLLOUT_TIMEOUT_S = 600


def rules_with(
    tmp: Path, *, yara: dict[str, str], clamav: dict[str, str], canary: dict[str, str] | None = None
) -> Path:
    """The shipped rules plus the given YARA and ClamAV files and canary samples."""
    rules = tmp / f"rules-{uuid.uuid4().hex[:8]}"
    for section in ("yara", "skeptic", "reputation"):
        shutil.copytree(RULES_DIR / section, rules / section)
    for name, text in yara.items():
        (rules / "yara" / name).write_text(text)
    (rules / "clamav").mkdir()
    for name, text in clamav.items():
        (rules / "clamav" / name).write_text(text)
    (rules / "canary").mkdir()
    for name, text in (canary or {}).items():
        (rules / "canary" / name).write_text(text)
    return rules


def yara_rule(name: str, marker: str | None) -> str:
    condition = (
        f'$m = "{marker}"\n    condition:\n        $m' if marker else "condition:\n        true"
    )
    strings = "strings:\n        " if marker else ""
    return (
        f'rule {name}\n{{\n    meta:\n        description = "lab rule-bundle check"\n'
        f'        severity = "virus"\n    {strings}{condition}\n}}\n'
    )


def row_hex(tag: str, n: int) -> str:
    return f"CLAM-ROW-{tag}-{n}".encode().hex()


def scanners_at(pair: Pair) -> dict[str, dict[str, int | None]]:
    return {
        key: {n: s.get("rules_bundle") for n, s in tower.pool().items()}
        for key, tower in pair.towers.items()
    }


def wait_rolled_out(pair: Pair, version: int) -> float:
    """Seconds until every scanner of both towers runs ``version``."""
    started = time.monotonic()

    def done() -> bool:
        return all(v == version for t in scanners_at(pair).values() for v in t.values())

    wait_for(done, ROLLOUT_TIMEOUT_S, f"every scanner of both towers on bundle {version}", 0.5)
    return time.monotonic() - started


def send_direct(pair: Pair, key: str, body: str) -> str:
    """One message straight to tower ``key``'s relay; its token."""
    tower = pair.towers[key]
    token, rcpt = pair.token(), pair.rcpt(0)
    with smtplib.SMTP(str(tower.settings.hosts.relay), 25, timeout=30) as smtp:
        smtp.send_message(pair.message(token, rcpt, body=body), "someone@internet.lab", [rcpt])
    return token


def verdicts_at_goc(pair: Pair, tokens: set[str]) -> dict[str, tuple[str, str, str]]:
    """Token → (tower, verdict, findings) of the events the GOC holds for these messages."""
    out = pair.goc_sql(
        "SELECT message_id, tower, verdict, findings::text FROM verdict_events"
        " WHERE received_at > now() - interval '1 hour' AND message_id LIKE '%@internet.lab>'"
    )
    found = {}
    for line in out.splitlines():
        message_id, tower, verdict, findings = line.split("|", 3)
        token = message_id.strip("<>").split("@", 1)[0].rsplit(".", 1)[-1]
        if token in tokens:
            found[token] = (tower, verdict, findings)
    return found


def tempfails_since(pair: Pair, since: float) -> int:
    """Messages the relays could not hand to a scanner (deferred on the content filter: a 451,
    a lost or refused connection), since ``since`` (epoch), from the relays' logs."""
    total = 0
    for tower in pair.towers.values():
        filter_hop = f"127.0.0.1]:{tower.settings.ports.filter}"  # relay= or connect to
        grep = (
            f"journalctl -q --since @{int(since)} | grep -F 'status=deferred'"
            f" | grep -c -F '{filter_hop}' || true"
        )
        total += int(tower.relay().check_output(grep).strip() or 0)
    return total


class Load:
    """The sender hands a message to the towers every 0.2 s until stopped."""

    def __init__(self, pair: Pair) -> None:
        self.pair, self.sent, self.errors = pair, [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sent.extend(self.pair.submit(self.pair.rcpt(0)))
            except (OSError, smtplib.SMTPException) as exc:
                self.errors.append(repr(exc))
            time.sleep(0.2)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_new_bundle_reaches_every_scanner_and_detects_at_both_towers(
    pair: Pair, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:10]
    yara_marker, clam_marker = f"MAILTOWER-NEW-YARA-{tag}", f"MAILTOWER-NEW-CLAM-{tag}"
    rule_name, sig_name = f"Mailtower_Lab_New_{tag}", f"Mailtower.Lab.New-{tag}"

    # Before: neither marker is known; both towers deliver them.
    before = {send_direct(pair, k, f"{yara_marker}\n{clam_marker}") for k in pair.towers}
    pair.wait_delivered(sorted(before), timeout=180)

    rules = rules_with(
        tmp_path,
        yara={"lab-new.yar": yara_rule(rule_name, yara_marker)},
        clamav={"lab-new.ndb": f"{sig_name}:0:*:{clam_marker.encode().hex()}\n"},
        # what the monitor checks the first scanner with, besides its own EICAR and clean
        canary={
            "virus-new-markers.eml": f"Subject: new markers\n\n{yara_marker}\n{clam_marker}\n",
            "clean-no-marker.eml": "Subject: an ordinary line\n\nNothing to see.\n",
        },
    )
    started = time.time()
    with Load(pair) as load:
        time.sleep(3)
        published = time.monotonic()
        version = publish_at_goc(rules)
        rollout_s = wait_rolled_out(pair, version)
        publish_s = time.monotonic() - published
        time.sleep(3)

    # After: the same messages are quarantined at both towers, by YARA and by clamd.
    after = {k: send_direct(pair, k, f"{yara_marker}\n{clam_marker}") for k in pair.towers}
    found = wait_for(
        lambda: (v := verdicts_at_goc(pair, set(after.values()))) and len(v) == 2 and v,
        120,
        "the verdicts of the marker messages at the GOC",
        1,
    )
    for key, token in after.items():
        tower, verdict, findings = found[token]
        assert tower == pair.towers[key].name and verdict == "virus", found[token]
        assert rule_name in findings and sig_name in findings, findings

    # Mail sent during the rollout: all delivered, no scanner tempfail.
    assert not load.errors, load.errors[:3]
    lost = len(set(load.sent) - set(pair.wait_delivered(load.sent, timeout=300)))
    tempfails = tempfails_since(pair, started)
    assert tempfails == 0

    # A bundle that slips through with a rule matching everything: the canary on the first
    # scanner of each tower fails, it is rolled back, no other scanner takes it.
    bad_rules = rules_with(
        tmp_path,
        yara={"lab-new.yar": yara_rule(rule_name, yara_marker), "bad.yar": yara_rule("Bad", None)},
        clamav={},
    )
    bad_started = time.time()
    with Load(pair) as bad_load:
        bad = publish_at_goc(bad_rules)

        def rejected() -> bool:
            return all(bad in t.pool_doc()["rules"]["rejected"] for t in pair.towers.values())

        wait_for(rejected, 300, f"both monitors to reject bundle {bad}", 1)
        time.sleep(3)
    assert all(v == version for t in scanners_at(pair).values() for v in t.values())
    lost += len(set(bad_load.sent) - set(pair.wait_delivered(bad_load.sent, timeout=300)))
    bad_tempfails = tempfails_since(pair, bad_started)

    # Updates in a row (new marker each time), mail flowing all along.
    times: list[float] = []
    with Load(pair) as row_load:
        for n in range(UPDATES):
            extra = {f"row-{n}.yar": yara_rule(f"Mailtower_Row_{tag}_{n}", f"ROW-{tag}-{n}")}
            rules_n = rules_with(
                tmp_path,
                yara={"lab-new.yar": yara_rule(rule_name, yara_marker), **extra},
                clamav={
                    "lab-new.ndb": f"{sig_name}:0:*:{clam_marker.encode().hex()}\n",
                    # a new signature each time: every update reloads clamd and c-icap too
                    f"row-{n}.ndb": f"Mailtower.Row-{tag}-{n}:0:*:{row_hex(tag, n)}\n",
                },
            )
            t0 = time.monotonic()
            version = publish_at_goc(rules_n)
            wait_rolled_out(pair, version)
            times.append(time.monotonic() - t0)
    lost += len(set(row_load.sent) - set(pair.wait_delivered(row_load.sent, timeout=300)))
    row_tempfails = tempfails_since(pair, bad_started)

    # VirusEye's source: each monitor reports its tower's rule version to the GOC.
    def goc_shows_versions() -> bool:
        out = pair.goc_sql(
            "SELECT tower, rules_bundle, rules_target, scanners_behind FROM tower_status"
        )
        rows = {line.split("|")[0]: line.split("|")[1:] for line in out.splitlines()}
        wanted = [str(version), str(version), "0"]
        return all(rows.get(t.name) == wanted for t in pair.towers.values())

    wait_for(goc_shows_versions, 60, f"both towers on bundle {version} in tower_status", 1)
    record_figure(
        "rule_bundles",
        {
            "publish_to_all_46_scanners_s": round(publish_s, 1),
            "rollout_after_publish_s": round(rollout_s, 1),
            "messages_during_rollout": len(load.sent),
            "tempfailed": tempfails,
            "lost": lost,
            "bad_bundle_rejected": True,
            "messages_during_bad_bundle": len(bad_load.sent),
            "tempfailed_bad_bundle": bad_tempfails,
            "updates_in_a_row": UPDATES,
            "update_times_s": [round(t, 1) for t in times],
            "messages_during_updates": len(row_load.sent),
            "tempfailed_updates_and_bad": row_tempfails,
        },
    )
    assert bad_tempfails == 0 and row_tempfails == 0
