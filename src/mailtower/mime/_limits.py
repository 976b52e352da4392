"""Per-message parsing limits and the budget that enforces them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from mailtower.mime import _anomalies as A


@dataclass(frozen=True)
class MimeLimits:
    """How far the MIME stage goes before it stops and reports the message as over a limit."""

    max_depth: int = 20  # nested multiparts / message/rfc822 / encoded blocks
    max_parts: int = 1000  # parts seen by any one reading (and boundaries declared)
    max_decoded_bytes: int = 200 * 1024 * 1024  # distinct decoded data kept, all objects
    max_time_s: float = 10.0  # wall time for one message, checked between steps


class LimitExceeded(Exception):
    """A limit was hit; parsing stops and ``anomaly`` is reported."""

    def __init__(self, anomaly: str) -> None:
        super().__init__(anomaly)
        self.anomaly = anomaly


class Budget:
    """What is left of the limits for one message; readers call it between steps."""

    def __init__(self, limits: MimeLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_time_s
        self.decoded_bytes = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(A.TIMEOUT)

    def check_depth(self, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise LimitExceeded(A.TOO_DEEP)

    def check_parts(self, count: int) -> None:
        if count > self.limits.max_parts:
            raise LimitExceeded(A.TOO_MANY_PARTS)
        self.check_time()

    def add_bytes(self, n: int, *, check: bool = True) -> None:
        self.decoded_bytes += n
        if check and self.decoded_bytes > self.limits.max_decoded_bytes:
            raise LimitExceeded(A.TOO_LARGE)
