"""The full scanning pipeline: raw message bytes → union MIME parsing → container expansion →
engines → Skeptic → policy → a verdict. Pure apart from what the engines themselves do.

Verdict precedence (the strongest reason wins; every finding is kept either way):

1. ``virus`` — an anti-virus engine's signature, a YARA rule of severity ``virus``, a
   reputation hit, or a Skeptic rule the policy names as known malware (``skeptic.known-worm``);
2. ``banned`` — the policy: a banned extension, file name, declared type or native executable
   anywhere, or a message larger than the policy's ``max_message_bytes``;
3. ``suspicious`` — hostile Skeptic findings, hostile MIME anomalies, container anomalies (limit,
   encrypted — unless the policy passes those —, corrupt, unsupported), YARA ``suspicious``
   rules, anti-virus heuristics (``Heuristics.*``);
4. ``tempfail`` — an engine failed or timed out, or the message deadline ran out before every
   engine ran: the answer is incomplete, so the message is retried later;
5. ``clean`` — nothing above. Informational findings are recorded but never change it.

Parsing, expansion, the engines and Skeptic do not depend on the policy; only the policy's
bans and the decision do. ``Pipeline.scan_for`` therefore scans a message once and decides it
under several policies (one per customer among its recipients).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, TypeVar, runtime_checkable

from mailtower.scanning import containers, mime
from mailtower.scanning.containers import ContainerLimits
from mailtower.scanning.engines import Engine, Finding
from mailtower.scanning.errors import EngineError, EngineTimeout
from mailtower.scanning.mime import MESSAGE_PATH, MimeLimits
from mailtower.scanning.objects import VBA_SOURCE_TYPE, Analysis, ScanObject
from mailtower.scanning.rules import RuleDirs
from mailtower.scanning.scan import EngineRun, Kind, Verdict
from mailtower.scanning.skeptic import INTERNAL_ERROR, Severity, Skeptic, vba_sources
from mailtower.scanning.skeptic._sniff import native_kind
from mailtower.settings import DEFAULT_BANNED_EXTENSIONS

log = logging.getLogger(__name__)
T = TypeVar("T")

# Declared types that only ever carry programs. Declared types are the sender's word, so this
# list adds to the extension and content checks and never replaces them.
DEFAULT_BANNED_TYPES = frozenset(
    {
        "application/x-msdownload",
        "application/x-msdos-program",
        "application/x-dosexec",
        "application/x-ms-dos-executable",
        "application/x-ms-shortcut",
        "application/hta",
    }
)
# Native code by content (mailtower.scanning.skeptic's sniffer): a Windows program or shortcut
# is banned whatever it is called — without this, a PE member named "setup" (no extension)
# would pass.
DEFAULT_BANNED_NATIVE = frozenset({"pe", "lnk"})

ENGINE_POLICY = "policy"
ENGINE_MIME = "mime"
ENGINE_CONTAINER = "container"
# Parsing stages timed on every message (Verdict.stages; engines are timed in Verdict.runs).
STAGE_MIME = "mime"
STAGE_CONTAINERS = "containers"

# Characters Windows drops from the end of a file name: "evil.exe . " opens as "evil.exe".
_WINDOWS_TRAILING = " .\t\r\n\u00a0"
# Anti-virus names of heuristic alerts (encrypted archives, broken executables, phishing) rather
# than of known malware: ClamAV prefixes them so.
_AV_HEURISTIC = re.compile(r"^Heuristics?\.", re.I)


@dataclass(frozen=True)
class Policy:
    """What a tower bans and how it treats archives it cannot open."""

    banned_extensions: frozenset[str] = DEFAULT_BANNED_EXTENSIONS  # lower case, no dot
    banned_types: frozenset[str] = DEFAULT_BANNED_TYPES  # declared MIME types, lower case
    banned_native: frozenset[str] = DEFAULT_BANNED_NATIVE  # "pe", "elf", "macho", "lnk"
    # "suspicious": an encrypted archive cannot be scanned, so it is not clean; "pass": a
    # customer who exchanges encrypted archives accepts that risk.
    encrypted_archives: Literal["suspicious", "pass"] = "suspicious"
    # Skeptic rules (and their sub-findings) that name known malware, not a mere suspicion.
    virus_rules: frozenset[str] = frozenset({"skeptic.known-worm"})
    # File name patterns (fnmatch globs, lower case) banned anywhere in a message.
    banned_names: tuple[str, ...] = ()
    # Larger messages are banned ("policy.max-size"); None: no limit beyond the tower's.
    max_message_bytes: int | None = None

    def with_banned_extensions(self, extensions: Iterable[str]) -> Policy:
        """This policy with ``extensions`` banned too (dots and case ignored)."""
        extra = {normalise_extension(e) for e in extensions} - {""}
        return dataclasses.replace(self, banned_extensions=self.banned_extensions | extra)


def normalise_extension(extension: str) -> str:
    return extension.strip().lstrip(".").lower()


def name_extension(name: str) -> str:
    """The extension Windows decides by: base name, trailing dots/spaces stripped, lower case."""
    base = re.split(r"[\\/]", name)[-1].rstrip(_WINDOWS_TRAILING)
    # A name that is only an extension (".exe") still opens as one on Windows.
    _, dot, extension = base.rpartition(".")
    return extension.lower() if dot else ""


@runtime_checkable
class ObjectEngine(Protocol):
    """An engine that examines each decoded object (YARA, reputation) rather than raw mail."""

    name: str

    def scan_objects(self, objects: Iterable[ScanObject]) -> list[Finding]: ...


# -- the pipeline --------------------------------------------------------------------------------

# Whole-message engines (clamd, ICAP) need nothing the parsing produces: each message's calls
# start here at once and wait in their daemon while this process parses (threads are made only
# as needed; one process has a few messages in flight at most).
_RAW_ENGINE_THREADS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="raw-engine")


@dataclass(frozen=True)
class _Run:
    """What one engine call gave: its findings or its failure, and its time."""

    found: list[Finding] | None
    error: BaseException | None
    seconds: float


def _timed(call: Callable[[T], list[Finding]], argument: T) -> _Run:
    """``call(argument)``'s findings or failure, and how long it took."""
    started = time.monotonic()
    try:
        found = call(argument)
    except Exception as exc:  # classified in the scanning thread (Pipeline._engines)
        return _Run(None, exc, time.monotonic() - started)
    return _Run(found, None, time.monotonic() - started)


