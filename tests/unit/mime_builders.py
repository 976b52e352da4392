"""Builders for the MIME tests: messages assembled at run time (no stored samples)."""

from __future__ import annotations

import base64
import binascii

from mailtower.scanning.mime import analyse, is_hostile
from mailtower.scanning.objects import Analysis, ScanObject
from mailtower.scanning.testdata import eicar, marker

EICAR = eicar()
MARKER = marker()


def b64_lines(data: bytes, width: int = 76) -> str:
    encoded = base64.b64encode(data).decode()
    return "\n".join(encoded[i : i + width] for i in range(0, len(encoded), width))


def uuencode(data: bytes, name: str, mode: str = "644") -> str:
    lines = [f"begin {mode} {name}"]
    lines += [
        binascii.b2a_uu(data[i : i + 45]).decode().rstrip("\n") for i in range(0, len(data), 45)
    ]
    lines += ["`", "end"]
    return "\n".join(lines)


def yencode(data: bytes, name: str, line: int = 128) -> str:
    out = bytearray()
    col = 0
    for byte in data:
        enc = (byte + 42) % 256
        if enc in (0, 10, 13, 61) or (col == 0 and enc in (9, 32, 46)):
            out += bytes([61, (enc + 64) % 256])
            col += 2
        else:
            out.append(enc)
            col += 1
        if col >= line:
            out += b"\n"
            col = 0
    body = out.decode("latin-1").rstrip("\n")
    return f"=ybegin line={line} size={len(data)} name={name}\n{body}\n=yend size={len(data)}"


def attachment_message(
    payload: bytes = EICAR,
    *,
    name: str = "eicar.com",
    boundary: str = "==b0undary==",
    eol: str = "\r\n",
) -> bytes:
    """An ordinary multipart/mixed mail with ``payload`` as a base64 attachment."""
    text = f"""From: Alice <alice@example.com>
To: bob@example.net
Subject: the file
Date: Tue, 02 Jan 2024 10:00:00 +0000
Message-ID: <1@example.com>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="{boundary}"

This is a multi-part message in MIME format.
--{boundary}
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 7bit

Here is the file.
--{boundary}
Content-Type: application/octet-stream; name="{name}"
Content-Disposition: attachment; filename="{name}"
Content-Transfer-Encoding: base64

{b64_lines(payload)}
--{boundary}--
"""
    return text.replace("\n", eol).encode("utf-8", "surrogateescape")


def decoded_objects(analysis: Analysis, payload: bytes) -> list[ScanObject]:
    """The objects other than the whole message that contain ``payload``."""
    return [o for o in analysis.objects if o.path != "message" and payload in o.data]


def assert_found(
    analysis: Analysis, payload: bytes = EICAR, *, filename: str | None = None
) -> ScanObject:
    """Assert some decoded object carries ``payload`` (and ``filename``); return it."""
    found = decoded_objects(analysis, payload)
    assert found, f"payload not found; objects: {[(o.path, o.data[:60]) for o in analysis.objects]}"
    if filename is not None:
        named = [o for o in found if filename in o.filenames]
        assert named, f"{filename!r} not among {[sorted(o.filenames) for o in found]}"
        return named[0]
    return found[0]


def hostile(analysis: Analysis) -> list[str]:
    return [a for a in analysis.anomalies if is_hostile(a)]


def analyse_text(text: str, eol: str = "\r\n") -> Analysis:
    return analyse(text.replace("\r\n", "\n").replace("\n", eol).encode("utf-8", "surrogateescape"))
