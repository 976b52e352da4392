"""mailtower-monitor: health-checks the scanners and drains/enables them in the relay's HAProxy."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from mailtower import settings as settings_mod
from mailtower.monitor.service import Monitor

log = logging.getLogger("mailtower.monitor")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["upgrade"]:  # the rolling upgrade as the deploy sees it
        from mailtower.monitor import upgrade_cli

        return upgrade_cli.main(argv[1:])
    parser = argparse.ArgumentParser(prog="mailtower-monitor", description=__doc__)
    parser.add_argument("--settings", type=Path, default=settings_mod.SETTINGS_PATH)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    try:
        tower = settings_mod.load(args.settings)
    except settings_mod.SettingsError as exc:
        log.error("event=settings_error error=%r", str(exc))
        return 2
    asyncio.run(_run(Monitor(tower)))
    return 0


async def _run(monitor: Monitor) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await monitor.run(stop)


if __name__ == "__main__":
    raise SystemExit(main())
