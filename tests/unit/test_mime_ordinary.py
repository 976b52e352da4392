"""Ordinary mail comes through union parsing sane: sensible objects, no hostile anomalies."""

from __future__ import annotations

import base64
import os
from email.message import EmailMessage
from email.policy import SMTP, default

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mime_builders import analyse_text, b64_lines, hostile

from mailtower.scanning.mime import HOSTILE_ANOMALIES, INFORMATIONAL_ANOMALIES, analyse, is_hostile
from mailtower.scanning.objects import Analysis

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)  # looks like an image, random body
PDF = b"%PDF-1.4\n" + os.urandom(5000) + b"\n%%EOF\n"
XLSX = b"PK\x03\x04" + os.urandom(4000)


def _data(result: Analysis) -> set[bytes]:
    return {o.data for o in result.objects}


def _sane(result: Analysis) -> None:
    assert hostile(result) == [], result.anomalies
    assert "mime.views-disagree" not in result.anomalies
    assert result.objects[0].path == "message"


def _generated(msg: EmailMessage) -> list[bytes]:
    """The message as Python's generator writes it, with CRLF and with LF."""
    return [msg.as_bytes(policy=SMTP), msg.as_bytes(policy=default)]


def test_plain_text_mail_without_mime_headers() -> None:
    result = analyse_text("From: a@example.com\nTo: b@example.net\nSubject: hi\n\nJust text.\n")
    _sane(result)
    assert result.anomalies == []
    assert b"Just text.\r\n" in _data(result)


def test_newsletter_with_inline_images() -> None:
    msg = EmailMessage()
    msg["From"] = "News <news@example.com>"
    msg["To"] = "you@example.net"
    msg["Subject"] = "Our March newsletter"
    msg.set_content("Plain version.\n" * 200)
    html = "<html><body>" + "<p>Story <img src='cid:logo'></p>" * 300 + "</body></html>"
    msg.add_alternative(html, subtype="html")
    html_part = msg.get_payload()[1]
    html_part.add_related(PNG, "image", "png", cid="<logo>", filename="logo.png")
    html_part.add_related(PNG[:1500], "image", "png", cid="<banner>")
    for data in _generated(msg):
        result = analyse(data)
        _sane(result)
        images = [o for o in result.objects if o.data == PNG]
        assert images and "logo.png" in images[0].filenames
        assert "image/png" in images[0].content_types
        assert any(b"<img src='cid:logo'>" in d for d in _data(result))


def test_calendar_invite() -> None:
    ics = "\r\n".join(
        [
            "BEGIN:VCALENDAR",
            "METHOD:REQUEST",
            "PRODID:-//Example//Calendar//EN",
            "BEGIN:VEVENT",
            "UID:1234@example.com",
            "DTSTART:20240301T100000Z",
            "SUMMARY:Quarterly review – Zürich",
            "END:VEVENT",
            "END:VCALENDAR",
        ]
    )
    msg = EmailMessage()
    msg["From"] = "boss@example.com"
    msg["Subject"] = "Invitation: Quarterly review"
    msg.set_content("You are invited.")
    msg.add_alternative(ics, subtype="calendar", params={"method": "REQUEST"})
    msg.add_attachment(ics.encode(), "application", "ics", filename="invite.ics")
    for data in _generated(msg):
        result = analyse(data)
        _sane(result)
        invite = [o for o in result.objects if o.data == ics.encode()]
        assert invite and "invite.ics" in invite[0].filenames
        assert "application/ics" in invite[0].content_types
        calendar = [o for o in result.objects if "text/calendar" in o.content_types]
        assert calendar and b"SUMMARY:Quarterly review" in calendar[0].data


def test_smime_signed_mail() -> None:
    signature = os.urandom(1800)
    text = f"""From: signer@example.com
To: b@example.net
Subject: signed
MIME-Version: 1.0
Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;
 boundary="----8A3F1C2B9D"

This is an S/MIME signed message

------8A3F1C2B9D
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Gr=C3=BC=C3=9Fe, the contract is attached.
------8A3F1C2B9D
Content-Type: application/pkcs7-signature; name="smime.p7s"
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename="smime.p7s"
Content-Description: S/MIME Cryptographic Signature

{b64_lines(signature, 64)}

------8A3F1C2B9D--

"""
    for eol in ("\r\n", "\n"):
        result = analyse_text(text, eol)
        _sane(result)
        sig = [o for o in result.objects if o.data == signature]
        assert sig and sig[0].filenames == {"smime.p7s"}
        assert "Grüße".encode() in b"".join(_data(result))


def test_forwarded_message() -> None:
    inner = EmailMessage()
    inner["From"] = "Zoë <zoe@example.org>"
    inner["Subject"] = "Rapport trimestriel – été"
    inner.set_content("Voici le rapport de l'été.\n")
    inner.add_attachment(PDF, "application", "pdf", filename="rapport été 2024.pdf")
    outer = EmailMessage()
    outer["From"] = "fwd@example.com"
    outer["Subject"] = "Fwd: Rapport trimestriel"
    outer.set_content("See the forwarded message.")
    outer.add_attachment(inner)
    for data in _generated(outer):
        result = analyse(data)
        _sane(result)
        pdf = [o for o in result.objects if o.data == PDF]
        assert pdf and "rapport été 2024.pdf" in pdf[0].filenames


