"""Scanning engines: one protocol, one module per engine, and a test engine.

An engine takes the raw bytes of a message and returns what it found. Engines are blocking
(they run in the scanner's thread pool, never on the event loop) and enforce their own
timeout: a call that cannot give a full answer raises :class:`EngineError`, never ``[]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mailtower.settings import TowerSettings


@dataclass(frozen=True)
class Finding:
    """One thing an engine found in a message."""

    engine: str
    name: str  # the signature / rule name, e.g. "Mailtower.Test.EICAR.UNOFFICIAL"
    part: str | None = None  # which view of the message; None = the whole message


class Engine(Protocol):
    """What the scanner needs from an engine."""

    name: str

    def scan(self, data: bytes) -> list[Finding]:
        """Scan ``data``; return the findings ([] = clean); raise EngineError on failure."""
        ...

    def health(self, timeout_s: float) -> str:
        """Check the engine answers within ``timeout_s``; return its version or raise."""
        ...


def from_settings(settings: TowerSettings, *, timeout_s: float | None = None) -> list[Engine]:
    """The engines a tower's settings name, in order; raise ValueError on an unknown one."""
    from mailtower.scanning.engines.clamd import ClamdEngine
    from mailtower.scanning.engines.icap import IcapEngine

    timeout = settings.limits.engine_timeout_s if timeout_s is None else timeout_s
    engines: list[Engine] = []
    for name in settings.engines:
        if name == "clamd":
            engines.append(
                ClamdEngine(
                    settings.clamd_socket,
                    timeout_s=timeout,
                    pool_size=settings.limits.scan_concurrency,
                )
            )
        elif name == "icap":
            if settings.icap_url is None:
                raise ValueError(
                    "settings.engines lists 'icap' but settings.icap_url is not set; "
                    "set icap_url (e.g. icap://127.0.0.1:1344/avscan) or remove 'icap'"
                )
            engines.append(IcapEngine(settings.icap_url, timeout_s=timeout))
        else:
            raise ValueError(f"unknown engine {name!r} in settings.engines (known: clamd, icap)")
    return engines
