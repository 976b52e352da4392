"""The SMTP side of scand: receive from the relay, scan, re-inject or quarantine, answer.

The answer to the relay is the commit point (docs/design.md invariant 1): 250 is sent only after
the message was re-injected (the relay answered 250) or quarantined durably (on a deployed
tower: its row committed in the tower's SQL, scand.quarantine; docs/quarantine.md); anything
else is a 4xx, so the relay keeps the message and retries. A killed scanner, or a lost one,
therefore loses nothing.

A retry is no answer to a failure that belongs to the message itself (the relay refuses it for
good, re-injection or scand fails on it, its scan times out while the engines are healthy):
each retry would cost a full scan again, for the whole queue lifetime. Such a message is set
aside — quarantined as ``unprocessable``, counted, alerted on — once the relay has held it for
``limits.unprocessable_after_s`` (its age from the relay's own Received header, see
``relay_trace``); before that, and whenever the failure is the scanner's (shutting down, an
engine failing its health check, the quarantine store), it is a 451 as before. It is never
delivered unscanned and never bounced.

Each recipient's customer has a policy (mailtower.customers; read from the snapshot file the
poller writes, ``scand.policies``). The message is scanned once and decided under each
distinct policy among its recipients; recipients whose policies lead to different outcomes
get them separately: every quarantine copy is written first, then one re-injection per
distinct verdict header. Once one re-injection succeeded, a later one that fails cannot be
answered with a 451 (the relay would deliver the first part again): it is retried briefly,
then set aside as unprocessable (released later like any such message).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, Envelope, Session
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mailtower import bundles
from mailtower.customers.policy import DEFAULT as DEFAULT_POLICY
from mailtower.customers.policy import CustomerPolicy
from mailtower.customers.snapshot import Snapshot
from mailtower.scand import quarantine as quarantine_mod
from mailtower.scand.errors import QuarantineError, ReinjectDeferred, ReinjectError
from mailtower.scand.events import Event, EventSpool
from mailtower.scand.policies import SnapshotFile
from mailtower.scand.quarantine import UNPROCESSABLE, UNPROCESSABLE_FINDING
from mailtower.scand.reinject import Reinjector
from mailtower.scand.relay_trace import RelayEnvelope, RelaySMTP, relay_arrival
from mailtower.scanning import engines as engines_mod
from mailtower.scanning.engines import Engine
from mailtower.scanning.pipeline import Pipeline, Policy, in_process, normalise_extension
from mailtower.scanning.rules import RuleDirs
from mailtower.scanning.scan import Kind, Verdict, message_id
from mailtower.settings import TowerSettings

log = logging.getLogger(__name__)

# Replies to the relay. Every reply the daemon gives is one of these.
S250_CLEAN = "250 2.0.0 OK scanned clean, re-injected: {relay}"
# Suspicious, and the recipients' customers take such mail: delivered with the verdict header.
S250_TAGGED = "250 2.0.0 OK scanned {verdict}, re-injected: {relay}"
S250_QUARANTINED = "250 2.7.0 quarantined as {qid} ({verdict})"
S451_ENGINE = "451 4.7.1 scanning not possible now, try again later"
S451_REINJECT = "451 4.4.1 re-injection to the relay failed, try again later"
S451_LOCAL = "451 4.3.0 local error in the scanner, try again later"
S451_SHUTDOWN = "451 4.3.2 scanner shutting down, try again later"
S451_CLIENT_GONE = "451 4.4.2 the relay hung up before the answer, not re-injected"
# No snapshot of the customers' policies yet (SQL never reached): never the default for all.
S451_POLICY = "451 4.3.5 customer policies not loaded yet, try again later"
# Recipients with different outcomes (their customers' policies differ): each part's.
S250_SPLIT = "250 2.0.0 OK scanned per recipient policy: {parts}"
# Failing for a reason of its own for limits.unprocessable_after_s: quarantined, not retried.
S250_UNPROCESSABLE = "250 2.7.0 set aside as {qid} (unprocessable since {since})"
S552_TOO_BIG = "552 5.3.4 message exceeds the size limit"
# The monitor's check of a scanner after a rule update (mailtower.monitor.rollout): a message
# carrying the tower's canary secret in this header is scanned and answered, never delivered,
# quarantined or recorded. Without the exact secret a message is ordinary mail.
CANARY_HEADER = b"x-mailtower-canary"
S250_CANARY = "250 2.0.0 canary verdict={verdict} rules_bundle={bundle} findings={names}"


def canary_token(raw: bytes) -> bytes | None:
    """The value of the canary header in ``raw``'s header block, if there is one."""
    end = raw.find(b"\r\n\r\n")
    head = b"\n" + raw[: end if end >= 0 else raw.find(b"\n\n")]
    lowered = head.lower()
    at = lowered.find(b"\n" + CANARY_HEADER + b":")
    if at < 0:
        return None
    start = at + 1 + len(CANARY_HEADER) + 1
    stop = head.find(b"\n", start)
    return head[start : stop if stop >= 0 else len(head)].strip()


VERDICT_HEADER = "X-Mailtower-Verdict"

