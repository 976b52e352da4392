"""Kill a scanner while 1,000 messages flow: nothing accepted is lost; the monitor drains the
scanner within 5 s and enables it again within 5 s of its return."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from towerlib import ROOT, record_figure, wait_for

MESSAGES = 1000
CONNECTIONS = 8
DRAIN_GOAL_S = 5.0


class PoolWatcher(threading.Thread):
    """Polls the monitor's pool view and records when each scanner leaves and rejoins."""

    def __init__(self, tower) -> None:
        super().__init__(daemon=True)
        self.tower = tower
        self.events: list[tuple[float, str, bool]] = []
        self.stop = threading.Event()
        self.last: dict[str, bool] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                pool = self.tower.pool()
            except Exception:  # noqa: BLE001 - a missed poll is retried
                time.sleep(0.2)
                continue
            now = time.monotonic()
            for name, state in pool.items():
                if self.last.get(name, True) != state["enabled"]:
                    self.events.append((now, name, state["enabled"]))
                self.last[name] = state["enabled"]
            time.sleep(0.2)

    def when(self, name: str, enabled: bool, after: float) -> float | None:
        for t, n, e in self.events:
            if n == name and e == enabled and t >= after:
                return t
        return None


def _healthy(tower, address: str) -> bool:
    """The scanner's own health answer, asked from the monitor (the only host allowed to)."""
    url = f"http://{address}:{tower.settings.ports.scanner_http}/health"
    return tower.monitor().run(f"curl -fsS -m 1 {url}").rc == 0


def _deploy_to_down_host(tower, name: str) -> subprocess.CompletedProcess:
    script = "deploys/lab.py" if tower.is_lab else "deploys/tower.py"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pyinfra",
            "-y",
            "--limit",
            name,
            str(tower.inventory_path.relative_to(ROOT)),
            script,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_killing_scanners_loses_nothing(mail, tower):
    if not tower.is_lab:
        pytest.skip("stops a whole scanner host: the lab's LXC hosts only")
    from mailtower.controller.lab import lxc

    s = tower.settings
    victims = tower.hosts("scanners")[:2]
    killed_name, stopped_name = (s.scanner_name(i) for i in range(2))
    killed, stopped = victims
    watcher = PoolWatcher(tower)
    watcher.start()

    tokens = [mail.token() for _ in range(MESSAGES)]
    accepted: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    progress = {"sent": 0}

    def sender(chunk: list[str]) -> None:
        smtp = mail.connect()
        for token in chunk:
            try:
                smtp.send_message(
                    mail.message(token), from_addr="sender@internet.lab", to_addrs=[mail.rcpt()]
                )
                with lock:
                    accepted.append(token)
                    progress["sent"] += 1
            except Exception:  # noqa: BLE001 - a refusal is counted, the sender retries later
                with lock:
                    refused.append(token)
                smtp = mail.connect()

    chunks = [tokens[i::CONNECTIONS] for i in range(CONNECTIONS)]
    times: dict[str, float] = {}
    started = time.monotonic()
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        futures = [pool.submit(sender, c) for c in chunks]
        wait_for(lambda: progress["sent"] >= MESSAGES // 5, 300, "a fifth of the messages sent")
        tower.node(killed.name).check_output("systemctl kill -s SIGKILL mailtower-scand")
        times["kill"] = time.monotonic()
        wait_for(lambda: progress["sent"] >= MESSAGES // 2, 300, "half of the messages sent")
        lxc.stop_host(stopped.data["lab_name"])
        times["stop"] = time.monotonic()
        for f in futures:
            f.result()
    send_s = time.monotonic() - started

    # A deploy to a host that is down fails, naming it, while the tower carries on.
    down_deploy = _deploy_to_down_host(tower, stopped.name)

    # The crashed daemon is restarted by systemd; the stopped host is started again.
    lxc.start_host(stopped.data["lab_name"])
    times["start"] = time.monotonic()
    wait_for(lambda: _healthy(tower, stopped.address), 120, f"{stopped_name} healthy again")
    times["stopped_healthy"] = time.monotonic()
    wait_for(
        lambda: watcher.when(stopped_name, True, times["stopped_healthy"] - 5),
        30,
        f"the monitor to enable {stopped_name} again",
    )

    assert not refused, f"{len(refused)} messages refused by the relay"
    wait_for(
        lambda: set(accepted) <= set(mail.delivered()),
        300,
        "every accepted message at the customer",
    )
    delivered = mail.delivered()
    all_delivered_s = time.monotonic() - started
    watcher.stop.set()

    lost = [t for t in accepted if delivered[t] == 0]
    duplicates = sum(delivered[t] - 1 for t in accepted if delivered[t] > 1)
    killed_out = watcher.when(killed_name, False, times["kill"])
    killed_back = watcher.when(killed_name, True, times["kill"])
    stopped_out = watcher.when(stopped_name, False, times["stop"])
    stopped_back = watcher.when(stopped_name, True, times["stopped_healthy"] - 5)
    figures = {
        "messages": MESSAGES,
        "accepted": len(accepted),
        "lost": len(lost),
        "duplicates": duplicates,
        "send_seconds": round(send_s, 1),
        "accepted_per_second": round(MESSAGES / send_s, 1),
        "all_delivered_seconds": round(all_delivered_s, 1),
        "drain_after_kill_s": round(killed_out - times["kill"], 2) if killed_out else None,
        "drain_after_host_stop_s": round(stopped_out - times["stop"], 2) if stopped_out else None,
        "out_of_pool_after_kill_s": round(killed_back - killed_out, 2)
        if killed_back and killed_out
        else None,
        "enable_after_host_healthy_s": round(stopped_back - times["stopped_healthy"], 2)
        if stopped_back
        else None,
    }
    record_figure("scanner_failure", figures)
    print(figures)
    assert down_deploy.returncode != 0
    assert stopped.name in down_deploy.stdout + down_deploy.stderr
    assert lost == []
    assert killed_out and killed_out - times["kill"] <= DRAIN_GOAL_S, figures
    assert stopped_out and stopped_out - times["stop"] <= DRAIN_GOAL_S, figures
    assert killed_back, figures
    assert stopped_back and stopped_back - times["stopped_healthy"] <= DRAIN_GOAL_S, figures
