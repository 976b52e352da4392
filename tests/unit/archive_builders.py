"""Archives for tests, built in memory: one place for every test module that needs them."""

from __future__ import annotations

import io
import zipfile


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def with_encrypted_flag(zip_data: bytes) -> bytes:
    """Set every entry's 'encrypted' bit (zipfile cannot write encrypted archives)."""
    patched = bytearray(zip_data)
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = patched.find(signature)
        while pos != -1:
            patched[pos + flag_offset] |= 0x01
            pos = patched.find(signature, pos + 4)
    return bytes(patched)