@dataclass
class _Scan:
    """What one message's scan has gathered so far."""

    deadline: float
    size: int = 0  # the raw message's bytes
    virus: list[Finding] = field(default_factory=list)
    banned: list[Finding] = field(default_factory=list)
    suspicious: list[Finding] = field(default_factory=list)
    info: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    runs: list[EngineRun] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # parsing stage → seconds
    # Encrypted-archive findings (also in ``suspicious``): a policy that passes encrypted
    # archives moves them to the informational findings.
    encrypted: set[Finding] = field(default_factory=set)
    # Skeptic's findings and whether each is hostile: which are known malware is the
    # policy's word (``Policy.virus_rules``), so they are sorted per policy.
    skeptic: list[tuple[Finding, bool]] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()


class Pipeline:
    """Scans one message at a time; safe to share between threads (it keeps no per-message
    state on itself; engines must be thread-safe, as the shipped ones are)."""

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        skeptic: Skeptic | None = None,
        policy: Policy | None = None,
        mime_limits: MimeLimits | None = None,
        container_limits: ContainerLimits | None = None,
        deadline_s: float = 60.0,
    ) -> None:
        self.engines = list(engines)
        self.skeptic = skeptic
        self.policy = policy or Policy()
        self.mime_limits = mime_limits or MimeLimits()
        self.container_limits = container_limits or ContainerLimits()
        self.deadline_s = deadline_s  # the whole message: parsing, expansion and every engine

    def scan(self, raw: bytes) -> Verdict:
        """The verdict on ``raw`` under ``self.policy`` (never raises for anything the message
        contains)."""
        return self.scan_for(raw, [self.policy])[0]

    def scan_for(self, raw: bytes, policies: Sequence[Policy]) -> list[Verdict]:
        """The verdict on ``raw`` under each of ``policies``, in order: the message is parsed
        and every engine runs once; only the policy's bans and the decision are per policy."""
        if not policies:
            return []
        state = _Scan(deadline=time.monotonic() + self.deadline_s, size=len(raw))
        if not self.engines:
            # Fail closed: a scanner configured with no engine must not pass mail unscanned.
            return [Verdict(Kind.TEMPFAIL, reason="no engine configured") for _ in policies]
        whole = {
            id(engine): _RAW_ENGINE_THREADS.submit(_timed, engine.scan, raw)
            for engine in self.engines
            if not isinstance(engine, ObjectEngine)
        }
        analysis = self._analyse(raw, state)
        self._engines(analysis, state, whole)
        self._skeptic(analysis, state)
        natives = _NativeKinds()
        decided: dict[Policy, Verdict] = {}
        for policy in policies:
            if policy not in decided:
                decided[policy] = self._verdict(analysis, state, policy, natives)
        return [decided[policy] for policy in policies]

    # -- parsing

    def _analyse(self, raw: bytes, state: _Scan) -> Analysis:
        """MIME readings plus every container member, recursively, within the deadline."""
        # The MIME limit is CPU time (what the message costs); its wall-clock backstop ends
        # with the message's deadline at the latest.
        mime_limits = dataclasses.replace(
            self.mime_limits, max_wall_s=max(0.0, min(self.mime_limits.max_wall_s, state.left()))
        )
        started = time.monotonic()
        parsed = mime.analyse(raw, limits=mime_limits)
        state.stages[STAGE_MIME] = time.monotonic() - started
        if mime.WALL_TIMEOUT in parsed.anomalies:
            # Not read completely, through no fault of the message's: retry, never pass.
            state.errors.append(
                f"{ENGINE_MIME}: parsing outran its wall-clock backstop of "
                f"{mime_limits.max_wall_s:.0f}s (machine overloaded)"
            )
        started = time.monotonic()
        objects = list(parsed.objects)
        anomalies = list(parsed.anomalies)
        for anomaly in parsed.anomalies:
            if mime.is_hostile(anomaly):
                state.suspicious.append(Finding(ENGINE_MIME, anomaly, MESSAGE_PATH))
            elif anomaly in mime.DISAGREEMENT_ANOMALIES:
                # Readings disagree about nothing risky: recorded beside the verdict (the
                # hostile case is mime.risky-disagreement:<anomaly>, above).
                state.info.append(Finding(ENGINE_MIME, anomaly, MESSAGE_PATH))
        expanded: set[bytes] = set()  # the same archive under several paths is opened once
        for obj in parsed.objects:
            if obj.path == MESSAGE_PATH or obj.data in expanded:
                continue  # the raw message is not an archive; its parts are expanded instead
            expanded.add(obj.data)
            left = state.left()
            if left <= 0:
                # The message's deadline (wall time) ran out: not the archive's fault. Unread,
                # so never clean: a tempfail (retried), not a finding.
                found = (
                    [containers.ANOMALY_WALL_TIMEOUT]
                    if containers.detect(obj.data) is not None
                    else []
                )
            else:
                # CPU-time limit as configured; the wall-clock backstop ends with the deadline.
                limits = dataclasses.replace(
                    self.container_limits, max_wall_s=min(self.container_limits.max_wall_s, left)
                )
                members, found = containers.expand(obj, limits)
                objects += members
            for anomaly in found:
                if anomaly not in anomalies:
                    anomalies.append(anomaly)
                if anomaly == containers.ANOMALY_WALL_TIMEOUT:
                    state.errors.append(
                        f"{ENGINE_CONTAINER}: {obj.path} not expanded within the wall-clock "
                        "backstop (machine overloaded)"
                    )
                    continue
                finding = Finding(ENGINE_CONTAINER, anomaly, obj.path)
                if anomaly in containers.INFORMATIONAL_ANOMALIES:
                    state.info.append(finding)
                    continue
                # Every other container anomaly means "not fully scanned" (containers module
                # doc); an encrypted archive may be passed by the policy (decided per policy).
                state.suspicious.append(finding)
                if anomaly == containers.ANOMALY_ENCRYPTED:
                    state.encrypted.add(finding)
        state.stages[STAGE_CONTAINERS] = time.monotonic() - started
        return Analysis(objects=objects, anomalies=anomalies)

    # -- engines

    def _engines(self, analysis: Analysis, state: _Scan, whole: dict[int, Future[_Run]]) -> None:
        """Run the object engines and collect the whole-message engines' calls (``whole``, by
        ``id(engine)``, started before parsing), in the order of ``self.engines``."""
        # Content engines need each distinct object once (a member may repeat in an archive).
        unique: dict[bytes, ScanObject] = {}
        for obj in analysis.objects:
            unique.setdefault(obj.data, obj)
        if any(id(engine) not in whole for engine in self.engines) and state.left() > 0:
            for vba in self._vba_objects(list(unique.values()), state):
                unique.setdefault(vba.data, vba)
        # The object engines run in this thread while the whole-message calls run in theirs;
        # results are then taken in the listed order.
        runs: dict[int, _Run] = {}
        for engine in self.engines:
            if id(engine) in whole:
                continue
            if state.left() <= 0:
                timeout = EngineTimeout(f"message deadline of {self.deadline_s}s ran out first")
                runs[id(engine)] = _Run(None, timeout, 0.0)
            else:
                runs[id(engine)] = _timed(engine.scan_objects, unique.values())  # type: ignore[attr-defined]
        for engine in self.engines:
            call = whole.get(id(engine))
            run = self._collect(call, state) if call is not None else runs[id(engine)]
            if run.error is not None:
                if not isinstance(run.error, EngineError):
                    # A bug in an engine must not pass the message.
                    log.error("engine %s crashed", engine.name, exc_info=run.error)
                state.errors.append(f"{engine.name}: {run.error}")
                state.runs.append(EngineRun(engine.name, run.seconds, type(run.error).__name__))
                continue
            state.runs.append(EngineRun(engine.name, run.seconds))
            for finding in run.found or ():
                finding = dataclasses.replace(finding, part=finding.part or MESSAGE_PATH)
                self._classify_engine_finding(engine, finding, state)

    def _vba_objects(self, objects: list[ScanObject], state: _Scan) -> list[ScanObject]:
        """The VBA source of every Office document among ``objects``, as objects of their own.

        MS-OVBA compression puts a flag byte before every eight tokens, so a keyword in a
        module is visible to YARA or a fuzzy hash only when it happens to fall inside one group;
        the source olevba reads is what they should see. A bomb's source never gets here
        (``skeptic._office.MAX_VBA_SOURCE``: unanalysable); one over the container stage's byte
        limit, when that is set lower, is cut there, and the cut is a limit finding."""
        limit = self.container_limits.max_expanded_bytes
        found: list[ScanObject] = []
        for obj in objects:
            try:
                sources = vba_sources(obj.data)
            except Exception as exc:  # a bug of ours on hostile input: fail closed, go on
                log.warning("reading VBA of %s failed: %r", obj.path, exc)
                corrupt = Finding(ENGINE_CONTAINER, containers.ANOMALY_CORRUPT, f"{obj.path}!vba")
                state.suspicious.append(corrupt)
                continue
            for k, source in enumerate(sources, 1):
                try:
                    data = source.encode("utf-8", "surrogateescape")
                except UnicodeEncodeError:  # a code page that decodes to lone surrogates
                    data = source.encode("utf-8", "surrogatepass")
                path = f"{obj.path}!vba" if k == 1 else f"{obj.path}!vba{k}"
                if len(data) > limit:
                    data = data[:limit]
                    limited = f"{containers.ANOMALY_LIMIT}:bytes"
                    state.suspicious.append(Finding(ENGINE_CONTAINER, limited, path))
                found.append(
                    ScanObject(
                        data,
                        path,
                        content_types=frozenset({VBA_SOURCE_TYPE}),
                        views=obj.views,
                        depth=obj.depth + 1,
                    )
                )
        return found

    def _collect(self, call: Future[_Run], state: _Scan) -> _Run:
        """A whole-message call's outcome, once it ended."""
        started = time.monotonic()
        try:
            # The engine's own timeout ends the call; this only guards against one without.
            return call.result(timeout=max(state.left(), 0.0) + 1.0)
        except concurrent.futures.TimeoutError:
            timeout = EngineTimeout(f"no answer within the message deadline of {self.deadline_s}s")
            return _Run(None, timeout, time.monotonic() - started)

    def _engine_failed(self, name: str, started: float, exc: Exception, state: _Scan) -> None:
        state.errors.append(f"{name}: {exc}")
        state.runs.append(EngineRun(name, time.monotonic() - started, type(exc).__name__))

    def _classify_engine_finding(self, engine: Engine, finding: Finding, state: _Scan) -> None:
        meta = getattr(engine, "meta", None)
        if callable(meta):  # YARA: the rule's own severity decides
            severity = str(meta(finding.name).get("severity", "suspicious")).lower()
            # A rule without a known severity (a tower's own) is a suspicion, never ignored.
            target = {"virus": state.virus, "info": state.info}.get(severity, state.suspicious)
        elif _AV_HEURISTIC.match(finding.name):
            target = state.suspicious
        else:  # anti-virus signatures, reputation hits
            target = state.virus
        target.append(finding)

    # -- Skeptic

    def _skeptic(self, analysis: Analysis, state: _Scan) -> None:
        skeptic = self.skeptic
        if skeptic is None:
            return
        started = time.monotonic()
        if state.left() <= 0:
            exc = EngineTimeout(f"message deadline of {self.deadline_s}s ran out first")
            self._engine_failed(skeptic.name, started, exc, state)
            return
        try:
            findings = skeptic.examine(analysis)
        except Exception:
            # examine() already turns a failing rule into INTERNAL_ERROR; this is a crash of the
            # engine itself on this message, which a retry would meet again: fail closed.
            log.exception("Skeptic crashed")
            findings = [Finding(skeptic.name, INTERNAL_ERROR, MESSAGE_PATH)]
        state.runs.append(EngineRun(skeptic.name, time.monotonic() - started))
        for finding in findings:
            finding = dataclasses.replace(finding, part=finding.part or MESSAGE_PATH)
            state.skeptic.append((finding, skeptic.severity(finding.name) is Severity.HOSTILE))

    # -- policy

    def _policy(
        self, analysis: Analysis, state: _Scan, policy: Policy, natives: _NativeKinds
    ) -> list[Finding]:
        """What ``policy`` bans in the message."""
        banned: list[Finding] = []
        seen: set[tuple[str, str]] = set()

        def ban(name: str, part: str) -> None:
            if (name, part) not in seen:
                seen.add((name, part))
                banned.append(Finding(ENGINE_POLICY, name, part))

        if policy.max_message_bytes is not None and state.size > policy.max_message_bytes:
            ban("policy.max-size", MESSAGE_PATH)
        for obj in analysis.objects:
            for filename in obj.filenames:
                # Programs that stop at a NUL or control character read a shorter name.
                for reading in {filename, re.split(r"[\x00-\x1f]", filename)[0]}:
                    extension = name_extension(reading)
                    if extension in policy.banned_extensions:
                        ban(f"policy.banned-extension.{extension}", obj.path)
                    if policy.banned_names and _name_banned(reading, policy.banned_names):
                        ban("policy.banned-name", obj.path)
            for declared in obj.content_types:
                if declared.split(";")[0].strip().lower() in policy.banned_types:
                    ban(f"policy.banned-type.{declared}", obj.path)
            if obj.path != MESSAGE_PATH and policy.banned_native:
                kind = natives.of(obj)
                if kind in policy.banned_native:
                    ban(f"policy.banned-native.{kind}", obj.path)
        return banned

    # -- the decision

    def _verdict(
        self, analysis: Analysis, state: _Scan, policy: Policy, natives: _NativeKinds
    ) -> Verdict:
        """The decision under ``policy`` on what the scan gathered (``state`` is not changed:
        the next policy decides on the same findings)."""
        passed = state.encrypted if policy.encrypted_archives == "pass" else set()
        virus = list(state.virus)
        banned = self._policy(analysis, state, policy, natives)
        suspicious = [f for f in state.suspicious if f not in passed]
        info = [f for f in state.suspicious if f in passed] + state.info
        for finding, hostile in state.skeptic:
            if _has_prefix(finding.name, policy.virus_rules):
                virus.append(finding)
            elif hostile:
                suspicious.append(finding)
            else:
                info.append(finding)
        findings = tuple(_dedupe(virus + banned + suspicious + info))
        runs = tuple(state.runs)
        anomalies = tuple(analysis.anomalies)
        stages = tuple(state.stages.items())
        for kind, deciding in (
            (Kind.VIRUS, virus),
            (Kind.BANNED, banned),
            (Kind.SUSPICIOUS, suspicious),
        ):
            if deciding:
                reason = f"{kind}: " + ", ".join(_describe(f) for f in _dedupe(deciding))
                if state.errors:
                    reason += "; also " + "; ".join(state.errors)
                return Verdict(kind, findings, reason, runs, anomalies, stages)
        if state.errors:
            reason = "; ".join(state.errors)
            return Verdict(Kind.TEMPFAIL, findings, reason, runs, anomalies, stages)
        return Verdict(Kind.CLEAN, findings, "no findings", runs, anomalies, stages)


