"""Pull rule bundles from the GOC into the tower's mirror.

The GOC's ``latest.json`` names its newest bundle. A newer one than the mirror's, and not
rejected here, is downloaded and published into the mirror with ``bundles.publish``
(signature, hashes, newer than the mirror's, rules compile — or the mirror is left as it was).
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mailtower import bundles
from mailtower.bundles._format import MAX_BUNDLE_BYTES
from mailtower.monitor.metrics import MonitorMetrics

log = logging.getLogger("mailtower.monitor.rollout")

FETCH_TIMEOUT_S = 30.0


def fetch(url: str, timeout_s: float = FETCH_TIMEOUT_S, limit: int | None = None) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return reply.read(limit or MAX_BUNDLE_BYTES + 1)


class Puller:
    """The GOC's bundles at ``source`` (its ``latest.json``) into the mirror at ``mirror_dir``."""

    def __init__(self, source: str, mirror_dir: Path, metrics: MonitorMetrics) -> None:
        self.source = source
        self.mirror_dir = mirror_dir
        self.metrics = metrics
        self._said_none = False

    async def pull(self, public_key: Ed25519PublicKey, rejected: set[int]) -> int | None:
        """Mirror the GOC's latest bundle if it is newer and not in ``rejected``; the version
        now published in the mirror, or None when nothing changed."""
        m = self.metrics
        try:
            doc = await asyncio.to_thread(fetch, f"{self.source}/latest.json", 10.0, 64 * 1024)
            latest = bundles.parse_latest(doc)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                m.rules_pull_failures.inc()
                log.warning("event=rules_pull_failed source=%s error=%r", self.source, str(exc))
            elif not self._said_none:  # nothing published at the GOC yet: normal, said once
                log.info("event=rules_none_published source=%s", self.source)
                self._said_none = True
            return None
        except (OSError, bundles.BundleError) as exc:
            m.rules_pull_failures.inc()
            log.warning("event=rules_pull_failed source=%s error=%r", self.source, str(exc))
            return None
        mirrored = bundles.read_latest(self.mirror_dir) if self.mirror_dir.is_dir() else None
        if mirrored is not None and latest.version <= mirrored.version:
            return None
        if latest.version in rejected:
            return None
        started = time.monotonic()
        self.mirror_dir.mkdir(parents=True, exist_ok=True)
        incoming = self.mirror_dir / f".incoming-{latest.file}"
        try:
            data = await asyncio.to_thread(fetch, f"{self.source}/{latest.file}")
            incoming.write_bytes(data)
            published = await asyncio.to_thread(
                bundles.publish, incoming, public_key, self.mirror_dir
            )
        except (OSError, bundles.BundleError) as exc:
            m.rules_pull_failures.inc()
            log.error(
                "event=rules_bundle_refused version=%s source=%s error=%r",
                latest.version,
                self.source,
                str(exc),
            )
            return None
        finally:
            incoming.unlink(missing_ok=True)
        if published.version in rejected:  # latest.json is not signed: the bundle is
            return None
        log.info(
            "event=rules_mirrored version=%d seconds=%.2f",
            published.version,
            time.monotonic() - started,
        )
        return published.version
