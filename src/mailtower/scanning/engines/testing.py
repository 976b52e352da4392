"""An in-memory engine for unit tests: finds a byte pattern; can be told to fail or hang."""

from __future__ import annotations

import threading

from mailtower.scanning import testdata
from mailtower.scanning.engines import Finding
from mailtower.scanning.errors import EngineTimeout, EngineUnavailable


class PatternEngine:
    """Finds ``pattern`` in a message; ``mode`` switches it to failing or hanging."""

    def __init__(
        self,
        pattern: bytes | None = None,
        *,
        name: str = "test",
        finding: str = "Mailtower.Test.Marker",
        timeout_s: float = 5.0,
    ):
        self.name = name
        self.pattern = testdata.marker() if pattern is None else pattern
        self.finding = finding
        self.timeout_s = timeout_s
        self.mode = "ok"  # "ok" | "fail" | "hang"
        self.calls = 0
        self._release = threading.Event()  # set to end a hang early

    def scan(self, data: bytes) -> list[Finding]:
        self.calls += 1
        self._check()
        return [Finding(self.name, self.finding)] if self.pattern in data else []

    def health(self, timeout_s: float) -> str:
        self._check(timeout_s)
        return f"{self.name} 1.0"

    def release(self) -> None:
        """End every current and future hang (test teardown)."""
        self._release.set()

    def _check(self, timeout_s: float | None = None) -> None:
        if self.mode == "fail":
            raise EngineUnavailable(f"{self.name}: told to fail")
        if self.mode == "hang":
            timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
            self._release.wait(timeout)
            raise EngineTimeout(f"{self.name}: no answer within {timeout}s")
