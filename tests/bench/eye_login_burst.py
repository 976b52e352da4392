"""How many of a burst of parallel wrong passwords VirusEye actually checks (issue 15).

Starts the VirusEye app on a loopback port (no database needed), sends ``--burst`` wrong
passwords for one operator at once, and counts calls to ``mailtower.goc.eye.auth.verify_password``
(the scrypt check). ``--addresses`` sends each from its own loopback address (127.0.0.2, …),
which tests the per-account limit rather than the per-address one. Uses only the API the
code had before the fix too, so the same command measures both:

    PYTHONPATH=src .venv/bin/python tests/bench/eye_login_burst.py [--burst 24] [--addresses]
    PYTHONPATH=/path/to/old/checkout/src .venv/bin/python tests/bench/eye_login_burst.py

Prints one JSON line: checked, the statuses and their counts, seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from mailtower.goc.eye import auth
from mailtower.goc.eye.app import EyeConfig, make_app
from mailtower.goc.eye.auth import Credentials


async def burst(count: int, addresses: bool) -> dict[str, object]:
    checked = 0
    lock = threading.Lock()
    verify = auth.verify_password

    def counted(password: str, encoded: str) -> bool:
        nonlocal checked
        with lock:
            checked += 1
        return verify(password, encoded)

    auth.verify_password = counted  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        credentials = Path(tmp) / "operators"
        Credentials(credentials).set_password("alice", "alice's long password")
        app = make_app(EyeConfig(credentials=credentials, secret=b"k" * 64), lambda: {})
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}"

        async def guess(i: int) -> int:
            local = (f"127.0.0.{i + 2}", 0) if addresses else None
            connector = aiohttp.TCPConnector(local_addr=local)
            async with aiohttp.ClientSession(connector=connector) as session:
                response = await session.post(
                    f"{url}/login",
                    data={"name": "alice", "password": f"guess {i}"},
                    headers={"Origin": url},
                    allow_redirects=False,
                )
                return response.status

        started = time.monotonic()
        try:
            statuses = await asyncio.gather(*(guess(i) for i in range(count)))
        finally:
            await runner.cleanup()
        elapsed = time.monotonic() - started
    return {
        "burst": count,
        "from_addresses": count if addresses else 1,
        "checked": checked,
        "statuses": dict(sorted(collections.Counter(statuses).items())),
        "seconds": round(elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=24)
    parser.add_argument("--addresses", action="store_true", help="one loopback address each")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(json.dumps(asyncio.run(burst(args.burst, args.addresses))))


if __name__ == "__main__":
    main()