# Verdicts that stop a message: it is quarantined and the relay told 250 (the final answer).
QUARANTINED = (Kind.VIRUS, Kind.BANNED, Kind.SUSPICIOUS)
# A later part of a split message the relay would not take: retried this often, this long
# apart, then set aside with this reason.
SPLIT_REINJECT_ATTEMPTS = 3
SPLIT_REINJECT_PAUSE_S = 1.0
SPLIT_REINJECT_FAILED = "re-injection failed after a split"
# The outcome (quarantine verdict, metric label, log event) of a message set aside is
# UNPROCESSABLE; the verdict_events table admits only the scan verdicts, so its event says
# "tempfail" with the quarantine id and UNPROCESSABLE_FINDING (both from scand.quarantine).
# The whole scan of one message (parsing, containers, every engine) gets engine_timeout_s plus
# this; with the defaults that is the pipeline's own 60 s. Postfix waits engine_timeout_s +
# reinject_timeout_s + 60 s for the answer (master.cf smtp_data_done_timeout).
DEADLINE_MARGIN_S = 30.0


def late_set_aside(answer: str) -> bool:
    """Whether ``Scanner._deliver_late``'s answer says the part was set aside."""
    return answer.startswith("set aside as ")


def _combined(replies: list[str]) -> str:
    """One 250 for the parts of a message: a part's own reply when there is one part."""
    if len(replies) == 1:
        return replies[0]
    # "250 2.x.x " dropped from each; an SMTP reply line stays under 512 characters.
    return S250_SPLIT.format(parts="; ".join(r[10:] for r in replies)[:400])


def rule_dirs(settings: TowerSettings) -> RuleDirs:
    """The rules scand loads: the bundle installed under ``settings.rules_dir`` if there is
    one, else the shipped rules. Raises bundles.InstallError if that root is broken."""
    if settings.rules_dir is None:
        return RuleDirs.packaged()
    return bundles.rule_dirs(Path(settings.rules_dir))


def build_pipeline(
    settings: TowerSettings,
    engines: Sequence[Engine] | None = None,
    rules: RuleDirs | None = None,
) -> Pipeline:
    """scand's pipeline: the whole-message engines (``engines``, else those ``settings.engines``
    names) then the in-process YARA, reputation and Skeptic (rules from ``rules``, else
    ``rule_dirs(settings)``), under the settings' policy. Compiles and loads every rule:
    raises EngineError, skeptic.RuleError, bundles.BundleError or ValueError."""
    whole_message = list(engines) if engines is not None else engines_mod.from_settings(settings)
    rules = rules if rules is not None else rule_dirs(settings)
    banned = frozenset(normalise_extension(e) for e in settings.banned_extensions) - {""}
    policy = Policy(banned_extensions=banned, encrypted_archives=settings.encrypted_archives)
    timeout = settings.limits.engine_timeout_s
    return in_process(
        engines=whole_message,
        policy=policy,
        engine_timeout_s=timeout,
        deadline_s=timeout + DEADLINE_MARGIN_S,
        rules=rules,
    )


