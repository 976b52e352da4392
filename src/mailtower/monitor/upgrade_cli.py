"""``mailtower-monitor upgrade status|wait``: the rolling upgrade as the deploy sees it.

Run on the monitor after a deploy installed new code on the scanners. Each scanner's /health
says what it runs and what is installed; the monitor's /pool says which scanners its windows
kept out, and why. ``status`` prints how many scanners are behind or kept out (the deploy's
fact: 0 means nothing to wait for). ``wait`` returns 0 once every scanner that answers runs
what is installed, and 1 at once when a scanner failed its check (naming the scanner, the
check and the fix) or at ``upgrade.wait_timeout_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mailtower import settings as settings_mod
from mailtower.monitor import health
from mailtower.settings import TowerSettings

WAIT_POLL_S = 2.0


@dataclass(frozen=True)
class Progress:
    """The roll as seen now."""

    behind: list[str]  # answering, running something other than what is installed
    down: list[str]  # not answering /health (they start with what is installed)
    stuck: dict[str, dict]  # kept out by the monitor: {scanner: {address, reason, hint}}
    applying: list[str]  # in a window now (restarted, not yet checked and back)

    @property
    def done(self) -> bool:
        return not self.behind and not self.stuck and not self.applying


def judge(
    scanners: list[tuple[str, str]], answers: list[tuple[bool, dict]], pool: dict
) -> Progress:
    """What the scanners' /health ``answers`` and the monitor's ``pool`` say (pure)."""
    upgrade = pool.get("upgrade") or {}
    stuck = dict(upgrade.get("stuck") or {})
    behind, down = [], []
    for (name, address), (_ok, doc) in zip(scanners, answers, strict=True):
        if not doc:
            down.append(f"{name} ({address})")
            continue
        installed = doc.get("stack_installed")
        if name in stuck and installed not in (None, stuck[name].get("installed")):
            del stuck[name]  # new code since it failed: the monitor tries it again
            behind.append(f"{name} ({address})")
        elif installed and doc.get("stack") != installed:
            behind.append(f"{name} ({address})")
        elif doc.get("stack_pending"):  # a deploy writes, or systemd has yet to reload: wait
            behind.append(f"{name} ({address}): {doc['stack_pending']}")
    return Progress(behind, down, stuck, list(upgrade.get("applying") or []))


def failure_text(tower: str, progress: Progress) -> str:
    lines = [f"tower {tower}: the rolling upgrade stopped; kept out of service:"]
    for name, info in sorted(progress.stuck.items()):
        lines.append(f"  scanner {name} ({info.get('address')}): {info.get('reason')}")
    hint = next(iter(progress.stuck.values())).get("hint", "")
    lines.append(f"fix: {hint}; the monitor's /pool (upgrade.stuck) shows the reason")
    return "\n".join(lines)


async def observe(settings: TowerSettings) -> Progress:
    port, timeout = settings.ports.scanner_http, settings.limits.health_timeout_s
    scanners = [(settings.scanner_name(i), str(a)) for i, a in enumerate(settings.hosts.scanners)]
    answers = await asyncio.gather(*(health.check(a, port, timeout) for _, a in scanners))
    pool = await _pool(settings)
    return judge(scanners, list(answers), pool)


async def _pool(settings: TowerSettings) -> dict:
    """The local monitor's /pool (its HTTP server answers GET on the monitor's port)."""
    port = settings.ports.monitor_http
    status, doc = await health.request("127.0.0.1", port, "GET", "/pool", timeout_s=5.0)
    if status != 200:
        raise RuntimeError(f"the monitor's /pool answered {status}")
    return doc


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mailtower-monitor upgrade", description=__doc__)
    parser.add_argument("action", choices=["status", "wait"])
    parser.add_argument("--settings", type=Path, default=settings_mod.SETTINGS_PATH)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    settings = settings_mod.load(args.settings)
    tower = settings.name
    if args.action == "status":
        try:
            progress = asyncio.run(observe(settings))
        except (OSError, TimeoutError, ValueError, RuntimeError) as exc:
            print(f"monitor of {tower}: cannot read the pool ({exc}); is mailtower-monitor up?")
            return 2
        if args.json:
            print(json.dumps(progress.__dict__))
        else:
            print(len(progress.behind) + len(progress.stuck) + len(progress.applying))
        return 0
    deadline = time.monotonic() + settings.upgrade.wait_timeout_s
    started = time.monotonic()
    shown = -1
    while True:
        seen: Progress | None
        error = ""
        try:
            seen = asyncio.run(observe(settings))
        except (OSError, TimeoutError, ValueError, RuntimeError) as exc:
            seen = None
            error = str(exc)
        if seen is not None:
            if len(seen.behind) != shown:  # progress, one line per change
                shown = len(seen.behind)
                print(f"tower {tower}: {shown} scanners to restart", flush=True)
            if seen.stuck:
                print(failure_text(tower, seen), file=sys.stderr)
                return 1
            if seen.done:
                print(
                    f"tower {tower}: every scanner runs what is installed "
                    f"({time.monotonic() - started:.0f}s)"
                    + (f"; not answering: {', '.join(seen.down)}" if seen.down else "")
                )
                return 0
        if time.monotonic() > deadline:
            what = (
                f"still behind: {', '.join(seen.behind)}"
                if seen is not None
                else f"the monitor did not answer: {error}"
            )
            print(
                f"tower {tower}: the rolling upgrade did not finish within "
                f"{settings.upgrade.wait_timeout_s:g}s (upgrade.wait_timeout_s); {what}. "
                "fix: look at the monitor's /pool (upgrade) and journalctl -u mailtower-monitor",
                file=sys.stderr,
            )
            return 1
        time.sleep(WAIT_POLL_S)
