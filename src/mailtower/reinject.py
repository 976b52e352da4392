"""Hand a message back to the relay's re-injection listener with its original envelope.

``Reinjector`` keeps connections open between messages (scand): a connect, EHLO and QUIT per
message cost the scanner a third of its re-injection time, and the relay an smtpd hand-off.
``reinject`` is one that keeps none: one connection for one message (``mailtower quarantine
release``).
"""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Sequence

from mailtower.settings import TowerSettings


class ReinjectError(Exception):
    """The relay did not take the message back."""


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
    # Keep the body type and SMTPUTF8 of the original transaction.
    options = [
        opt
        for opt in mail_options
        if (opt.startswith("BODY=") and smtp.has_extn("8bitmime"))
        or (opt == "SMTPUTF8" and smtp.has_extn("smtputf8"))
    ]
    try:
        code, text = smtp.mail(mail_from, options)
    except (smtplib.SMTPServerDisconnected, OSError) as exc:
        if reused:
            raise _Stale(str(exc)) from exc
        raise
    if reused and code == 421:  # the relay is closing this (idle) connection
        raise _Stale(f"MAIL FROM answered {code} {text!r}")
    if code != 250:
        raise ReinjectError(f"MAIL FROM answered {code} {text!r}")
    for rcpt in rcpt_tos:
        code, text = smtp.rcpt(rcpt)
        # Any refused recipient fails the whole message: the relay retries it
        # (a duplicate for the others is tolerated; a loss is not).
        if code not in (250, 251):
            raise ReinjectError(f"RCPT TO:<{rcpt}> answered {code} {text!r}")
    code, text = smtp.docmd("DATA")
    if code != 354:
        raise ReinjectError(f"DATA answered {code} {text!r}")
    smtp.send(dot_stuffed(data))
    code, text = smtp.getreply()
    if code != 250:
        raise ReinjectError(f"DATA answered {code} {text!r}")
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

    ``header`` is one or more complete header lines ending in CRLF. Raise ReinjectError when
    the relay refuses the sender, any recipient or the data, or cannot be reached.
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
        except (smtplib.SMTPException, OSError) as exc:
            raise ReinjectError(f"{relay_address(settings)}: {exc}") from exc

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