class Metrics:
    """scand's Prometheus metrics, in a registry of their own (several scanners per test).

    In a worker process (``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor) the values live
    in that directory and the supervisor serves them summed over the workers; the gauges say
    how (``multiprocess_mode``; ignored in a single process). ``spool_gauge``: whether this
    process reports the event spool (a worker does not: the spool is shared, the supervisor
    counts it once)."""

    def __init__(self, *, spool_gauge: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "mailtower_messages",
            "Messages answered, by outcome",
            ["verdict"],
            registry=self.registry,
        )
        # Exported at 0 from the start: Prometheus' increase() sees no increase in a series
        # whose first sample is already 1 (the MessageSetAside alert).
        self.messages.labels("unprocessable")
        self.engine_seconds = Histogram(
            "mailtower_engine_seconds",
            "Time of one engine call",
            ["engine"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "mailtower_stage_seconds",
            "Time of one parsing stage of the pipeline (mime, containers)",
            ["stage"],
            registry=self.registry,
        )
        self.engine_errors = Counter(
            "mailtower_engine_errors",
            "Engine calls that failed or timed out",
            ["engine"],
            registry=self.registry,
        )
        self.events_spooled = (
            Gauge(
                "mailtower_events_spooled",
                "Verdict events waiting for SQL",
                registry=self.registry,
            )
            if spool_gauge
            else None
        )
        self.in_flight = Gauge(
            "mailtower_in_flight",
            "Messages being scanned now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.policy_generation = Gauge(
            "mailtower_policy_generation",
            "Generation of the customers' policy snapshot scand scans with (0: none loaded)",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.split_reinject_failed = Counter(
            "mailtower_split_reinject_failed",
            "Parts of a split message set aside because their re-injection failed after "
            "another part was delivered",
            registry=self.registry,
        )
        self.rules_bundle_version = Gauge(
            "mailtower_rules_bundle_version",
            "Version of the rule bundle scand scans with (0: the rules shipped in the package)",
            registry=self.registry,
            # Over several workers: the oldest bundle any of them runs (what the monitor's
            # ScannerRulesBehind alert must see).
            multiprocess_mode="livemin",
        )


@dataclass(frozen=True)
class Failure:
    """A failure that may be the message's own: why, the 451 it gets while it is retried, and
    whether an engine was involved (then the engines' health decides whose it is)."""

    reason: str
    reply: str
    engines: bool = False


Action = Literal["deliver", "quarantine"]


@dataclass
class Group:
    """Recipients whose policies lead to one outcome: the verdict under their policy, what is
    done (``action``), and the verdict header of a delivery."""

    policy: Policy
    suspicious: str  # the customers' "suspicious" setting: "quarantine" or "deliver"
    rcpt_tos: list[str]
    verdict: Verdict | None = None
    customer: str | None = None  # None: recipients at no customer's domain
    # The envelope sender is on the customer's allow_senders: banned or suspicious mail is
    # delivered with the verdict header, a virus still quarantined.
    allowed_sender: bool = False
    quarantine_days: int = DEFAULT_POLICY.quarantine_days

    @property
    def action(self) -> Action:
        assert self.verdict is not None
        kind = self.verdict.kind
        if kind is Kind.CLEAN or (kind is Kind.SUSPICIOUS and self.suspicious == "deliver"):
            return "deliver"
        if self.allowed_sender and kind in (Kind.BANNED, Kind.SUSPICIOUS):
            return "deliver"
        return "quarantine"

    @property
    def tag(self) -> str:
        """The verdict header's value's first word for a delivery."""
        assert self.verdict is not None
        return "clean" if self.verdict.kind is Kind.CLEAN else self.verdict.kind.value


class Scanner:
    """Everything one scand does with a message, as blocking calls (run in a thread pool)."""

    def __init__(
        self,
        settings: TowerSettings,
        *,
        host_address: str,
        engines: list[Engine] | None = None,
        metrics: Metrics | None = None,
        concurrency: int | None = None,
    ):
        self.settings = settings
        # Messages this process scans at once (a worker's share of limits.scan_concurrency).
        self.concurrency = concurrency or settings.limits.scan_concurrency
        self.host_address = host_address
        # The whole-message engines (health answers for these) and the pipeline they run in.
        self.engines = engines if engines is not None else engines_mod.from_settings(settings)
        rules = rule_dirs(settings)
        self.pipeline = build_pipeline(settings, self.engines, rules)
        self.rules_version = rules.bundle_version  # None: the shipped rules
        self.metrics = metrics or Metrics()
        self.metrics.rules_bundle_version.set(self.rules_version or 0)
        # Customers' policies (the snapshot file), and their scanning policies once built.
        self.policies = SnapshotFile(Path(settings.policy_snapshot))
        self._scanning: dict[tuple[Policy, CustomerPolicy], Policy] = {}
        spool = Path(settings.spool_dir)
        # SQL (a deployed tower) or the spool's directory (docs/quarantine.md).
        self.quarantine = quarantine_mod.from_settings(settings)
        self.events = EventSpool(spool / "events")
        if self.metrics.events_spooled is not None:
            self.metrics.events_spooled.set_function(self.events.count)
        self.executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="scan")
        # One kept-open relay connection per scan thread at most.
        self.reinjector = Reinjector(keep=self.concurrency)
        self.in_flight = 0
        self.draining = False
        # One reload at a time, whoever asks (SIGHUP, a rule bundle over /rules): a caller that
        # loads settings first holds it across load and reload, so the last sees the newest.
        self.reload_lock = threading.RLock()

    def reload(self, settings: TowerSettings, engines: list[Engine] | None = None) -> None:
        """Take new settings and rebuild the pipeline (rules compiled and loaded again, from the
        rule bundle ``current`` names now); messages in flight finish with the old ones. If the
        new pipeline does not build, this raises and the old settings and pipeline stay."""
        with self.reload_lock:
            self._reload(settings, engines)

    def _reload(self, settings: TowerSettings, engines: list[Engine] | None) -> None:
        engines = engines if engines is not None else engines_mod.from_settings(settings)
        rules = rule_dirs(settings)
        pipeline = build_pipeline(settings, engines, rules)  # first: a failure changes nothing
        if settings.ports != self.settings.ports:
            log.warning("event=reload_ports_changed action='restart scand to apply new ports'")
        if settings.policy_snapshot != self.settings.policy_snapshot:
            self.policies = SnapshotFile(Path(settings.policy_snapshot))
        if settings.quarantine_store != self.settings.quarantine_store:
            log.warning("event=reload_quarantine_store_changed action='restart scand to apply'")
        elif isinstance(self.quarantine, quarantine_mod.SqlQuarantineStore):
            self.quarantine.dsn = quarantine_mod.sql_dsn(settings)  # a new password, say
        self.engines, self.pipeline, self.settings = engines, pipeline, settings
        self.rules_version = rules.bundle_version
        self.metrics.rules_bundle_version.set(self.rules_version or 0)

    # -- the whole job for one message (blocking) ---------------------------------------------

    def process(
        self,
        raw: bytes,
        mail_from: str,
        rcpt_tos: list[str],
        mail_options: Sequence[str] = (),
        *,
        peer: str | None = None,
        relay_queue_id: str | None = None,
        client_alive: Callable[[], bool] | None = None,
    ) -> str:
        """Scan, then re-inject or quarantine; return the SMTP reply for the relay. ``peer``:
        the client's address (a canary counts only from the tower's monitor);
        ``relay_queue_id``: the relay's queue id of the message (XFORWARD IDENT);
        ``client_alive``: whether the relay still waits for the answer (asked before the
        first re-injection: a relay that hung up sends the message again, so re-injecting
        it too would deliver it twice)."""
        try:
            return self._process(
                raw, mail_from, rcpt_tos, mail_options, peer, relay_queue_id, client_alive
            )
        except Exception as exc:
            # A bug of ours on this message: the relay would bring it back to meet it again.
            log.exception("event=process_crashed from=<%r>", mail_from)
            failure = Failure(f"scand failed on it: {type(exc).__name__}: {exc}", S451_LOCAL)
            settings = self.settings
            try:
                reply, outcome, qid = self._failed(
                    settings,
                    failure,
                    raw,
                    mail_from,
                    rcpt_tos,
                    relay_queue_id,
                    None,
                    mail_options=mail_options,
                )
                if qid is not None:
                    verdict = Verdict(Kind.TEMPFAIL, reason=failure.reason)
                    self._record(settings, outcome, verdict, None, mail_from, rcpt_tos, raw, qid)
            except Exception:
                log.exception("event=set_aside_crashed from=<%r>", mail_from)
                return S451_LOCAL
            self.metrics.messages.labels(outcome).inc()
            return reply

    def _process(
        self,
        raw: bytes,
        mail_from: str,
        rcpt_tos: list[str],
        mail_options: Sequence[str],
        peer: str | None,
        relay_queue_id: str | None,
        client_alive: Callable[[], bool] | None = None,
    ) -> str:
        started = time.monotonic()  # the relay's smtp_data_done_timeout runs from about now
        settings, pipeline = self.settings, self.pipeline
        if len(raw) > settings.limits.filter_message_bytes:
            self.metrics.messages.labels("too_big").inc()
            return S552_TOO_BIG
        secret = settings.secrets.canary
        if secret is not None and peer == str(settings.hosts.monitor):
            token = canary_token(raw)
            if token is not None and hmac.compare_digest(token, secret.encode()):
                verdict = pipeline.scan(raw)
                names = ",".join(f.name for f in verdict.findings)[:400] or "-"
                log.info("event=canary verdict=%s findings=%s", verdict.kind.value, names)
                return S250_CANARY.format(
                    verdict=verdict.kind.value, bundle=self.rules_version or 0, names=names
                )
        snapshot = self.policies.current()
        if snapshot is None:
            # Scanning everybody's mail under the default policy would lift customers' bans.
            log.warning(
                "event=tempfail_no_policies snapshot=%s from=<%s>", self.policies.path, mail_from
            )
            self.metrics.messages.labels("tempfail").inc()
            return S451_POLICY
        self.metrics.policy_generation.set(snapshot.generation)
        unknown = sorted({c for c, p in map(snapshot.lookup, rcpt_tos) if p is None and c})
        if unknown:
            # Its stored policy never passed validation here (a newer GOC's field, a row
            # written by hand): held at the relay until a valid one arrives.
            log.warning(
                "event=tempfail_policy_invalid customers=%s from=<%s>", ",".join(unknown), mail_from
            )
            self.metrics.messages.labels("tempfail").inc()
            return S451_POLICY
        groups = self._groups(pipeline, snapshot, rcpt_tos, mail_from)
        verdicts = pipeline.scan_for(raw, [group.policy for group in groups])
        for group, one in zip(groups, verdicts, strict=True):
            group.verdict = one
        verdict = verdicts[0]  # engines, stages and errors are the same under every policy
        for stage, seconds in verdict.stages:
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        for run in verdict.runs:
            self.metrics.engine_seconds.labels(run.engine).observe(run.seconds)
            if run.error:
                self.metrics.engine_errors.labels(run.engine).inc()
        msgid = message_id(raw)
        fields = f"message_id={msgid} from=<{mail_from}> rcpts={len(rcpt_tos)} size={len(raw)}"
        if len(groups) > 1:
            log.info(
                "event=split %s parts=%s",
                fields,
                ",".join(f"{len(g.rcpt_tos)}:{g.verdict.kind.value}" for g in groups if g.verdict),
            )
        incomplete = next((v for v in verdicts if v.kind is Kind.TEMPFAIL), None)
        if incomplete is not None:
            # Part of the answer is missing: the whole message is retried (nothing done yet).
            log.warning("event=tempfail %s reason=%r", fields, incomplete.reason)
            failure = Failure(f"scan incomplete: {incomplete.reason}", S451_ENGINE, engines=True)
            reply, outcome, quarantine_id = self._failed(
                settings,
                failure,
                raw,
                mail_from,
                rcpt_tos,
                relay_queue_id,
                incomplete,
                mail_options=mail_options,
            )
            self._count_and_record(
                settings, [(outcome, incomplete, rcpt_tos, quarantine_id)], msgid, mail_from, raw
            )
            return reply
        return self._dispatch(
            settings,
            groups,
            raw,
            mail_from,
            rcpt_tos,
            mail_options,
            relay_queue_id,
            msgid,
            fields,
            started,
            client_alive,
        )

    def _dispatch(
        self,
        settings: TowerSettings,
        groups: list[Group],
        raw: bytes,
        mail_from: str,
        rcpt_tos: list[str],
        mail_options: Sequence[str],
        relay_queue_id: str | None,
        msgid: str | None,
        fields: str,
        started: float,
        client_alive: Callable[[], bool] | None = None,
    ) -> str:
        """Quarantine every group whose verdict stops it, then re-inject the others (one
        transaction per verdict header); the reply to the relay."""
        if client_alive is not None and not client_alive():
            # Gone while it was scanned: the relay sends it again, so nothing is written
            # (a message quarantined whole would otherwise be held twice).
            log.warning("event=client_gone %s", fields)
            self.metrics.messages.labels("tempfail").inc()
            return S451_CLIENT_GONE
        done: list[tuple[str, Verdict, list[str], str | None]] = []  # outcome, verdict, rcpts, qid
        replies: list[str] = []  # the reply each part would get on its own
        written: list[str] = []
        for group in groups:
            if group.action != "quarantine":
                continue
            assert group.verdict is not None
            meta = self._quarantine_meta(settings, group.verdict, msgid, mail_from, group.rcpt_tos)
            meta["customer"] = group.customer
            meta["quarantine_days"] = group.quarantine_days
            meta["relay_queue_id"] = relay_queue_id
            meta["mail_options"] = list(mail_options)
            try:
                qid = self.quarantine.write(raw, meta)
            except (OSError, QuarantineError) as exc:
                log.error("event=quarantine_failed %s error=%r", fields, exc)
                self._undo_quarantine(written)
                self.metrics.messages.labels("tempfail").inc()
                return S451_LOCAL
            written.append(qid)
            outcome = group.verdict.kind.value
            log.info(
                "event=%s %s rcpts_part=%d quarantine_id=%s reason=%r",
                outcome,
                fields,
                len(group.rcpt_tos),
                qid,
                group.verdict.reason,
            )
            done.append((outcome, group.verdict, group.rcpt_tos, qid))
            replies.append(S250_QUARANTINED.format(qid=qid, verdict=outcome))
        deliveries: dict[str, list[Group]] = {}
        for group in groups:
            if group.action == "deliver":
                deliveries.setdefault(group.tag, []).append(group)
                if group.tag in ("banned", "suspicious") and group.allowed_sender:
                    log.info(
                        "event=allowed_sender %s customer=%s rcpts_part=%d verdict=%s",
                        fields,
                        group.customer,
                        len(group.rcpt_tos),
                        group.tag,
                    )
        committed = False  # a part was re-injected or set aside: no 451 from here on
        for tag, together in deliveries.items():
            rcpts = [rcpt for group in together for rcpt in group.rcpt_tos]
            if not committed:
                if client_alive is not None and not client_alive():
                    # Its connection was closed while it was scanned (HAProxy cut the
                    # session, the relay's timeout): the relay retries it.
                    log.warning("event=client_gone %s", fields)
                    first: str | tuple[str, str, str | None] = (
                        S451_CLIENT_GONE,
                        "tempfail",
                        None,
                    )
                else:
                    first = self._deliver_first(
                        settings, tag, raw, mail_from, rcpts, mail_options, relay_queue_id, fields
                    )
                if isinstance(first, tuple):  # not delivered: retried, or set aside
                    reply, outcome, set_aside = first
                    if outcome == "tempfail":
                        self._undo_quarantine(written)  # the retry writes them again
                        done = []
                    verdict = together[0].verdict
                    assert verdict is not None
                    done.append((outcome, verdict, rcpts, set_aside))
                    if outcome == "tempfail":
                        self._count_and_record(settings, done, msgid, mail_from, raw)
                        return reply
                    replies.append(reply)  # set aside; the other parts still go
                    committed = True
                    continue
                answer = first
            else:
                late = self._deliver_late(
                    settings,
                    tag,
                    raw,
                    mail_from,
                    rcpts,
                    mail_options,
                    relay_queue_id,
                    fields,
                    started,
                )
                if late is None:  # the set-aside copy could not be written either
                    self._count_and_record(settings, done, msgid, mail_from, raw)
                    # A retry delivers the earlier parts twice; not answering loses this one.
                    return S451_LOCAL
                answer = late
            committed = True
            set_aside_as = answer.removeprefix("set aside as ") if late_set_aside(answer) else None
            for group in together:
                assert group.verdict is not None
                if set_aside_as is not None:
                    done.append((UNPROCESSABLE, group.verdict, group.rcpt_tos, set_aside_as))
                else:
                    done.append((group.tag, group.verdict, group.rcpt_tos, None))
            if set_aside_as is not None:
                replies.append(f"250 2.7.0 set aside as {set_aside_as} ({SPLIT_REINJECT_FAILED})")
            elif tag == "clean":
                replies.append(S250_CLEAN.format(relay=answer))
            else:
                replies.append(S250_TAGGED.format(verdict=tag, relay=answer))
        self._count_and_record(settings, done, msgid, mail_from, raw)
        return _combined(replies)

    def _deliver_first(
        self,
        settings: TowerSettings,
        tag: str,
        raw: bytes,
        mail_from: str,
        rcpts: list[str],
        mail_options: Sequence[str],
        relay_queue_id: str | None,
        fields: str,
    ) -> str | tuple[str, str, str | None]:
        """The first re-injection: the relay's answer, or — nothing delivered yet, so a retry
        is safe — (reply, outcome, quarantine id) as for any message that cannot be
        re-injected."""
        try:
            answer = self.reinject(settings, raw, mail_from, rcpts, mail_options, tag=tag)
        except ReinjectDeferred as exc:  # the relay's trouble (unreachable, 4xx): retry
            log.warning("event=reinject_failed %s error=%r", fields, str(exc))
            return S451_REINJECT, "tempfail", None
        except ReinjectError as exc:  # refused for good, or unsendable: this message's
            log.warning("event=reinject_refused %s error=%r", fields, str(exc))
            failure = Failure(f"re-injection refused: {exc}", S451_REINJECT)
            return self._failed(
                settings,
                failure,
                raw,
                mail_from,
                rcpts,
                relay_queue_id,
                None,
                mail_options=mail_options,
            )
        log.info("event=%s %s rcpts_part=%d relay=%r", tag, fields, len(rcpts), answer)
        return answer

    def _deliver_late(
        self,
        settings: TowerSettings,
        tag: str,
        raw: bytes,
        mail_from: str,
        rcpts: list[str],
        mail_options: Sequence[str],
        relay_queue_id: str | None,
        fields: str,
        started: float,
    ) -> str | None:
        """A re-injection after another part was delivered: a 451 now would deliver that part
        twice, so it is retried briefly, then set aside as unprocessable. The relay's answer,
        ``"set aside as <id>"``, or None if even the set-aside copy failed."""
        error: ReinjectError | None = None
        limits = settings.limits
        # The relay waits smtp_data_done_timeout for the whole answer (master.cf); should this
        # part's retries run past it, the relay would defer the message and send it again,
        # every part already delivered with it. A retry is tried only while its full time
        # (reinject_timeout_s) still fits, with a margin; otherwise the part is set aside now.
        budget = limits.engine_timeout_s * 2 + 30 + limits.reinject_timeout_s + 60 - 15
        for attempt in range(SPLIT_REINJECT_ATTEMPTS):
            if attempt:
                spent = time.monotonic() - started
                if spent + SPLIT_REINJECT_PAUSE_S + limits.reinject_timeout_s > budget:
                    log.warning("event=split_retry_skipped %s spent_s=%.0f", fields, spent)
                    break
                time.sleep(SPLIT_REINJECT_PAUSE_S)
            try:
                answer = self.reinject(settings, raw, mail_from, rcpts, mail_options, tag=tag)
            except ReinjectDeferred as exc:
                error = exc
                log.warning("event=reinject_failed %s attempt=%d error=%r", fields, attempt, exc)
                continue
            except ReinjectError as exc:  # refused for good: no use retrying
                error = exc
                break
            log.info("event=%s %s rcpts_part=%d relay=%r", tag, fields, len(rcpts), answer)
            return answer
        meta: dict[str, Any] = {
            "tower": settings.name,
            "scanner": self.host_address,
            "envelope": {"mail_from": mail_from, "rcpt_tos": list(rcpts)},
            "message_id": message_id(raw),
            "verdict": UNPROCESSABLE,
            "findings": [],
            "reason": SPLIT_REINJECT_FAILED,
            "error": str(error),
            "anomalies": [],
            "relay_queue_id": relay_queue_id,
            "mail_options": list(mail_options),
        }
        self.metrics.split_reinject_failed.inc()
        try:
            qid = self.quarantine.write(raw, meta)
        except (OSError, QuarantineError) as exc:
            log.error("event=split_set_aside_failed %s error=%r", fields, exc)
            return None
        log.error(
            "event=unprocessable %s rcpts_part=%d quarantine_id=%s reason=%r error=%r",
            fields,
            len(rcpts),
            qid,
            SPLIT_REINJECT_FAILED,
            str(error),
        )
        return f"set aside as {qid}"

    def _undo_quarantine(self, qids: list[str]) -> None:
        """Remove quarantine copies of a message that is retried (its retry writes them). In
        SQL the scanner may delete only such a fresh quarantine row (``mt_quarantine_undo``);
        the row may already have reached the GOC (its publication is INSERT only), where it
        stays beside the retry's own. A copy that cannot be removed is a duplicate, logged."""
        for qid in qids:
            try:
                self.quarantine.delete(qid)
            except Exception as exc:  # a duplicate in quarantine, never a lost message
                log.error("event=quarantine_undo_failed quarantine_id=%s error=%r", qid, exc)

    def _groups(
        self, pipeline: Pipeline, snapshot: Snapshot, rcpt_tos: list[str], mail_from: str = ""
    ) -> list[Group]:
        """The recipients grouped by customer (an address whose domain is no customer's: the
        tower's own policy), in their order. One customer's quarantine copy and verdict event
        never name another customer's recipients (a release or a notice acts on one customer);
        customers with equal policies are still scanned once (``Pipeline.scan_for``) and
        their deliveries share one re-injection. ``mail_from``: the envelope sender, checked
        against each customer's ``allow_senders``."""
        groups: dict[str | None, Group] = {}
        for rcpt in rcpt_tos or [""]:
            customer, policy = snapshot.lookup(rcpt)
            assert policy is not None  # _process answered 451 for a customer without one
            if customer not in groups:
                if customer is None:
                    groups[None] = Group(pipeline.policy, "quarantine", [])
                else:
                    scanning = self._scanning_policy(pipeline, policy)
                    groups[customer] = Group(
                        scanning,
                        policy.suspicious,
                        [],
                        customer=customer,
                        allowed_sender=policy.allows_sender(mail_from),
                        quarantine_days=policy.quarantine_days,
                    )
            if rcpt:
                groups[customer].rcpt_tos.append(rcpt)
        return list(groups.values())

    def _scanning_policy(self, pipeline: Pipeline, policy: CustomerPolicy) -> Policy:
        """A customer's scanning policy on the tower's, built once per policy."""
        key = (pipeline.policy, policy)
        found = self._scanning.get(key)
        if found is None:
            if len(self._scanning) > 10_000:  # old pipelines' and customers' entries
                self._scanning.clear()
            found = self._scanning[key] = policy.scanning_policy(pipeline.policy)
        return found

    def _count_and_record(
        self,
        settings: TowerSettings,
        done: list[tuple[str, Verdict, list[str], str | None]],
        msgid: str | None,
        mail_from: str,
        raw: bytes,
    ) -> None:
        """One metric and one verdict event per part: the answer is decided (re-injected or
        quarantined), so a failure here is logged, never a retry that delivers twice."""
        for outcome, verdict, rcpts, qid in done:
            try:
                delivered = outcome in ("suspicious", "banned") and not qid
                label = f"{outcome}_delivered" if delivered else outcome
                self.metrics.messages.labels(label).inc()
                self._record(settings, outcome, verdict, msgid, mail_from, rcpts, raw, qid)
            except Exception:
                log.exception("event=record_failed message_id=%s outcome=%s", msgid, outcome)

    def _failed(
        self,
        settings: TowerSettings,
        failure: Failure,
        raw: bytes,
        mail_from: str,
        rcpt_tos: list[str],
        relay_queue_id: str | None,
        verdict: Verdict | None,
        *,
        mail_options: Sequence[str] = (),
    ) -> tuple[str, str, str | None]:
        """The answer to a failure of this message's: ``failure.reply`` (retry), or, when the
        relay has held the message for ``limits.unprocessable_after_s`` and the failure is not
        the scanner's, quarantined as unprocessable. Returns (reply, outcome, quarantine id)."""
        arrival = relay_arrival(raw, settings.hostname, relay_queue_id)
        if arrival is None:  # its age unknown: retried, as before
            return failure.reply, "tempfail", None
        age_s = (datetime.now(UTC) - arrival).total_seconds()
        if age_s < settings.limits.unprocessable_after_s:
            return failure.reply, "tempfail", None
        scanner_fault = self._scanner_fault(failure)
        if scanner_fault is not None:
            log.warning(
                "event=tempfail_scanner relay_queue_id=%s why=%r", relay_queue_id, scanner_fault
            )
            return failure.reply, "tempfail", None
        msgid = message_id(raw)
        meta = {
            "tower": settings.name,
            "scanner": self.host_address,
            "envelope": {"mail_from": mail_from, "rcpt_tos": list(rcpt_tos)},
            "message_id": msgid,
            "verdict": UNPROCESSABLE,
            "findings": [asdict(f) for f in verdict.findings] if verdict else [],
            "reason": failure.reason,
            "anomalies": list(verdict.anomalies) if verdict else [],
            "relay_queue_id": relay_queue_id,
            "relay_arrival": arrival.isoformat(),
            "mail_options": list(mail_options),
        }
        try:
            qid = self.quarantine.write(raw, meta)
        except (OSError, QuarantineError) as exc:
            log.error("event=quarantine_failed relay_queue_id=%s error=%r", relay_queue_id, exc)
            return S451_LOCAL, "tempfail", None
        log.error(
            "event=unprocessable message_id=%s relay_queue_id=%s age_s=%.0f quarantine_id=%s"
            " reason=%r",
            msgid,
            relay_queue_id,
            age_s,
            qid,
            failure.reason,
        )
        since = arrival.astimezone(UTC).isoformat(timespec="seconds")
        return S250_UNPROCESSABLE.format(qid=qid, since=since), UNPROCESSABLE, qid

    def _scanner_fault(self, failure: Failure) -> str | None:
        """Why the failure may be this scanner's rather than the message's, or None."""
        if self.draining:
            return "shutting down"
        if not failure.engines:
            return None
        if not self.pipeline.engines:
            return "no engine configured"
        if self.in_flight > self.concurrency:
            # Messages wait for a scan slot: a scan that ran out of time now may be the load's
            # doing (a backlog after an outage), not the message's; it is retried.
            return f"scanner saturated ({self.in_flight} messages for {self.concurrency} slots)"
        try:
            self.health()
        except Exception as exc:  # an engine down or slow for every message, not this one
            return f"engine health check failed: {exc}"
        return None

    def reinject(
        self,
        settings: TowerSettings,
        raw: bytes,
        mail_from: str,
        rcpt_tos: list[str],
        mail_options: Sequence[str] = (),
        *,
        tag: str = "clean",
    ) -> str:
        """Hand ``raw`` back to the relay with the same envelope (or the part of its recipients
        in ``rcpt_tos``) and the verdict header saying ``tag``; return the relay's answer."""
        header = (
            f"{VERDICT_HEADER}: {tag}; tower={settings.name}; scanner={self.host_address}\r\n"
        ).encode()
        return self.reinjector.send(
            settings,
            raw,
            mail_from,
            rcpt_tos,
            mail_options,
            header=header,
            local_hostname=self.host_address,
        )

    def _quarantine_meta(
        self,
        settings: TowerSettings,
        verdict: Verdict,
        msgid: str | None,
        mail_from: str,
        rcpt_tos: list[str],
    ) -> dict[str, Any]:
        return {
            "tower": settings.name,
            "scanner": self.host_address,
            "envelope": {"mail_from": mail_from, "rcpt_tos": list(rcpt_tos)},
            "message_id": msgid,
            "verdict": verdict.kind.value,
            "findings": [asdict(f) for f in verdict.findings],
            "reason": verdict.reason,
            "anomalies": list(verdict.anomalies),
        }

    def _record(
        self,
        settings: TowerSettings,
        outcome: str,
        verdict: Verdict,
        msgid: str | None,
        mail_from: str,
        rcpt_tos: list[str],
        raw: bytes,
        quarantine_id: str | None,
    ) -> None:
        if quarantine_id is not None and self.quarantine.records_events:
            return  # the quarantine row committed before the 250 is this message's event
        findings = [asdict(f) for f in verdict.findings]
        if outcome == UNPROCESSABLE:
            outcome, findings = "tempfail", [*findings, UNPROCESSABLE_FINDING]
        event = Event(
            tower=settings.name,
            scanner=self.host_address,
            verdict=outcome,
            sender=mail_from,
            recipients=list(rcpt_tos),
            size_bytes=len(raw),
            message_id=msgid,
            findings=findings,
            quarantine_id=quarantine_id,
        )
        try:
            self.events.add(event)
        except OSError as exc:
            # The answer is already decided (mail re-injected or quarantined); a lost event
            # is logged loudly rather than turned into a retry that would duplicate the mail.
            log.error("event=event_spool_failed event_id=%s error=%r", event.event_id, exc)

    # -- health ------------------------------------------------------------------------------

    def health(self) -> dict[str, str]:
        """Each engine's version; raises EngineError if one does not answer in time."""
        timeout = self.settings.limits.health_timeout_s
        return {engine.name: engine.health(timeout) for engine in self.engines}


def alive_check(transport: asyncio.BaseTransport | None) -> Callable[[], bool]:
    """A check, callable from a scan thread, that the SMTP client of ``transport`` has not
    closed its side: the transport is not closing and a peek at its socket (on a duplicate
    descriptor, so that the event loop's socket is left alone) finds no end of stream. The
    relay sends nothing after the message's final dot until it has the answer."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    fd = sock.fileno() if sock is not None else -1

    def alive() -> bool:
        if transport is None or transport.is_closing():
            return False
        if fd < 0:
            return True
        try:
            with socket.socket(fileno=os.dup(fd)) as dup:
                return dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True  # nothing to read: still connected
        except OSError:
            return False  # reset, or no longer a socket

    return alive


class Handler:
    """aiosmtpd handler: one DATA → one scan, bounded by ``limits.scan_concurrency``."""

    def __init__(self, scanner: Scanner):
        self.scanner = scanner
        self.semaphore = asyncio.Semaphore(scanner.concurrency)
        self.idle = asyncio.Event()
        self.idle.set()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        scanner = self.scanner
        if scanner.draining:
            return S451_SHUTDOWN
        raw = envelope.original_content or b""
        mail_from = envelope.mail_from or "<>"
        rcpt_tos = list(envelope.rcpt_tos)
        mail_options = [opt.upper() for opt in envelope.mail_options]
        peer = session.peer[0] if isinstance(session.peer, tuple) else None
        xforward = envelope.xforward if isinstance(envelope, RelayEnvelope) else {}
        relay_queue_id = xforward.get("IDENT")
        self._enter()
        try:
            async with self.semaphore:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    scanner.executor,
                    functools.partial(
                        scanner.process,
                        peer=peer,
                        relay_queue_id=relay_queue_id,
                        client_alive=alive_check(server.transport),
                    ),
                    raw,
                    mail_from,
                    rcpt_tos,
                    mail_options,
                )
        except Exception:
            log.exception("event=process_crashed from=<%s>", mail_from)
            return S451_LOCAL
        finally:
            self._leave()

    def _enter(self) -> None:
        self.scanner.in_flight += 1
        self.scanner.metrics.in_flight.set(self.scanner.in_flight)
        self.idle.clear()

    def _leave(self) -> None:
        self.scanner.in_flight -= 1
        self.scanner.metrics.in_flight.set(self.scanner.in_flight)
        if self.scanner.in_flight == 0:
            self.idle.set()


async def start_smtp(
    handler: Handler,
    host: str | None,
    port: int | None,
    *,
    hostname: str | None = None,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """Listen for the relay on ``host:port``, or accept on the listening socket ``sock`` (a
    worker's, shared with the other workers); return the asyncio server."""
    settings = handler.scanner.settings
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return RelaySMTP(
            handler,
            # Everything the relay can send for a message it accepted (settings.Limits).
            data_size_limit=settings.limits.filter_message_bytes,
            line_length_limit=settings.limits.filter_line_length,
            command_size_limit=settings.limits.filter_command_bytes,
            enable_SMTPUTF8=True,
            hostname=hostname or socket.getfqdn(),
            ident="mailtower-scand",
        )

    if sock is not None:
        return await loop.create_server(factory, sock=sock)
    if port is None:
        raise ValueError("start_smtp needs a port or a listening socket")
    return await loop.create_server(factory, host=host, port=port, reuse_address=True)
