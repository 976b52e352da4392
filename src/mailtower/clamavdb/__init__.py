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
"""

from __future__ import annotations

from mailtower.clamavdb._cvd import CvdHeader, live_versions, read_header, verify_chain, verify_cvd
from mailtower.clamavdb._mirror import (
    INDEX,
    KEEP_CDIFFS,
    mirror_versions,
    publish,
    pull,
    read_index,
)
from mailtower.clamavdb.errors import DatabaseError

__all__ = [
    "INDEX",
    "KEEP_CDIFFS",
    "CvdHeader",
    "DatabaseError",
    "live_versions",
    "mirror_versions",
    "publish",
    "pull",
    "read_header",
    "read_index",
    "verify_chain",
    "verify_cvd",
]
