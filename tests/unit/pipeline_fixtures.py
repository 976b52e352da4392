"""Messages for the pipeline and ``mailtower scan`` tests, built at run time (no stored samples)."""

from __future__ import annotations

import base64
import os
import struct
import zlib
from email.message import EmailMessage
from email.policy import SMTP

from archive_builders import zip_of
from skeptic_fixtures import docx

from mailtower.scanning.testdata import eicar

EICAR = eicar()


def message(subject: str = "Quarterly figures", body: str = "Hello Bob,\n\nsee attached.\n"):
    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@example.com>"
    msg["To"] = "bob@example.net"
    msg["Subject"] = subject
    msg["Date"] = "Tue, 02 Jan 2024 10:00:00 +0000"
    msg["Message-ID"] = "<20240102100000.1@example.com>"
    msg.set_content(body)
    return msg


def with_attachment(data: bytes, filename: str, ctype: str = "application/octet-stream") -> bytes:
    msg = message()
    maintype, subtype = ctype.split("/")
    msg.add_attachment(data, maintype, subtype, filename=filename)
    return msg.as_bytes(policy=SMTP)


def pe() -> bytes:
    """A PE header that a magic check believes (not a runnable program)."""
    dos = bytearray(b"MZ" + b"\x90\x00" + b"\x00" * 56)
    dos[0x3C:0x40] = struct.pack("<I", 0x80)
    stub = b"This program cannot be run in DOS mode.\r\r\n$".ljust(0x40, b"\0")
    return bytes(dos) + stub + b"PE\0\0" + b"\x4c\x01" + bytes(range(256)) * 4


def elf() -> bytes:
    return b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x02\x00\x3e\x00" + os.urandom(400)


# -- ordinary business mail ------------------------------------------------------------------------


