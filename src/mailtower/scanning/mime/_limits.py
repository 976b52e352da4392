"""Per-message parsing limits and the budget that enforces them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mailtower.scanning.mime import _anomalies as A


@dataclass(frozen=True)
class MimeLimits:
    """How far the MIME stage goes before it stops and reports the message as over a limit."""

    max_depth: int = 20  # nested multiparts / message/rfc822 / encoded blocks
    max_parts: int = 1000  # parts seen by any one reading (and boundaries declared)
    max_decoded_bytes: int = 200 * 1024 * 1024  # distinct decoded data kept, all objects
    # CPU time of the parsing thread for one message, checked between steps. CPU, not wall
    # time: on a machine starved by other work (load 68 was seen) a wall-clock limit stopped
    # ordinary messages as hostile; CPU time measures what the message itself costs.
    max_time_s: float = 10.0
    # Wall-clock backstop, so that a message still ends when its thread gets no CPU. Running
    # past it says the machine is overloaded, not that the message is hostile: reported as
    # mime.wall-timeout, which the pipeline answers with a tempfail (the relay retries).
    max_wall_s: float = 30.0


class MimeLimitExceeded(Exception):
    """A limit was hit; parsing stops and ``anomaly`` is reported."""

    def __init__(self, anomaly: str) -> None:
        super().__init__(anomaly)
        self.anomaly = anomaly


class Budget:
    """What is left of the limits for one message; readers call it between steps."""

    def __init__(
        self,
        limits: MimeLimits,
        *,
        cpu_clock: Callable[[], float] = time.thread_time,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # One Budget per message, used by the thread that parses it (thread_time is per thread).
        self.limits = limits
        self._cpu_clock, self._wall_clock = cpu_clock, wall_clock
        self.cpu_deadline = cpu_clock() + limits.max_time_s
        now = wall_clock()
        self.wall_deadline = now + limits.max_wall_s
        # A thread cannot use more CPU time than the wall time that passed: until this much
        # wall time has passed, the CPU limit cannot have been reached and the CPU clock (a
        # system call, unlike the wall clock) is not read — at every step of every message.
        self.cpu_possible = now + limits.max_time_s
        self.decoded_bytes = 0

    def check_time(self) -> None:
        now = self._wall_clock()
        if now >= self.cpu_possible and self._cpu_clock() > self.cpu_deadline:
            raise MimeLimitExceeded(A.TIMEOUT)
        if now > self.wall_deadline:
            raise MimeLimitExceeded(A.WALL_TIMEOUT)

    def check_depth(self, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise MimeLimitExceeded(A.TOO_DEEP)

    def check_parts(self, count: int) -> None:
        if count > self.limits.max_parts:
            raise MimeLimitExceeded(A.TOO_MANY_PARTS)
        self.check_time()

    def add_bytes(self, n: int, *, check: bool = True) -> None:
        self.decoded_bytes += n
        if check and self.decoded_bytes > self.limits.max_decoded_bytes:
            raise MimeLimitExceeded(A.TOO_LARGE)