@pytest.mark.parametrize(
    "disposition",
    [
        "attachment; filename*=utf-8''R%C3%A9sum%C3%A9%20%E6%97%A5%E6%9C%AC.pdf",
        'attachment; filename="=?utf-8?B?{}?="'.format(
            base64.b64encode("Résumé 日本.pdf".encode()).decode()
        ),
        'attachment; filename="Résumé 日本.pdf"',  # raw UTF-8 (RFC 6532), as Apple Mail sends
        "attachment; filename*0*=utf-8''R%C3%A9sum%C3%A9%20; filename*1*=%E6%97%A5%E6%9C%AC.pdf",
    ],
)
def test_non_ascii_names_and_bodies(disposition: str) -> None:
    text = f"""From: =?utf-8?q?J=C3=BCrgen?= <j@example.de>
To: b@example.net
Subject: =?utf-8?B?{base64.b64encode("Grüße aus Köln".encode()).decode()}?=
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="=_abc"

--=_abc
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Grüße, 日本語のテキスト, Ελληνικά.
--=_abc
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

Caf=E9 cr=E8me
--=_abc
Content-Type: application/pdf; name="=?utf-8?Q?R=C3=A9sum=C3=A9_=E6=97=A5=E6=9C=AC.pdf?="
Content-Disposition: {disposition}
Content-Transfer-Encoding: base64

{b64_lines(PDF)}
--=_abc--
"""
    result = analyse_text(text)
    _sane(result)
    pdf = [o for o in result.objects if o.data == PDF]
    assert pdf and "Résumé 日本.pdf" in pdf[0].filenames
    assert "Grüße, 日本語".encode() in b"".join(_data(result))
    assert b"Caf\xe9 cr\xe8me" in _data(result)


def test_delivery_status_notification() -> None:
    text = """From: MAILER-DAEMON@example.com
To: a@example.com
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="DSN.1"

--DSN.1
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

Your message could not be delivered.
--DSN.1
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.com

Final-Recipient: rfc822; nobody@example.net
Action: failed
Status: 5.1.1
--DSN.1
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

From: a@example.com
Subject: hello
--DSN.1--
"""
    _sane(analyse_text(text))


def test_outlook_style_nested_alternative_and_attachment() -> None:
    text = f"""From: a@example.com
Subject: Q3 numbers
MIME-Version: 1.0
Content-Type: multipart/mixed;
\tboundary="----=_NextPart_000_0012_01DA1234.56789ABC"

This is a multipart message in MIME format.

------=_NextPart_000_0012_01DA1234.56789ABC
Content-Type: multipart/alternative;
\tboundary="----=_NextPart_001_0013_01DA1234.56789ABC"


------=_NextPart_001_0013_01DA1234.56789ABC
Content-Type: text/plain;
\tcharset="us-ascii"
Content-Transfer-Encoding: 7bit

Numbers attached.

------=_NextPart_001_0013_01DA1234.56789ABC
Content-Type: text/html;
\tcharset="us-ascii"
Content-Transfer-Encoding: quoted-printable

<html><body><p class=3D"MsoNormal">Numbers attached.</p></body></html>

------=_NextPart_001_0013_01DA1234.56789ABC--

------=_NextPart_000_0012_01DA1234.56789ABC
Content-Type: application/vnd.openxmlformats-officedocument.spreadsheetml.sheet;
\tname="Q3 numbers.xlsx"
Content-Transfer-Encoding: base64
Content-Disposition: attachment;
\tfilename="Q3 numbers.xlsx"

{b64_lines(XLSX)}

------=_NextPart_000_0012_01DA1234.56789ABC--
"""
    result = analyse_text(text)
    _sane(result)
    assert any("Q3 numbers.xlsx" in o.filenames for o in result.objects)


def test_hostile_and_informational_names_are_disjoint_and_stable() -> None:
    assert not HOSTILE_ANOMALIES & INFORMATIONAL_ANOMALIES
    assert all(a.startswith("mime.") for a in HOSTILE_ANOMALIES | INFORMATIONAL_ANOMALIES)
    assert is_hostile("mime.reader-error:email-default")
    assert not is_hostile("mime.uuencode")
    assert {"mime.risky-disagreement", "mime.too-deep", "mime.message-partial"} <= HOSTILE_ANOMALIES
    # A disagreement alone is informational; about risky content it is hostile (issue 20).
    assert not is_hostile("mime.views-disagree")
    assert is_hostile("mime.risky-disagreement:views-disagree")


_name = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\\/\"'"),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip() == s and s.strip())
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
_mime = st.sampled_from(
    [("application", "pdf"), ("image", "jpeg"), ("application", "zip"), ("audio", "mpeg")]
)


@st.composite
def _ordinary(draw: st.DrawFn, forwards: int = 2) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.com"
    msg["Subject"] = draw(_name)
    msg.set_content(draw(_text) + "\n")
    if draw(st.booleans()):
        msg.add_alternative(f"<p>{draw(_text)}</p>\n", subtype="html")
    for _ in range(draw(st.integers(0, 3))):
        maintype, subtype = draw(_mime)
        msg.add_attachment(draw(st.binary(max_size=500)), maintype, subtype, filename=draw(_name))
    if forwards and draw(st.booleans()):
        msg.add_attachment(draw(_ordinary(forwards - 1)))
    return msg


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ordinary(), st.sampled_from([SMTP, default]))
def test_mail_written_by_a_mail_library_is_never_hostile(msg: EmailMessage, policy) -> None:
    data = msg.as_bytes(policy=policy)
    result = analyse(data)
    _sane(result)
    for part in msg.walk():
        if part.get_filename() and not part.is_multipart():
            payload = part.get_payload(decode=True)
            if payload:
                named = [o for o in result.objects if o.data == payload]
                assert named and part.get_filename() in named[0].filenames
