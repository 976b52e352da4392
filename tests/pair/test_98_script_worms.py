"""Script worms by what they do (issue 20) in the twin lab: padded mass-mailing scripts sent as
``.txt`` text/plain, without a name, as the body, in a zip or under an unrelated type are
quarantined by whichever tower takes them; the harmless scripts and text people mail each other
(an admin VBScript, a PowerShell report, a batch backup, Python, JSON, CSV, a page with a little
JavaScript) are delivered.

The messages come from tests/unit/script_worms.py (inert skeletons, never executed); the unit
figures over 1000 copies are tests/unit/test_skeptic_script_worms.py's. Figure:
tests/output/figures.json (script_worms_held).
"""

from __future__ import annotations

import random
import smtplib
import sys
from email import message_from_bytes
from email.message import Message

from conftest import ROOT, SENDER_PORT, Pair
from towerlib import record_figure, wait_for

sys.path.insert(0, str(ROOT / "tests" / "unit"))
from script_worms import DELIVERIES, clean_cases, deliver, worm  # noqa: E402

WORMS = 25


def _send(pair: Pair, raw: bytes, token: str, rcpt: str) -> None:
    msg: Message = message_from_bytes(raw)
    del msg["To"]
    msg["To"] = rcpt
    msg["Message-ID"] = f"<{token}@internet.lab>"
    msg["X-Test-Token"] = token
    with smtplib.SMTP(pair.sender_addr, SENDER_PORT, timeout=60) as smtp:
        smtp.ehlo("script-worms.internet.lab")
        smtp.sendmail("someone@internet.lab", [rcpt], msg.as_bytes())


def _verdicts(pair: Pair, tokens: list[str]) -> dict[str, str]:
    """Token → the verdict the GOC recorded for it (every tower reports its verdicts there)."""
    where = " OR ".join(f"message_id LIKE '%{t}%'" for t in tokens)
    out = pair.goc_sql(f"SELECT message_id || '|' || verdict FROM verdict_events WHERE {where}")
    found = {}
    for line in out.splitlines():
        message_id, _, verdict = line.strip().partition("|")
        for token in tokens:
            if token in message_id:
                found[token] = verdict
    return found


def test_padded_script_worms_are_held_and_harmless_scripts_delivered(pair: Pair) -> None:
    rng = random.Random(98)
    rcpt = pair.rcpt(0)
    worms = []
    for index in range(WORMS):
        token = pair.token()
        how = DELIVERIES[index % len(DELIVERIES)]
        _send(pair, deliver(worm(rng).text, how, rng), token, rcpt)
        worms.append(token)
    harmless = []
    for _name, _how, raw in clean_cases():
        token = pair.token()
        _send(pair, raw, token, rcpt)
        harmless.append(token)

    pair.wait_delivered(harmless, 0, timeout=300)

    def all_decided() -> dict[str, str] | None:
        found = _verdicts(pair, worms)
        return found if len(found) == len(worms) else None

    verdicts = wait_for(all_decided, 300, f"the GOC's verdicts on {len(worms)} script worms", 5)
    held = [t for t in worms if verdicts[t] in ("virus", "suspicious")]
    record_figure("script_worms_held", f"{len(held)}/{len(worms)}")
    assert len(held) == len(worms), {t: verdicts[t] for t in worms if t not in held}
    arrived = pair.arrivals(0)
    assert not [t for t in worms if t in arrived], "a worm reached the mailbox"
