"""Candidate file names of a part, from every header and encoding a client might honour.

Names are kept in every variant (raw and decoded, per charset guess): what matters for
disguised executables — double extensions, the right-to-left override, whitespace padding — is
exactly what normalisation would remove. Only path components are stripped, since no client
saves an attachment under its sender-chosen directory.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import re
import urllib.parse
from dataclasses import dataclass, field

from mailtower.scanning.mime._transfer import decode_base64

_FOLD = re.compile(r"\r?\n(?=[ \t])|\r(?=[ \t])")
# A fold with its white space: clients that join folded lines without it read another name.
_FOLD_ALL = re.compile(r"(?:\r?\n|\r)[ \t]+")
# A name parameter anywhere in a header value, as a reader that looks for "name=" finds it:
# with or without the ";" before it.
_LOOSE_PARAM = re.compile(r"(?:^|(?<=[\s;]))((?:file)?name(?:\*\d*\*?)?)[ \t]*=[ \t]*", re.I)
_QUOTED_PAIR = re.compile(r"\\(.)")
_CONTROL = re.compile(r"[\x00-\x1f]")
# What Windows drops from the end of a name ("evil.exe . " opens as "evil.exe").
_TRAILING = " .\t\r\n\u00a0"
# Charsets whose names are UTF-16 whatever their byte order; without a BOM both orders are read.
_UTF16_LABELS = ("utf-16", "utf16", "ucs-2", "ucs2", "unicode")
_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?([^?]*?)(?:\?=|$)")
_EW_GAP = re.compile(r"(\?=)[ \t\r\n]+(?==\?)")
_QP_HEX = re.compile(rb"=([0-9A-Fa-f]{2})")
_SECTION = re.compile(r"^(filename|name)\*(\d+)(\*?)$")
_PATH_SEP = re.compile(r"[\\/]")

# Header values whose names are remembered (see from_headers): the parts of the messages in
# hand, bounded in size.
_MEMO_ENTRIES = 256
_MEMO_MAX_CHARS = 2000

# Parameters a client may take a file name from; the "wrong" header's parameter counts too.
_NAME_PARAMS = ("filename", "name")


@dataclass
class Names:
    """File name candidates of one part."""

    variants: set[str] = field(default_factory=set)  # every candidate, raw and decoded
    primary: set[str] = field(default_factory=set)  # one best decoding per source (to compare)
    # Candidates only an off-standard reading of the parameters derives (quotes ignored, folds
    # joined without their space, continuations cut at a gap): in ``variants`` too.
    offstandard: set[str] = field(default_factory=set)

    def update(self, other: Names) -> None:
        self.variants |= other.variants
        self.primary |= other.primary
        self.offstandard |= other.offstandard

    def ambiguous(self) -> bool:
        """Whether an off-standard reading gives an extension no standard reading gives."""
        if not self.offstandard:
            return False
        standard = {extension(n) for n in self.variants - self.offstandard}
        return any(extension(n) not in standard for n in self.offstandard)


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


def loose_params(value: str) -> list[tuple[str, str]]:
    """The name parameters of a header value as a reader that ignores quoting finds them:
    ``name=`` anywhere (no ";" needed before it), the value up to the next ";", stripped of
    white space and of quotes of either kind at both ends."""
    out: list[tuple[str, str]] = []
    value = unfold(value)
    for m in _LOOSE_PARAM.finditer(value):
        end = value.find(";", m.end())
        val = value[m.end() : len(value) if end < 0 else end].strip().strip("\"'").strip()
        out.append((m.group(1).lower(), val))
        if "\\" in val:  # quoted-pairs resolved, as a quote-aware reader would
            out.append((m.group(1).lower(), _QUOTED_PAIR.sub(r"\1", val)))
    return out


def extension(name: str) -> str:
    """The extension Windows decides by (base name, cut at a control character, trailing dots
    and spaces dropped), lower case; "" for none."""
    base = _CONTROL.split(strip_path(name), 1)[0].rstrip(_TRAILING)
    _, dot, ext = base.rpartition(".")
    return ext.lower() if dot else ""


def main_value(value: str) -> str:
    """The part of a structured header value before its parameters, lower case."""
    return unfold(value).split(";", 1)[0].strip().strip('"').lower()


def _charset_decode(data: bytes, charset: str) -> list[str]:
    """``data`` decoded as ``charset`` first, then as UTF-8 and Latin-1 (mis-labelled names)."""
    out = []
    charsets = [charset, "utf-8", "latin-1"]
    if b"\x00" in data or charset.lower().startswith(_UTF16_LABELS):
        # UTF-16 without a byte-order mark: either order, the likelier first (Latin text has
        # its zero bytes first in big-endian); a decoder's own default (little-endian) too.
        orders = ["utf-16-le", "utf-16-be"]
        if data[0::2].count(0) > data[1::2].count(0):
            orders.reverse()
        if charset.lower().startswith(_UTF16_LABELS) and not data.startswith(_BOMS):
            charsets = [*orders, *charsets]
        else:
            charsets += orders
    for cs in charsets:
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


def _add(names: Names, candidates: list[str], *, standard: bool = True) -> None:
    """Record one source's candidates; the first one is its primary reading (``standard``
    False: an off-standard reading's, which has none)."""
    primary = standard
    for cand in candidates:
        for text in fix_text(cand):
            for form in dict.fromkeys([text, decode_2047(text)]):
                stripped = strip_path(form)
                if not stripped:
                    continue
                found = [stripped]
                if "\x00" in stripped:
                    # C-string clients stop at NUL; others drop NULs (UTF-16 read as 8-bit).
                    found += [stripped.split("\x00", 1)[0], stripped.replace("\x00", "")]
                for name in found:
                    if name and name not in names.variants:
                        names.variants.add(name)
                        if not standard:
                            names.offstandard.add(name)
                if primary:
                    names.primary.add(canonical(form))
                    primary = False


