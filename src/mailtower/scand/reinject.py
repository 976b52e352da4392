"""Hand a message back to the relay's re-injection listener with its original envelope.

``Reinjector`` keeps connections open between messages (scand): a connect, EHLO and QUIT per
message cost the scanner a third of its re-injection time, and the relay an smtpd hand-off.
``reinject`` is one that keeps none: one connection for one message (``mailtower quarantine
release``).

Every failure is a ``ReinjectError``, and which one says whose it is: ``ReinjectDeferred``, the
relay could not take anything now (unreachable, a 4xx: retry later); ``ReinjectRefused``, the
relay will not take this message as it is (a 5xx, an address it cannot be sent with, or a bug
of ours on it: a retry meets the same answer). Nothing else escapes ``send``.

Envelope addresses go out as the bytes the relay gave scand (UTF-8): one that is not ASCII is
sent with SMTPUTF8 (RFC 6531), which the relay's Postfix offers; without that offer the message
is refused here, never half-sent.
"""

from __future__ import annotations

import logging
import smtplib
import threading
import time
from collections.abc import Sequence

from mailtower.scand.errors import ReinjectDeferred, ReinjectError, ReinjectRefused
from mailtower.settings import TowerSettings

log = logging.getLogger(__name__)


def _refusal(what: str, code: int, text: bytes) -> ReinjectError:
    """The error for an unexpected reply ``code`` to ``what``: 5xx is this message's, else
    the relay's (4xx, or a reply that is no SMTP reply at all)."""
    cls = ReinjectRefused if 500 <= code <= 599 else ReinjectDeferred
    return cls(f"{what} answered {code} {text!r}")


class _Stale(Exception):
    """A kept-open connection failed before the relay took anything: retry on a new one."""


def relay_address(settings: TowerSettings) -> str:
    """``host:port`` of the relay's re-injection listener."""
    return f"{settings.hosts.relay}:{settings.ports.reinject}"


def _connect(settings: TowerSettings, local_hostname: str | None) -> smtplib.SMTP:
    smtp = smtplib.SMTP(
        str(settings.hosts.relay),
        settings.ports.reinject,
        local_hostname=local_hostname,
        timeout=settings.limits.reinject_timeout_s,
    )
    try:
        smtp.ehlo()
    except BaseException:
        smtp.close()
        raise
    return smtp


def _address(addr: str) -> bytes:
    """``addr`` as it goes into MAIL FROM / RCPT TO, angle brackets included."""
    if addr in ("", "<>"):
        return b"<>"
    if any(c in addr for c in "\r\n\0"):
        raise ReinjectRefused(f"address {addr!r} contains a line break or NUL")
    try:
        # aiosmtpd decodes what it read as UTF-8 with surrogateescape; bytes that were not
        # UTF-8 come back as lone surrogates, which strict UTF-8 refuses.
        return b"<" + addr.encode("utf-8") + b">"
    except UnicodeEncodeError:
        raise ReinjectRefused(f"address {addr!r} is not valid UTF-8") from None


def _command(smtp: smtplib.SMTP, line: bytes) -> tuple[int, bytes]:
    """Send one command line as bytes (smtplib encodes str commands as ASCII) and read the
    reply."""
    smtp.send(line + b"\r\n")
    return smtp.getreply()


def _transaction(
    smtp: smtplib.SMTP,
    data: bytes,
    mail_from: str,
    rcpt_tos: Sequence[str],
    mail_options: Sequence[str],
    *,
    reused: bool,
) -> str:
    """One message on an open connection; on a ``reused`` one, a failure before MAIL FROM was
    answered raises _Stale (the relay has taken nothing yet)."""
    sender = _address(mail_from)
    recipients = [_address(rcpt) for rcpt in rcpt_tos]
    international = not all(a.isascii() for a in (sender, *recipients))
    if international and not smtp.has_extn("smtputf8"):
        raise ReinjectRefused(
            "an envelope address is not ASCII and the relay does not offer SMTPUTF8"
        )
    # Keep the body type of the original transaction; SMTPUTF8 when it asked for it or an
    # address needs it (Postfix takes UTF-8 addresses without it, so the relay's scan
    # transport may not have sent it).
    options = [opt for opt in mail_options if opt.startswith("BODY=") and smtp.has_extn("8bitmime")]
    if international or ("SMTPUTF8" in mail_options and smtp.has_extn("smtputf8")):
        options.append("SMTPUTF8")
    params = "".join(f" {opt}" for opt in options).encode("ascii", "replace")
    try:
        code, text = _command(smtp, b"MAIL FROM:" + sender + params)
    except (smtplib.SMTPServerDisconnected, OSError) as exc:
        if reused:
            raise _Stale(str(exc)) from exc
        raise
    if reused and code == 421:  # the relay is closing this (idle) connection
        raise _Stale(f"MAIL FROM answered {code} {text!r}")
    if code != 250:
        raise _refusal("MAIL FROM", code, text)
    for rcpt, address in zip(rcpt_tos, recipients, strict=True):
        code, text = _command(smtp, b"RCPT TO:" + address)
        # Any refused recipient fails the whole message: the relay retries it
        # (a duplicate for the others is tolerated; a loss is not).
        if code not in (250, 251):
            raise _refusal(f"RCPT TO:<{rcpt}>", code, text)
    code, text = _command(smtp, b"DATA")
    if code != 354:
        raise _refusal("DATA", code, text)
    smtp.send(dot_stuffed(data))
    code, text = smtp.getreply()
    if code != 250:
        raise _refusal("DATA", code, text)
    return text.decode("utf-8", errors="replace")


