"""ClamAV's official databases, verified at every hop: GOC (cvdupdate's files) → monitor
(its mirror) → scanners (freshclam from the monitor). Issue 16.

Usage::

    verify_cvd(Path("daily.cvd"))                     # CvdHeader, or DatabaseError
    verify_chain(Path("daily.cvd"), [Path("daily-2.cdiff")], Path("new/daily.cvd"))
    publish(Path("/var/lib/cvdupdate/database"), Path("/srv/mailtower/clamav"),
            ["main", "daily", "bytecode"], {"last_check": time.time()})      # at the GOC
    pull("http://goc:8081/clamav", Path("/srv/mailtower/mirror/clamav"),
         ["main", "daily", "bytecode"])                                    # on a monitor
    mirror_versions(Path("/srv/mailtower/mirror/clamav"))   # {db: version}: the rollout target
    live_versions(Path("/var/lib/clamav"))                  # {db: version} clamd loads

A served directory holds ``<db>.cvd``, ``<db>-N.cdiff`` (only CDIFFs whose chain verified) and
``index.json``, written last (format in ``_mirror``). Signatures are checked by ClamAV's own
``sigtool`` (``_cvd``); a refused file never replaces a served one.

Third-party feeds (Fangfrisch at the GOC, ``_feeds``) are served beside them in ``feeds/``,
each file loaded by libclamav first; ``mirror_versions`` then has ``"feeds": <serial>``, and a
scanner takes the set with ``sync_feeds`` (sha256 of each file checked).
"""

from __future__ import annotations

from mailtower.clamavdb._cvd import CvdHeader, live_versions, read_header, verify_chain, verify_cvd
from mailtower.clamavdb._feeds import FEEDS, is_feed_file, verify_feed
from mailtower.clamavdb._mirror import (
    INDEX,
    KEEP_CDIFFS,
    mirror_versions,
    publish,
    pull,
    read_index,
    sync_feeds,
)
from mailtower.clamavdb.errors import DatabaseError

__all__ = [
    "FEEDS",
    "INDEX",
    "KEEP_CDIFFS",
    "CvdHeader",
    "DatabaseError",
    "is_feed_file",
    "live_versions",
    "mirror_versions",
    "publish",
    "pull",
    "read_header",
    "read_index",
    "sync_feeds",
    "verify_chain",
    "verify_cvd",
    "verify_feed",
]
