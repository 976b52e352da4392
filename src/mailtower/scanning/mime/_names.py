"""Candidate file names of a part, from every header and encoding a client might honour.

Names are kept in every variant (raw and decoded, per charset guess): what matters for
disguised executables — double extensions, the right-to-left override, whitespace padding — is
exactly what normalisation would remove. Only path components are stripped, since no client
saves an attachment under its sender-chosen directory.
"""

from __future__ import annotations

import binascii
import codecs
import re
import urllib.parse
from dataclasses import dataclass, field

from mailtower.scanning.mime._transfer import decode_base64

_FOLD = re.compile(r"\r?\n(?=[ \t])|\r(?=[ \t])")
_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?([^?]*?)(?:\?=|$)")
_EW_GAP = re.compile(r"(\?=)[ \t\r\n]+(?==\?)")
_QP_HEX = re.compile(rb"=([0-9A-Fa-f]{2})")
_SECTION = re.compile(r"^(filename|name)\*(\d+)(\*?)$")
_PATH_SEP = re.compile(r"[\\/]")

# Parameters a client may take a file name from; the "wrong" header's parameter counts too.
_NAME_PARAMS = ("filename", "name")


@dataclass
class Names:
    """File name candidates of one part."""

    variants: set[str] = field(default_factory=set)  # every candidate, raw and decoded
    primary: set[str] = field(default_factory=set)  # one best decoding per source (to compare)

    def update(self, other: Names) -> None:
        self.variants |= other.variants
        self.primary |= other.primary


def unfold(value: str) -> str:
    return _FOLD.sub("", value)


def params(value: str) -> list[tuple[str, str]]:
    """The ``name=value`` parameters of a structured header value, leniently, in order."""
    value = unfold(value)
    out: list[tuple[str, str]] = []
    pos = value.find(";")
    if pos < 0:
        return out
    n = len(value)
    while pos < n:
        while pos < n and value[pos] in "; \t\r\n":
            pos += 1
        eq = value.find("=", pos)
        semi = value.find(";", pos)
        if eq < 0 or (0 <= semi < eq):
            pos = n if semi < 0 else semi
            continue
        key = value[pos:eq].strip().lower()
        pos = eq + 1
        while pos < n and value[pos] in " \t":
            pos += 1
        if pos < n and value[pos] == '"':
            pos += 1
            chars = []
            while pos < n and value[pos] != '"':
                if value[pos] == "\\" and pos + 1 < n:
                    pos += 1
                chars.append(value[pos])
                pos += 1
            pos += 1  # closing quote (an unterminated one runs to the end)
            val = "".join(chars)
        else:
            end = value.find(";", pos)
            end = n if end < 0 else end
            val = value[pos:end].strip()
            pos = end
        if key:
            out.append((key, val))
    return out


def main_value(value: str) -> str:
    """The part of a structured header value before its parameters, lower case."""
    return unfold(value).split(";", 1)[0].strip().strip('"').lower()


def _charset_decode(data: bytes, charset: str) -> list[str]:
    """``data`` decoded as ``charset`` first, then as UTF-8 and Latin-1 (mis-labelled names)."""
    out = []
    for cs in (charset, "utf-8", "latin-1"):
        try:
            codecs.lookup(cs)
            text = data.decode(cs, "replace")
        except (LookupError, ValueError):
            continue
        if text not in out:
            out.append(text)
    return out or [data.decode("latin-1")]


def fix_text(text: str) -> list[str]:
    """Text that came from bytes as ASCII + surrogateescape: raw 8-bit names, best guess first."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return [text]
    if data.isascii():
        return [text]
    try:
        first = data.decode("utf-8")
    except UnicodeDecodeError:
        first = data.decode("cp1252", "replace")
    return list(dict.fromkeys([first, *_charset_decode(data, "utf-8")]))


def decode_2047(text: str) -> str:
    """RFC 2047 encoded words decoded leniently (bad base64, missing ``?=``, unknown charsets)."""
    if "=?" not in text:
        return text

    def word(m: re.Match[str]) -> str:
        charset = m.group(1).split("*", 1)[0] or "utf-8"
        raw = m.group(3).encode("ascii", "surrogateescape")
        if m.group(2) in "bB":
            data = decode_base64(raw).primary
        else:
            data = _QP_HEX.sub(lambda h: binascii.unhexlify(h.group(1)), raw.replace(b"_", b" "))
        return _charset_decode(data, charset)[0]

    return _ENCODED_WORD.sub(word, _EW_GAP.sub(r"\1", text))


def _decode_2231(raw: str, first_encoded: bool) -> list[str]:
    """An RFC 2231 value (``charset'lang'%xx…``) in every plausible decoding."""
    charset = "utf-8"
    text = raw
    if first_encoded and raw.count("'") >= 2:
        charset, _lang, text = raw.split("'", 2)
    data = urllib.parse.unquote_to_bytes(text)
    return _charset_decode(data, charset or "utf-8")


def strip_path(name: str) -> str:
    return _PATH_SEP.split(name)[-1]


def canonical(name: str) -> str:
    """One name as a comparison key: 8-bit and RFC 2047 decoded, path and outer space removed."""
    return strip_path(decode_2047(fix_text(name)[0])).strip()


def _add(names: Names, candidates: list[str]) -> None:
    """Record one source's candidates; the first one is its primary reading."""
    primary = True
    for cand in candidates:
        for text in fix_text(cand):
            for form in dict.fromkeys([text, decode_2047(text)]):
                stripped = strip_path(form)
                if not stripped:
                    continue
                names.variants.add(stripped)
                if "\x00" in stripped:  # C-string clients stop at NUL
                    names.variants.add(stripped.split("\x00", 1)[0])
                if primary:
                    names.primary.add(canonical(form))
                    primary = False


def from_headers(header_values: list[str]) -> Names:
    """File name candidates from Content-Type and Content-Disposition header values."""
    names = Names()
    for value in header_values:
        sections: dict[str, list[tuple[int, bool, str]]] = {}
        for key, val in params(value):
            if key in _NAME_PARAMS:
                _add(names, [val])
            elif key.endswith("*") and key[:-1] in _NAME_PARAMS:
                _add(names, [*_decode_2231(val, True), val])
            elif m := _SECTION.match(key):
                sections.setdefault(m.group(1), []).append((int(m.group(2)), bool(m.group(3)), val))
        for parts in sections.values():
            parts.sort(key=lambda p: p[0])
            raw = "".join(p[2] for p in parts)
            if any(p[1] for p in parts):
                decoded = _decode_2231_sections(parts)
                _add(names, [*decoded, raw])
            else:
                _add(names, [raw])
    names.primary.discard("")
    return names


def _decode_2231_sections(parts: list[tuple[int, bool, str]]) -> list[str]:
    """RFC 2231 continuations: encoded sections percent-decoded, the first one names the charset."""
    charset = "utf-8"
    data = bytearray()
    for index, (_num, encoded, val) in enumerate(parts):
        if encoded:
            if index == 0 and val.count("'") >= 2:
                charset, _lang, val = val.split("'", 2)
            data += urllib.parse.unquote_to_bytes(val)
        else:
            data += val.encode("utf-8", "surrogateescape")
    return _charset_decode(bytes(data), charset or "utf-8")
