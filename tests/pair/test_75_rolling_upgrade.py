"""A new mailtower version on a running tower, while mail flows (issue 19, rolling upgrades).

A wheel of this source with a new version (``0.1.0+roll<time>``) is installed on every scanner
of lab-a, as the deploy installs one (roles/_common.install_stack), and scand keeps running:
each /health names new code installed. The monitor restarts the 23 scanners a few at a time in
drained windows (health and canary checked before each goes back); ``mailtower-monitor upgrade
wait``, the deploy's last step, returns when they all run it. Then the deployed wheel goes back
the same way. Meanwhile the sender hands a message to the towers every 0.2 s: none is
tempfailed on the content-filter hop, none lost.

Then a scanner whose new code cannot start (its settings file broken): it goes first and alone,
fails its health check, stays in maintenance with the reason on the monitor's /pool, and the
wait fails naming it, the check and the fix; mended, the monitor checks it again and puts it back.

Figures: tests/output/figures.json (rolling_upgrade).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import Pair
from test_70_rule_bundles import Load, tempfails_since
from towerlib import ROOT, Tower, record_figure, wait_for

TOWER = "a"  # the pair fixture's key for lab-a
VENV = "/opt/mailtower/venv"
DEPLOYED = "/opt/mailtower/wheelhouse"  # the deploy's wheels (roles/_common.install_stack)
SETTINGS = "/etc/mailtower/tower.json"
UPGRADE = f"{VENV}/bin/mailtower-monitor upgrade"


def new_version_wheel(tmp: Path) -> Path:
    """This source built as another version: what a release of new code installs."""
    src = tmp / "src-tree"
    shutil.copytree(ROOT / "src", src / "src")
    for name in ("README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    version = f"0.1.0+roll{int(time.time())}"
    text = (
        (ROOT / "pyproject.toml").read_text().replace('version = "0.1.0"', f'version = "{version}"')
    )
    assert version in text, "pyproject.toml's version line moved"
    (src / "pyproject.toml").write_text(text)
    out = tmp / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(src),
        ],
        check=True,
    )
    return next(out.glob("mailtower-*.whl"))


def on_scanners(tower: Tower, command: str, wheel: Path | None = None) -> None:
    """Run ``command`` on every scanner at once (after uploading ``wheel`` to /tmp)."""

    def one(name: str) -> None:
        node = tower.node(name)
        if wheel is not None:
            sftp = node.backend.client.open_sftp()
            try:
                sftp.put(str(wheel), f"/tmp/{wheel.name}")
            finally:
                sftp.close()
        node.check_output(command)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, [h.name for h in tower.hosts("scanners")]))


def install(wheel_path: str) -> str:
    return (
        f"{VENV}/bin/pip install --quiet --no-index --find-links {DEPLOYED} "
        f"--force-reinstall --no-deps {wheel_path}"
    )


def wait_upgrade(tower: Tower) -> tuple[int, str, float]:
    """The deploy's last step on the monitor: its exit status, its output, its seconds."""
    started = time.monotonic()
    done = tower.monitor().run(f"{UPGRADE} wait")
    return done.rc, done.stdout + done.stderr, time.monotonic() - started


def behind_now(tower: Tower) -> int:
    return int(tower.monitor().check_output(f"{UPGRADE} status").strip())


def test_new_version_rolls_across_the_pool_without_a_tempfail(pair: Pair, tmp_path: Path) -> None:
    tower = pair.towers[TOWER]
    wheel = new_version_wheel(tmp_path)
    assert behind_now(tower) == 0, "a roll is already under way; start from a deployed tower"
    started = time.time()
    with Load(pair) as load:
        time.sleep(3)
        on_scanners(tower, install(f"/tmp/{wheel.name}"), wheel)
        assert wait_for(lambda: behind_now(tower) > 0, 30, "scanners to name new code", 1)
        rc, out, roll_s = wait_upgrade(tower)
        assert rc == 0, out
        pool = tower.pool()
        assert all(s["stack"] == s["stack_installed"] and not s["held"] for s in pool.values())
        versions = {
            tower.node(h.name).check_output(f"{VENV}/bin/pip show mailtower | grep ^Version")
            for h in tower.hosts("scanners")
        }
        assert versions == {f"Version: {wheel.name.split('-')[1]}"}, versions
        # and back to the deployed wheel, the same way (a tower as the deploy left it)
        on_scanners(tower, install(f"{DEPLOYED}/mailtower-*.whl"))
        wait_for(lambda: behind_now(tower) > 0, 30, "scanners to name the deployed code", 1)
        rc, out, back_s = wait_upgrade(tower)
        assert rc == 0, out
        time.sleep(3)
    assert not load.errors, load.errors[:3]
    lost = set(load.sent) - set(pair.wait_delivered(load.sent, timeout=300))
    tempfails = tempfails_since(pair, started)
    record_figure(
        "rolling_upgrade",
        {
            "scanners": len(tower.hosts("scanners")),
            "batch": tower.settings.upgrade.batch,
            "roll_23_scanners_s": round(roll_s, 1),
            "roll_back_s": round(back_s, 1),
            "messages_during_rolls": len(load.sent),
            "tempfailed": tempfails,
            "lost": len(lost),
        },
    )
    assert tempfails == 0
    assert not lost, sorted(lost)[:5]


def test_a_scanner_failing_its_check_stops_the_roll_and_stays_out(pair: Pair) -> None:
    tower = pair.towers[TOWER]
    victim = tower.hosts("scanners")[4]
    name = tower.settings.scanner_name(4)
    node = tower.node(victim.name)
    assert behind_now(tower) == 0
    node.check_output(f"cp -p {SETTINGS} {SETTINGS}.roll-saved && echo '{{' >> {SETTINGS}")
    try:
        rc, out, _ = wait_upgrade(tower)
        assert rc == 1, out
        assert f"scanner {name} ({victim.address})" in out and "health check failed" in out, out
        assert "fix:" in out, out
        stuck = tower.pool_doc()["upgrade"]["stuck"]
        assert set(stuck) == {name} and "health check failed" in stuck[name]["reason"]
        assert tower.haproxy_states()[name] & 1, "the scanner kept out is not in maintenance"
    finally:
        node.check_output(f"mv {SETTINGS}.roll-saved {SETTINGS}")
    wait_for(
        lambda: not tower.pool_doc()["upgrade"]["stuck"], 300, f"the monitor to put {name} back", 2
    )
    wait_for(lambda: tower.haproxy_states()[name] & 1 == 0, 60, f"{name} ready in HAProxy", 1)
    rc, out, _ = wait_upgrade(tower)
    assert rc == 0, out
