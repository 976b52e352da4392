"""What every format reader shares: the limits, the anomalies, and the expansion's budget.

An :class:`Expansion` counts every entry, signature, byte and CPU second of one expansion and
raises :class:`ContainerLimitExceeded` at the first limit crossed (the bomb guard of every
format); a
:class:`Sink` collects one member's output and charges each chunk before keeping it;
:meth:`Expansion.member` turns what a reader produced into a member and recurses into it. The
recursion itself (which reader reads an object) is ``_dispatch``'s: this module imports no
format.
"""

from __future__ import annotations

import io
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from mailtower.scanning.objects import ScanObject

# One logger for the package: its records keep the name they had when it was one module
# (scand's log lines carry it).
log = logging.getLogger("mailtower.scanning.containers")

MiB = 1024 * 1024

ANOMALY_LIMIT = "container.limit-exceeded"
ANOMALY_ENCRYPTED = "container.encrypted"
ANOMALY_CORRUPT = "container.corrupt"
ANOMALY_UNSUPPORTED = "container.unsupported"
# The expansion outran its wall-clock backstop before its CPU-time limit: the machine starved
# it. Not the archive's fault and not a finding: the pipeline answers tempfail (retry later).
ANOMALY_WALL_TIMEOUT = "container.wall-timeout"
# A member's local header and its directory entry give different names whose extensions agree
# or are all harmless (old archivers write such headers too): recorded, not a finding of
# suspicion. Names that disagree about a risky extension are container.corrupt.
ANOMALY_NAMES_DIFFER = "container.names-differ"
# What the pipeline records without letting it keep a message from clean.
INFORMATIONAL_ANOMALIES = frozenset({ANOMALY_NAMES_DIFFER})

IN_CHUNK = 64 * 1024  # compressed bytes fed to a decoder at a time
OUT_CHUNK = 1 * MiB  # most output a decoder may produce per call (bounds memory per step)


@dataclass(frozen=True)
class ContainerLimits:
    """How far one object may be expanded (all limits count over the whole expansion)."""

    max_depth: int = 8  # nesting levels below the object handed to expand()
    max_members: int = 10_000  # archive entries seen, in total
    max_expanded_bytes: int = 512 * MiB  # bytes produced, in total (intermediate archives too)
    max_ratio: float = 100.0  # output/input, per member and over the whole expansion
    # CPU time of the expanding thread (a starved machine must not make an archive look like
    # a bomb); a bomb of any kind reaches it in CPU, or the bytes/ratio limits first.
    max_time_s: float = 10.0
    max_wall_s: float = 30.0  # wall-clock backstop: a starved expansion still ends
    # Ratios are judged only past this much output: a tiny member (an empty form, a line of
    # spaces) routinely exceeds 100:1 and is harmless; bombs cross this within milliseconds.
    ratio_grace_bytes: int = 1 * MiB
    # Largest dictionary an LZMA/xz decoder may allocate (xz -9 needs 64 MiB): the header of an
    # xz stream chooses it, so without a cap a few bytes could demand gigabytes.
    max_decoder_memory: int = 128 * MiB
    # Archive signatures examined inside one object (zip end records and local headers, 7z
    # headers, at any offset): a plausible archive needs few; a file stuffed with them is
    # hostile, and each costs a look.
    max_signatures: int = 10_000


# -- limits and accounting ---------------------------------------------------------------------


class ContainerLimitExceeded(Exception):
    def __init__(self, which: str):
        super().__init__(which)
        self.which = which


class WallTimeout(ContainerLimitExceeded):
    """The wall-clock backstop ran out (anomaly container.wall-timeout, not a limit finding)."""

    def __init__(self) -> None:
        super().__init__("wall-time")


class Corrupt(Exception):
    """The container is damaged: it cannot be read through (anomaly container.corrupt)."""


class Unsupported(Exception):
    """A format variant the libraries cannot decode (anomaly container.unsupported)."""


class Sink:
    """Collects one member's output and charges every byte to the expansion's budget."""

    def __init__(self, expander: Expansion):
        self._expander = expander
        # BytesIO grows in place and getvalue() hands its buffer over without a copy: a
        # member costs its own size once, not twice (a list of chunks joined would double it).
        self._buf = io.BytesIO()
        self.size = 0
        self.consumed = 0  # compressed bytes fed so far (for the member's ratio)
        self.crc = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        # Charged before it is kept: the chunk that crosses a limit is dropped, not stored.
        self._expander.charge(len(data), self.size + len(data), self.consumed)
        self._buf.write(data)
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)

    def data(self) -> bytes:
        return self._buf.getvalue()