def dot_stuffed(data: bytes) -> bytes:
    """``data`` as SMTP DATA: every line that starts with a dot gets another, and the end
    marker. What ``smtplib.SMTP.data`` sends, without its regular expression over the whole
    message (a third of re-injection's time for large mail)."""
    stuffed = data.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def reinject(
    settings: TowerSettings,
    raw: bytes,
    mail_from: str,
    rcpt_tos: list[str],
    mail_options: Sequence[str] = (),
    *,
    header: bytes,
    local_hostname: str | None = None,
) -> str:
    """Send ``header + raw`` to the relay with the same envelope; return the relay's answer.

    ``header`` is one or more complete header lines ending in CRLF. Raise ReinjectDeferred
    when the relay cannot be reached or answers 4xx, ReinjectRefused when it refuses the
    sender, any recipient or the data for good, or the message cannot be sent to it.
    """
    one_shot = Reinjector(keep=0)  # keeps nothing: the connection is closed after the message
    return one_shot.send(
        settings,
        raw,
        mail_from,
        rcpt_tos,
        mail_options,
        header=header,
        local_hostname=local_hostname,
    )


class Reinjector:
    """``reinject`` over connections kept open between messages, safe to share between threads.

    A connection goes back to the pool only after a message was taken (250 to DATA); any other
    outcome closes it. A kept connection that fails before the relay answered MAIL FROM (closed
    by the relay's idle timeout, a relay restart) is dropped and the message is sent on a new
    one: nothing was taken, so nothing is duplicated. At most ``keep`` stay open (scand: its
    scan threads), and a sweeper thread closes those idle for ``idle_s``, so a quiet scanner
    does not hold the relay's smtpd processes.
    """

    def __init__(self, *, keep: int, idle_s: float = 10.0) -> None:
        self.keep = keep
        self.idle_s = idle_s
        self._lock = threading.Lock()
        # (relay, port, helo) → [(connection, idle since)], most recently used last
        self._idle: dict[tuple[str, int, str | None], list[tuple[smtplib.SMTP, float]]] = {}
        self.connects = 0  # connections opened (for tests and figures)
        self._sweeper: threading.Thread | None = None
        self._closed = threading.Event()

    def send(
        self,
        settings: TowerSettings,
        raw: bytes,
        mail_from: str,
        rcpt_tos: list[str],
        mail_options: Sequence[str] = (),
        *,
        header: bytes,
        local_hostname: str | None = None,
    ) -> str:
        """As ``reinject``."""
        key = (str(settings.hosts.relay), settings.ports.reinject, local_hostname)
        data = header + raw
        try:
            smtp = self._take(key)
            if smtp is not None:
                try:
                    answer = _transaction(
                        smtp, data, mail_from, rcpt_tos, mail_options, reused=True
                    )
                except _Stale:
                    smtp.close()
                except BaseException:
                    smtp.close()
                    raise
                else:
                    self._give(key, smtp)
                    return answer
            smtp = _connect(settings, local_hostname)
            with self._lock:
                self.connects += 1
            try:
                answer = _transaction(smtp, data, mail_from, rcpt_tos, mail_options, reused=False)
            except BaseException:
                smtp.close()
                raise
            self._give(key, smtp)
            return answer
        except ReinjectError as exc:
            raise type(exc)(f"{relay_address(settings)}: {exc}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise ReinjectDeferred(f"{relay_address(settings)}: {exc}") from exc
        except Exception as exc:
            # A bug of ours on this message: a defined answer, never a crash of the caller.
            log.exception("event=reinject_crashed relay=%s", relay_address(settings))
            raise ReinjectRefused(
                f"{relay_address(settings)}: unexpected {type(exc).__name__}: {exc}"
            ) from exc

    def _take(self, key: tuple[str, int, str | None]) -> smtplib.SMTP | None:
        with self._lock:
            kept = self._idle.get(key)
            return kept.pop()[0] if kept else None

    def _give(self, key: tuple[str, int, str | None], smtp: smtplib.SMTP) -> None:
        with self._lock:
            kept = not self._closed.is_set() and sum(map(len, self._idle.values())) < self.keep
            if kept:
                self._idle.setdefault(key, []).append((smtp, time.monotonic()))
                if self._sweeper is None:
                    self._sweeper = threading.Thread(
                        target=self._sweep, name="reinject-sweeper", daemon=True
                    )
                    self._sweeper.start()
        if not kept:
            _quit(smtp)

    def _sweep(self) -> None:
        while not self._closed.wait(self.idle_s / 2):
            self.close_idle()

    def close(self) -> None:
        """Close every kept connection and keep none from now on."""
        self._closed.set()
        self.close_idle(all_=True)

    def close_idle(self, *, all_: bool = False) -> int:
        """Close connections idle for ``idle_s`` (every one with ``all_``); return how many."""
        limit = time.monotonic() - self.idle_s
        closing: list[smtplib.SMTP] = []
        with self._lock:
            for key, kept in list(self._idle.items()):
                stay = [(s, t) for s, t in kept if t > limit and not all_]
                closing += [s for s, t in kept if t <= limit or all_]
                if stay:
                    self._idle[key] = stay
                else:
                    del self._idle[key]
        for smtp in closing:
            _quit(smtp)
        return len(closing)

    def idle(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()