class _NativeKinds:
    """Each object's native-code kind, sniffed once however many policies ask."""

    def __init__(self) -> None:
        self._kinds: dict[int, str | None] = {}

    def of(self, obj: ScanObject) -> str | None:
        key = id(obj)
        if key not in self._kinds:
            self._kinds[key] = native_kind(obj.data)
        return self._kinds[key]


def _name_banned(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name``, as Windows reads it (base name, trailing dots and spaces dropped, any
    case), matches one of ``patterns`` (fnmatch globs in lower case)."""
    base = re.split(r"[\\/]", name)[-1].rstrip(_WINDOWS_TRAILING).lower()
    return bool(base) and any(fnmatch.fnmatchcase(base, pattern) for pattern in patterns)


def _has_prefix(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _dedupe(findings: Iterable[Finding]) -> list[Finding]:
    return list(dict.fromkeys(findings))


def _describe(finding: Finding) -> str:
    return f"{finding.engine}:{finding.name}@{finding.part}"


# -- the standard set-up -------------------------------------------------------------------------


def in_process(
    *,
    yara_dirs: Sequence[Path] = (),
    clamd: str | None = None,
    engines: Sequence[Engine] = (),
    policy: Policy | None = None,
    engine_timeout_s: float = 30.0,
    deadline_s: float = 60.0,
    rules: RuleDirs | None = None,
) -> Pipeline:
    """The pipeline with the in-process engines (YARA rules from ``rules`` plus ``yara_dirs``,
    reputation, Skeptic; ``rules`` None: the project's own), clamd at ``clamd`` if given, and
    ``engines`` — further whole-message engines (scand's, from ``engines.from_settings``) —
    which run first, after clamd. Raises EngineError (e.g. YaraRuleError) or skeptic.RuleError
    when rule data cannot be loaded, ValueError on a bad clamd address."""
    from mailtower.scanning.engines.clamd import ClamdEngine
    from mailtower.scanning.engines.reputation import ReputationEngine
    from mailtower.scanning.engines.yara import YaraEngine

    rules = rules or RuleDirs.packaged()
    stack: list[Engine] = []
    if clamd is not None:
        stack.append(ClamdEngine(clamd, timeout_s=engine_timeout_s))
    stack.extend(engines)
    stack.append(YaraEngine([rules.yara, *yara_dirs], timeout_s=engine_timeout_s))
    stack.append(ReputationEngine([rules.reputation], timeout_s=engine_timeout_s))
    skeptic = Skeptic.from_rules(rules.skeptic)
    return Pipeline(stack, skeptic=skeptic, policy=policy, deadline_s=deadline_s)