def png(width: int = 16, height: int = 16) -> bytes:
    """A real, valid PNG image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(b"\0" + bytes([20, 120, 200]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def pdf(text: str = "Invoice 2024-0117") -> bytes:
    """A real minimal PDF: one page of text, with a correct cross-reference table."""
    content = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


ICS = "\r\n".join(
    [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        "METHOD:REQUEST",
        "PRODID:-//Example Corp//Calendar 1.0//EN",
        "BEGIN:VEVENT",
        "UID:20240301T100000Z-1@example.com",
        "DTSTAMP:20240220T090000Z",
        "DTSTART:20240301T100000Z",
        "DTEND:20240301T110000Z",
        "ORGANIZER;CN=Alice:mailto:alice@example.com",
        "ATTENDEE;RSVP=TRUE:mailto:bob@example.net",
        "SUMMARY:Quarterly review – Zürich",
        "END:VEVENT",
        "END:VCALENDAR",
        "",
    ]
)


def plain_text() -> bytes:
    return message(body="Hi Bob,\n\nlunch at 12? The usual place.\n\nAlice\n").as_bytes(policy=SMTP)


def newsletter() -> bytes:
    msg = message("Our March newsletter", "Plain-text version.\n" * 50)
    story = (
        "<tr><td><h2>Story</h2><p>Our team met customers in <a href='https://example.com/a?"
        "utm_source=news&amp;id=1'>three cities</a>.</p><img src='cid:photo' width='600'></td></tr>"
    )
    html = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><style>td{font-family:Arial}</style>"
        "</head><body><table>" + story * 200 + "</table>"
        '<script type=\'application/ld+json\'>{"@type": "Organization"}</script>'
        "<p><a href='https://example.com/unsubscribe'>Unsubscribe</a></p></body></html>"
    )
    msg.add_alternative(html, subtype="html")
    html_part = msg.get_payload()[1]
    html_part.add_related(png(600, 200), "image", "png", cid="<photo>", filename="photo.png")
    html_part.add_related(png(120, 40), "image", "png", cid="<logo>")
    return msg.as_bytes(policy=SMTP)


def office_attachments() -> bytes:
    msg = message("Invoice and report")
    msg.add_attachment(pdf(), "application", "pdf", filename="invoice.pdf")
    msg.add_attachment(png(64, 64), "image", "png", filename="chart.png")
    msg.add_attachment(
        docx(),
        "application",
        "vnd.openxmlformats-officedocument.wordprocessingml.document",
        filename="report.docx",
    )
    return msg.as_bytes(policy=SMTP)


def calendar_invite() -> bytes:
    msg = message("Invitation: Quarterly review", "You are invited.")
    msg.add_alternative(ICS, subtype="calendar", params={"method": "REQUEST"})
    msg.add_attachment(ICS.encode(), "application", "ics", filename="invite.ics")
    return msg.as_bytes(policy=SMTP)


def signed() -> bytes:
    """multipart/signed with a detached S/MIME signature part (opaque DER bytes)."""
    signature = base64.encodebytes(b"\x30\x82\x06\x1c" + os.urandom(1560)).decode()
    text = (
        "From: signer@example.com\nTo: bob@example.net\nSubject: signed contract\n"
        "Date: Tue, 02 Jan 2024 10:00:00 +0000\nMIME-Version: 1.0\n"
        'Content-Type: multipart/signed; protocol="application/pkcs7-signature";'
        ' micalg=sha-256;\n boundary="----8A3F1C2B9D"\n\n'
        "This is an S/MIME signed message\n\n"
        "------8A3F1C2B9D\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: quoted-printable\n\n"
        "Gr=C3=BC=C3=9Fe, the signed contract is attached.\n\n"
        "------8A3F1C2B9D\n"
        'Content-Type: application/pkcs7-signature; name="smime.p7s"\n'
        "Content-Transfer-Encoding: base64\n"
        'Content-Disposition: attachment; filename="smime.p7s"\n\n'
        f"{signature}\n------8A3F1C2B9D--\n"
    )
    return text.replace("\n", "\r\n").encode()


def forwarded() -> bytes:
    inner = message("Contract draft", "Please review the draft.")
    inner.add_attachment(pdf("Draft contract"), "application", "pdf", filename="draft.pdf")
    msg = message("Fwd: Contract draft", "FYI, see below.")
    msg.add_attachment(inner)
    return msg.as_bytes(policy=SMTP)


def non_ascii() -> bytes:
    msg = message(
        "Grüße aus Zürich – 請求書 №42 ✓",
        "Sehr geehrte Damen und Herren,\n\nanbei die Rechnung für März. 日本語のテキスト。\n"
        "Ελληνικά, русский текст, émojis 🙂.\n",
    )
    msg.add_attachment(pdf(), "application", "pdf", filename="Rechnung für März – 請求書.pdf")
    msg.add_attachment(png(), "image", "png", filename="Ωμέγα фото.png")
    return msg.as_bytes(policy=SMTP)


def digest() -> bytes:
    """A mailing-list digest (multipart/digest: parts default to message/rfc822)."""
    parts = "".join(
        f"--DIGEST\n\nMessage: {n}\nFrom: member{n}@example.org\nSubject: [list] topic {n}\n"
        f"Content-Type: text/plain; charset=us-ascii\n\nPost number {n}.\n\n"
        for n in range(1, 4)
    )
    text = (
        "From: list-request@example.org\nTo: list@example.org\nSubject: list digest, Vol 1 #2\n"
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="OUTER"\n\n'
        "--OUTER\nContent-Type: text/plain\n\nToday's topics: 1, 2, 3\n\n"
        '--OUTER\nContent-Type: multipart/digest; boundary="DIGEST"\n\n'
        f"{parts}--DIGEST--\n\n--OUTER--\n"
    )
    return text.replace("\n", "\r\n").encode()


def zip_ending_in_one_padded_quantum() -> bytes:
    """A zip attachment whose base64's last line is a single padded quantum ("xx==")."""
    # Base64 lines carry 57 bytes: a length of 57n + 1 leaves one byte for the last line.
    minutes = (b"".join(b"%d. item %d\n" % (i, i * i) for i in range(n)) for n in range(1, 999))
    data = next(d for d in map(lambda m: zip_of({"minutes.txt": m}), minutes) if len(d) % 57 == 1)
    return with_attachment(data, "minutes.zip", "application/zip")


ORDINARY = {
    "plain-text": plain_text,
    "html-newsletter-inline-images": newsletter,
    "pdf-png-docx": office_attachments,
    "calendar-invite": calendar_invite,
    "smime-signed": signed,
    "forwarded-rfc822": forwarded,
    "non-ascii": non_ascii,
    "mailing-list-digest": digest,
    "zip-base64-short-last-line": zip_ending_in_one_padded_quantum,
}
