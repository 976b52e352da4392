"""Text for a terminal: what mail put there, printed by any command, safe to show.

A leaf (it imports nothing of mailtower), so the commands of every area can use it.
"""

from __future__ import annotations

import json


def shown(text: object) -> str:
    """``text`` safe to print on a terminal: every character that is not printable (ESC, BEL,
    DEL, C1 controls, bidi overrides, line separators, and the lone surrogates that stand for
    bytes that were not UTF-8) as a backslash escape, and backslash itself doubled, so what
    mail put there can neither drive the terminal nor pass for something else."""
    out = []
    for char in str(text):
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte that was not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON spells a character beyond the BMP as its UTF-16 pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_line(value: object) -> str:
    """``value`` as one line of JSON with readable text, but every character ``shown`` would
    escape written as ``\\uXXXX``: the same JSON value, safe on a terminal."""
    text = json.dumps(value, ensure_ascii=False)  # outside strings, all printable ASCII
    return "".join(c if c.isprintable() else _json_escape(c) for c in text)
