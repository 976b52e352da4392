"""The scanning decision: raw message bytes + engines → a verdict. No sockets here."""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32

from mailtower.scanning.engines import Engine, Finding
from mailtower.scanning.errors import EngineError

_HEADER_END = re.compile(rb"\r?\n\r?\n")


class Kind(enum.StrEnum):
    """What happens to a message. scan_message() decides only clean/virus/tempfail; the full
    pipeline (mailtower.scanning.pipeline) also bans by policy and stops suspicious mail."""

    CLEAN = "clean"
    VIRUS = "virus"
    BANNED = "banned"
    SUSPICIOUS = "suspicious"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class EngineRun:
    """How one engine call went (for metrics)."""

    engine: str
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class Verdict:
    """What happens to a message, and why."""

    kind: Kind
    findings: tuple[Finding, ...] = ()
    reason: str = ""
    runs: tuple[EngineRun, ...] = field(default=(), compare=False)
    # Every anomaly the parsing stages met, informational ones too (for quarantine metadata).
    anomalies: tuple[str, ...] = field(default=(), compare=False)
    # Seconds each parsing stage took ("mime", "containers"; the pipeline only, for metrics).
    stages: tuple[tuple[str, float], ...] = field(default=(), compare=False)


def scan_message(raw: bytes, engines: Sequence[Engine]) -> Verdict:
    """Pass ``raw`` through every engine; any finding → virus, else any failure → tempfail.

    Every engine runs even after a finding, so the quarantine records all of them. A finding
    outranks a failure: the message is stopped either way, and quarantine is the final answer.
    """
    if not engines:
        # Fail closed: a scanner configured with no engine must not pass mail unscanned.
        return Verdict(Kind.TEMPFAIL, reason="no engine configured")
    findings: list[Finding] = []
    runs: list[EngineRun] = []
    errors: list[str] = []
    for engine in engines:
        started = time.monotonic()
        try:
            found = engine.scan(raw)
        except EngineError as exc:
            errors.append(f"{engine.name}: {exc}")
            runs.append(EngineRun(engine.name, time.monotonic() - started, type(exc).__name__))
            continue
        runs.append(EngineRun(engine.name, time.monotonic() - started))
        findings.extend(found)
    if findings:
        names = ", ".join(f"{f.engine}:{f.name}" for f in findings)
        return Verdict(Kind.VIRUS, tuple(findings), f"found {names}", tuple(runs))
    if errors:
        return Verdict(Kind.TEMPFAIL, reason="; ".join(errors), runs=tuple(runs))
    return Verdict(Kind.CLEAN, reason="no findings", runs=tuple(runs))


def message_id(raw: bytes) -> str | None:
    """The Message-ID header of ``raw``, or None."""
    end = _HEADER_END.search(raw)
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw[: end.start() if end else None])
    value = headers.get("Message-ID")
    return str(value).strip() if value is not None else None
