"""What the scanning pipeline passes between its stages: decoded objects and their origin.

The union MIME parser turns one message into ScanObjects (every decoded part from every
plausible reading); the container stage adds their members; engines and Skeptic examine them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The content type the pipeline gives the VBA source it reads out of a document (an object of
# its own, beside the document): what MS-OVBA compression hides from plain-text matching.
VBA_SOURCE_TYPE = "text/x-vba"


@dataclass(frozen=True)
class ScanObject:
    """One decoded object to examine: the raw message, a MIME part, or a container member."""

    data: bytes
    path: str  # where it came from, e.g. "message", "1.2", "1.2/invoice.zip!a/b.exe"
    filenames: frozenset[str] = frozenset()  # every candidate file name, from every reading
    content_types: frozenset[str] = frozenset()  # every declared type (lower case)
    views: frozenset[str] = frozenset()  # the readings that produced it (e.g. "email-default")
    depth: int = 0  # container nesting depth (0 = straight from the message)


@dataclass
class Analysis:
    """Everything the parsing stages made of one message."""

    objects: list[ScanObject] = field(default_factory=list)
    # Signals for Skeptic, each a short rule-like name: "mime.views-disagree",
    # "mime.boundary-collision", "mime.base64-junk", "container.limit-exceeded", …
    anomalies: list[str] = field(default_factory=list)
