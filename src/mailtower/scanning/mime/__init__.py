"""Union MIME parsing: every plausible reading of a message, and where the readings disagree.

Attackers hide payloads in MIME that one parser reads one way and a mail client another. The
scanner reads each message several ways — Python's ``email`` under two policies, a lenient raw
boundary scanner, lenient transfer decoding, uuencode/yEnc blocks in text — and scans the union
of decoded objects. Disagreement between readings and hostile constructs are reported as
anomalies; :data:`HOSTILE_ANOMALIES` says which of them must keep a message from ``clean``.
"""

from __future__ import annotations

from mailtower.scanning.mime._analyse import MESSAGE_PATH, analyse
from mailtower.scanning.mime._anomalies import (
    DISAGREEMENT_ANOMALIES,
    HOSTILE_ANOMALIES,
    INFORMATIONAL_ANOMALIES,
    WALL_TIMEOUT,
    is_hostile,
)
from mailtower.scanning.mime._limits import MimeLimits

__all__ = [
    "DISAGREEMENT_ANOMALIES",
    "HOSTILE_ANOMALIES",
    "INFORMATIONAL_ANOMALIES",
    "MESSAGE_PATH",
    "WALL_TIMEOUT",
    "MimeLimits",
    "analyse",
    "is_hostile",
]
