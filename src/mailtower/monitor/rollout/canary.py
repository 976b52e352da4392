"""The canary: messages a scanner must give the right verdict with the rules it was given.

EICAR must come back ``virus``, a clean message ``clean``, and each sample the bundle carries
(``canary/<verdict>-<name>.eml``) its verdict, all scanned with the expected version. Each is
marked with the tower's canary secret in a header, so scand answers it and delivers nothing.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mailtower import bundles
from mailtower.monitor.errors import CanaryFailed, RolloutError
from mailtower.monitor.pool import PoolMember
from mailtower.scanning import testdata

log = logging.getLogger("mailtower.monitor.rollout")

CANARY_TIMEOUT_S = 30.0

_CANARY_HEAD = (
    b"From: monitor@mailtower.invalid\r\nTo: canary@mailtower.invalid\r\n"
    b"Subject: rule bundle canary\r\n\r\n"
)


def builtin_canaries() -> list[bundles.Canary]:
    """What every version must get right, whatever its bundle carries: EICAR (built here, never
    stored) is a virus, an ordinary message is clean."""
    return [
        bundles.Canary("eicar", "virus", _CANARY_HEAD + testdata.eicar() + b"\r\n"),
        bundles.Canary("clean", "clean", _CANARY_HEAD + b"An ordinary line of a message.\r\n"),
    ]


def marked(message: bytes, token: str) -> bytes:
    """``message`` with the canary header: scand answers it and delivers nothing."""
    return f"X-Mailtower-Canary: {token}\r\n".encode() + message


def send_canary(address: str, port: int, raw: bytes) -> str:
    """Hand one marked canary to the scanner's filter port; scand's answer (blocking)."""
    with smtplib.SMTP(address, port, timeout=CANARY_TIMEOUT_S) as smtp:
        smtp.ehlo("monitor.mailtower.invalid")
        code, reply = smtp.mail("monitor@mailtower.invalid")
        if code != 250:
            raise RolloutError(f"MAIL FROM answered {code} {reply!r}")
        code, reply = smtp.rcpt("canary@mailtower.invalid")
        if code != 250:
            raise RolloutError(f"RCPT TO answered {code} {reply!r}")
        code, reply = smtp.data(raw)
        return f"{code} {reply.decode(errors='replace')}"


def check_canary_answer(answer: str, expect: str, version: int | None, name: str = "") -> None:
    """Raise RolloutError unless ``answer`` is scand's canary reply with the verdict
    ``expect``, scanned with ``version``."""
    what = f"canary {name or expect}"
    fields = dict(p.split("=", 1) for p in answer.split() if "=" in p)
    if not answer.startswith("250") or "canary" not in answer:
        raise RolloutError(f"{what} was not answered as a canary: {answer!r}")
    verdict = fields.get("verdict")
    if verdict == "tempfail":  # an engine did not answer: says nothing about the rules
        raise RolloutError(f"{what} was tempfailed: {answer!r}")
    if fields.get("rules_bundle") != str(version or 0):
        raise CanaryFailed(f"{what} was scanned with another bundle: {answer!r}")
    if verdict != expect:
        raise CanaryFailed(f"{what} came back {verdict}, not {expect}: {answer!r}")


class Samples:
    """The canary samples each bundle in the mirror carries, read once per version."""

    def __init__(self, mirror_dir: Path) -> None:
        self.mirror_dir = mirror_dir
        self._read: dict[int, list[bundles.Canary]] = {}  # version → its canary samples

    def get(self, version: int | None, public_key: Ed25519PublicKey) -> list[bundles.Canary]:
        """The canary samples bundle ``version`` carries (read from the mirror once)."""
        if version is None:
            return []
        if version not in self._read:
            path = self.mirror_dir / f"rules-{version}.tar.gz"
            try:
                found = bundles.canaries(bundles.read(path, public_key).files)
            except (OSError, bundles.BundleError) as exc:  # pruned, or never mirrored here
                log.warning("event=canary_samples_unread version=%d error=%r", version, str(exc))
                found = []
            self._read = {v: c for v, c in self._read.items() if v >= version - 2}
            self._read[version] = found
        return self._read[version]


async def run_canaries(
    s: PoolMember, port: int, token: str, version: int | None, samples: list[bundles.Canary]
) -> None:
    """The built-in canaries, then the bundle's own ``samples``, to the scanner's filter
    ``port``: each must get its verdict, scanned with ``version``. CanaryFailed when the rules
    are wrong; RolloutError when the scanner did not give a verdict."""
    for sample in builtin_canaries() + samples:
        raw = marked(sample.message, token)
        try:
            answer = await asyncio.to_thread(send_canary, s.address, port, raw)
            check_canary_answer(answer, sample.expect, version, sample.name)
        except CanaryFailed as exc:
            raise CanaryFailed(f"{s.name} ({s.address}): {exc}") from exc
        except (OSError, smtplib.SMTPException, RolloutError) as exc:
            raise RolloutError(f"{s.name} ({s.address}): canary: {exc}") from exc
