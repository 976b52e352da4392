"""The anomaly names the MIME stage reports, and which of them make a message suspicious.

The rule: **an anomaly alone does not condemn a message; readings that disagree about risky
content do.** Broken mailers write broken MIME, and every object and name any reading derives
is scanned and checked against the policy anyway (the union), so what the anomalies add is only
the question "could one program see something dangerous that another does not?". Each anomaly
is in one of three groups:

* **hostile on its own** (:data:`HOSTILE_ANOMALIES`) — the message was not read completely
  (``too-deep``, ``too-many-parts``, ``too-large``, ``timeout``, ``message-partial``: the
  payload is elsewhere, ``reader-error``: a reading failed, what it would have seen is unknown),
  or a construct RFC 2046 forbids that no mail program writes and that exists to make readers
  cut a message differently (``boundary-collision``: one boundary a prefix of another);
* **disagreements** (:data:`DISAGREEMENT_ANOMALIES`: ``views-disagree``, ``filename-mismatch``,
  ``base64-junk``) — always reported, informational by themselves; when the disagreement is
  about risky content (:mod:`mailtower.scanning.risk`: an executable, script, archive or macro
  document that one reading sees and another does not, a file name whose extensions differ and
  one is risky, a base64 body whose decodings or names are risky) the stage reports
  ``mime.risky-disagreement:<anomaly>`` beside it, which is hostile;
* **informational** (:data:`INFORMATIONAL_ANOMALIES`) — worth knowing, seen in sloppy
  legitimate mail, and everything they could hide is decoded and scanned anyway.
"""

from __future__ import annotations

VIEWS_DISAGREE = "mime.views-disagree"  # the readings yield different sets of objects
BOUNDARY_COLLISION = "mime.boundary-collision"  # one boundary is a prefix of another in use
BOUNDARY_VARIANT = "mime.boundary-variant"  # delimiter lines match a boundary only by case
BASE64_JUNK = "mime.base64-junk"  # non-alphabet characters or data after padding in base64
BASE64_PADDING = "mime.base64-padding"  # missing or extra padding, truncated quantum
MISSING_BOUNDARY_END = "mime.missing-boundary-end"  # a multipart without its close delimiter
CTE_MISMATCH = "mime.cte-mismatch"  # base64 body without a base64 CTE, or a garbled CTE
FILENAME_MISMATCH = "mime.filename-mismatch"  # one object, several different file names
# A name only an off-standard reading of the parameters derives (quoting ignored, folds joined
# without their space, continuations cut at a gap) has an extension no standard reading gives.
# Every such name is checked against the policy; the anomaly alone does not condemn (broken
# mailers write such headers too).
FILENAME_AMBIGUOUS = "mime.filename-ambiguous"
TOO_DEEP = "mime.too-deep"
TOO_MANY_PARTS = "mime.too-many-parts"
TOO_LARGE = "mime.too-large"  # decoded bytes over the limit
TIMEOUT = "mime.timeout"  # parsing took more CPU time than the per-message limit
# Parsing outran the wall-clock backstop (MimeLimits.max_wall_s) without reaching the CPU limit:
# the machine starved the parser. Neither hostile nor informational: the message was not read
# completely, so the pipeline answers tempfail (retried later), never clean, never suspicious.
WALL_TIMEOUT = "mime.wall-timeout"
MESSAGE_PARTIAL = "mime.message-partial"  # a fragment: the whole payload is not in this message
UUENCODE = "mime.uuencode"
YENC = "mime.yenc"
DUPLICATE_HEADER = "mime.duplicate-header"  # a part repeats Content-Type/-Disposition/-Encoding
NUL_BYTE = "mime.nul-byte"  # NUL bytes in the message
DATA_OUTSIDE_PARTS = "mime.data-outside-parts"  # encoded data in a preamble or epilogue
READER_ERROR = "mime.reader-error"  # reported as "mime.reader-error:<reader>"
# A disagreement about risky content, reported as "mime.risky-disagreement:<anomaly>" (the
# disagreement anomaly it qualifies, without its "mime." prefix), beside that anomaly.
RISKY_DISAGREEMENT = "mime.risky-disagreement"

# Signals that a message was built to be read differently by different programs so that one of
# them gets risky content, or that it could not be read completely: the pipeline must not call
# such a message clean. Mail from real mail programs, broken ones included, never raises them.
HOSTILE_ANOMALIES: frozenset[str] = frozenset(
    {
        RISKY_DISAGREEMENT,
        BOUNDARY_COLLISION,
        TOO_DEEP,
        TOO_MANY_PARTS,
        TOO_LARGE,
        TIMEOUT,
        MESSAGE_PARTIAL,
        READER_ERROR,
    }
)

# Readings disagree: informational alone, hostile through RISKY_DISAGREEMENT (module doc).
DISAGREEMENT_ANOMALIES: frozenset[str] = frozenset({VIEWS_DISAGREE, FILENAME_MISMATCH, BASE64_JUNK})

# Worth knowing (Skeptic may weigh them) but seen in sloppy legitimate mail too; everything they
# hide is decoded and scanned anyway; the disagreements are among them. (A body that merely
# looks like base64 — a key file sent 7bit — is decoded as well, so mime.cte-mismatch need not
# condemn the message; a garbled CTE that readers honour differently shows as
# mime.views-disagree, hostile when what they disagree about is risky.)
INFORMATIONAL_ANOMALIES: frozenset[str] = frozenset(
    DISAGREEMENT_ANOMALIES
    | {
        BOUNDARY_VARIANT,
        FILENAME_AMBIGUOUS,
        BASE64_PADDING,
        CTE_MISMATCH,
        MISSING_BOUNDARY_END,
        UUENCODE,
        YENC,
        DUPLICATE_HEADER,
        NUL_BYTE,
        DATA_OUTSIDE_PARTS,
    }
)


def is_hostile(anomaly: str) -> bool:
    """Whether ``anomaly`` (possibly with a ``:detail`` suffix) must keep a message from clean."""
    return anomaly.split(":", 1)[0] in HOSTILE_ANOMALIES


def risky(anomaly: str) -> str:
    """The hostile anomaly that says ``anomaly`` (one of the disagreements) is about risky
    content: ``mime.risky-disagreement:views-disagree``."""
    return f"{RISKY_DISAGREEMENT}:{anomaly.removeprefix('mime.')}"
