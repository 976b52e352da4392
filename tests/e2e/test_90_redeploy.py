"""Idempotence (docs/design.md invariant 5): a second deploy of the unchanged tower changes nothing
and restarts nothing."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from towerlib import ROOT, record_figure

NODE = "prometheus-node-exporter"
SERVICES = {
    "relay": ["postfix", "haproxy", "mailtower-relay-exporter", NODE],
    "monitor": ["mailtower-monitor", "nginx", "prometheus", "prometheus-alertmanager", NODE],
    "sql": ["postgresql@15-main", NODE],
    "scanners": ["clamav-daemon", "mailtower-scand", NODE],
}


def _started_at(tower) -> dict[str, str]:
    stamps = {}
    for group, services in SERVICES.items():
        for h in tower.hosts(group):
            node = tower.node(h.name)
            for svc in services:
                stamps[f"{h.name}/{svc}"] = node.check_output(
                    f"systemctl show -p ActiveEnterTimestampMonotonic --value {svc}"
                )
    return stamps


def test_second_deploy_changes_and_restarts_nothing(tower):
    before = _started_at(tower)
    script = "deploys/lab.py" if tower.is_lab else "deploys/tower.py"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyinfra",
            "-y",
            str(tower.inventory_path.relative_to(ROOT)),
            script,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr  # pyinfra logs its results to stderr
    assert done.returncode == 0, output[-6000:]
    # pyinfra's results table: Operation | Hosts | Success | Error | No Change ("-" is 0);
    # "Success" counts hosts where the operation changed something.
    rows = re.findall(r"^\s{4}(.+?)\s{2,}(\d+)\s+(\d+|-)\s+(\d+|-)\s+(\d+|-)\s*$", output, re.M)
    assert rows and rows[-1][0].strip() == "Grand total", output[-2000:]
    changed = [r[0].strip() for r in rows[:-1] if r[2] != "-"]
    assert changed == [], output[-4000:]
    assert _started_at(tower) == before, "a service was restarted by a no-change deploy"
    record_figure("redeploy_no_change_s", round(elapsed, 1))