def copy(src: Sink, dst: Sink) -> None:
    """Hand what ``src`` collected (already charged) over to ``dst``."""
    dst.consumed = src.consumed
    dst._buf, dst.size, dst.crc = src._buf, src.size, src.crc


# -- the expansion -----------------------------------------------------------------------------


class Expansion:
    """The budget and the members of one expansion; ``expand`` (every reading of one object)
    is the dispatcher's (``_dispatch.Expander``)."""

    def __init__(self, obj: ScanObject, limits: ContainerLimits):
        self.obj = obj
        self.limits = limits
        # One expansion runs in one thread (thread_time is per thread).
        self.cpu_deadline = time.thread_time() + limits.max_time_s
        now = time.monotonic()
        self.wall_deadline = now + limits.max_wall_s
        # CPU time cannot run ahead of wall time: before this, the CPU clock (a system call)
        # need not be read (mime/_limits.py, Budget).
        self.cpu_possible = now + limits.max_time_s
        self.source_size = max(len(obj.data), 1)
        self.members: list[ScanObject] = []
        self.anomalies: list[str] = []
        self.entries = 0
        self.expanded = 0
        self.signatures = 0

    def expand(self, obj: ScanObject) -> None:
        """Every reading of ``obj`` (recursing into the members found).

        Abstract here so that the core imports no format: ``_dispatch.Expander``, the only
        class ``expand()`` instantiates, overrides it with the format table.
        """
        raise NotImplementedError("the core has no formats: use _dispatch.Expander")

    # -- bookkeeping

    def anomaly(self, name: str) -> None:
        if name not in self.anomalies:
            self.anomalies.append(name)

    def check_time(self) -> None:
        now = time.monotonic()
        if now >= self.cpu_possible and time.thread_time() >= self.cpu_deadline:
            raise ContainerLimitExceeded("time")
        if now >= self.wall_deadline:
            raise WallTimeout()

    def count_signature(self) -> None:
        """Count one archive signature examined inside an object (a candidate, real or not)."""
        self.signatures += 1
        if self.signatures > self.limits.max_signatures:
            raise ContainerLimitExceeded("signatures")
        self.check_time()

    def count_entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_members:
            raise ContainerLimitExceeded("members")
        self.check_time()

    def charge(self, n: int, member_size: int, member_input: int) -> None:
        """Count ``n`` more output bytes of a member now ``member_size`` bytes long."""
        limits = self.limits
        self.expanded += n
        if self.expanded > limits.max_expanded_bytes:
            raise ContainerLimitExceeded("bytes")
        if member_size > limits.ratio_grace_bytes and (
            member_size > limits.max_ratio * max(member_input, 1)
        ):
            raise ContainerLimitExceeded("ratio")
        if self.expanded > limits.ratio_grace_bytes and (
            self.expanded > limits.max_ratio * self.source_size
        ):
            raise ContainerLimitExceeded("ratio")
        self.check_time()

    def sink(self) -> Sink:
        return Sink(self)

    def add(self, parent: ScanObject, name: str, sink: Sink, names: frozenset[str]) -> ScanObject:
        member = ScanObject(
            data=sink.data(),
            path=f"{parent.path}!{name}",
            filenames=names or frozenset({name}),
            views=parent.views,
            depth=parent.depth + 1,
        )
        self.members.append(member)
        return member

    # -- recursion

    def member(
        self,
        parent: ScanObject,
        name: str,
        produce: Callable[[Sink], None],
        names: frozenset[str] = frozenset(),
    ) -> bool:
        """Produce one member into a sink, keep what came out (even partial), then recurse.

        False when it could not be read through (corrupt or unsupported)."""
        names = names or frozenset({name})
        sink = self.sink()
        try:
            produce(sink)
        except ContainerLimitExceeded:
            if sink.size:
                self.add(parent, name, sink, names)  # the bytes before the limit are scanned
            raise
        except Corrupt as exc:
            log.info("%s!%s: corrupt: %s", parent.path, name, exc)
            self.anomaly(ANOMALY_CORRUPT)
            if sink.size:
                self.add(parent, name, sink, names)
            return False
        except Unsupported as exc:
            log.info("%s!%s: unsupported: %s", parent.path, name, exc)
            self.anomaly(ANOMALY_UNSUPPORTED)
            return False
        self.expand(self.add(parent, name, sink, names))
        return True