def _from_params(names: Names, found: list[tuple[str, str]], *, standard: bool) -> None:
    """Record the name candidates of one reading's parameter list."""
    sections: dict[str, list[tuple[int, bool, str]]] = {}
    for key, val in found:
        if key in _NAME_PARAMS:
            _add(names, [val], standard=standard)
        elif key.endswith("*") and key[:-1] in _NAME_PARAMS:
            _add(names, [*_decode_2231(val, True), val], standard=standard)
        elif m := _SECTION.match(key):
            sections.setdefault(m.group(1), []).append((int(m.group(2)), bool(m.group(3)), val))
    for parts in sections.values():
        parts.sort(key=lambda p: p[0])
        _add_sections(names, parts, standard=standard)
        # Numbering with a gap (or not from 0): readers that stop at the gap read a prefix.
        contiguous = 0
        while contiguous < len(parts) and parts[contiguous][0] == contiguous:
            contiguous += 1
        if 0 < contiguous < len(parts):
            _add_sections(names, parts[:contiguous], standard=False)


def _add_sections(names: Names, parts: list[tuple[int, bool, str]], *, standard: bool) -> None:
    raw = "".join(p[2] for p in parts)
    if any(p[1] for p in parts):
        _add(names, [*_decode_2231_sections(parts), raw], standard=standard)
    else:
        _add(names, [raw], standard=standard)


def from_headers(header_values: list[str]) -> Names:
    """File name candidates from Content-Type and Content-Disposition header values: the
    lenient RFC reading's, and those of readers that ignore quoting or join folded lines
    without their white space (in ``offstandard`` as well).

    The structural readings hand in the same headers for a part: short values are derived
    once (a fresh copy each time, which the caller may change)."""
    values = tuple(header_values)
    if sum(map(len, values)) > _MEMO_MAX_CHARS:
        variants, primary, offstandard = _derive(values)
    else:
        variants, primary, offstandard = _derive_memo(values)
    return Names(set(variants), set(primary), set(offstandard))


def _derive(values: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    names = Names()
    for value in values:
        standard = params(value)
        _from_params(names, standard, standard=True)
        named = [(k, v) for k, v in standard if _is_name_key(k)]
        readings = [value]
        joined = _FOLD_ALL.sub("", value)
        if joined != value:
            readings.append(joined)
            others = params(joined)
            if others != standard:
                _from_params(names, others, standard=False)
        for text in readings:
            loose = loose_params(text)
            if loose != named:  # (well-formed parameters read the same: nothing new)
                _from_params(names, loose, standard=False)
    names.primary.discard("")
    return frozenset(names.variants), frozenset(names.primary), frozenset(names.offstandard)


_derive_memo = functools.lru_cache(maxsize=_MEMO_ENTRIES)(_derive)


def _is_name_key(key: str) -> bool:
    return key in _NAME_PARAMS or key.split("*", 1)[0] in _NAME_PARAMS


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
