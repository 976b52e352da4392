"""A seeded generator of attachment names hidden by broken or unusual MIME and archive headers.

Each case is a message whose attachment carries a name with a banned extension that some
reading (a mail client, an extractor) derives, while other readings derive a harmless one —
the classes of issue 20's "hidden attachment names". With ``banned=False`` the same
constructions carry only harmless names: the clean corpus, which must never be banned.
The content is harmless text, so only a name can ban the message.
"""

from __future__ import annotations

import base64
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

BANNED_EXTENSIONS = ("exe", "js", "scr", "vbs", "com", "bat", "hta", "jse", "pif", "cmd")
SAFE_EXTENSIONS = ("pdf", "txt", "jpg", "docx", "xlsx", "png", "csv", "odt")
_STEM_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-"
_NON_ASCII = "\u00e9\u00fc\u00df\u00f8\u00e5\u00e7\u00f1"


@dataclass(frozen=True)
class Case:
    cls: str  # the class of trick
    raw: bytes  # the whole message
    name: str  # the name that must be seen (banned extension unless the corpus is clean)


@dataclass
class _Ctx:
    rng: random.Random
    banned: bool

    def stem(self) -> str:
        rng = self.rng
        stem = "".join(rng.choice(_STEM_CHARS) for _ in range(rng.randint(3, 10)))
        if rng.random() < 0.2:
            stem += rng.choice(_NON_ASCII)
        return stem

    def hidden(self) -> str:
        ext = self.rng.choice(BANNED_EXTENSIONS if self.banned else SAFE_EXTENSIONS)
        return f"{self.stem()}.{ext}"

    def decoy(self) -> str:
        return f"{self.stem()}.{self.rng.choice(SAFE_EXTENSIONS)}"


# -- encoders ------------------------------------------------------------------------------------


def _pct(rng: random.Random, data: bytes, always: float = 0.3) -> str:
    """Percent-encoded ``data``: non-token bytes always, the others with probability ``always``."""
    out = []
    for byte in data:
        char = chr(byte)
        if byte < 128 and (char.isalnum() or char in "-_.") and rng.random() >= always:
            out.append(char)
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def _q(rng: random.Random, data: bytes) -> str:
    out = []
    for byte in data:
        char = chr(byte)
        if byte < 128 and char.isalnum() and rng.random() > 0.3:
            out.append(char)
        else:
            out.append(f"={byte:02X}")
    return "".join(out)


def _word(rng: random.Random, text: str, charset: str = "utf-8") -> str:
    data = text.encode(charset)
    if rng.random() < 0.5:
        return f"=?{charset}?B?{base64.b64encode(data).decode()}?="
    return f"=?{charset}?Q?{_q(rng, data)}?="


def _cuts(rng: random.Random, text: str, pieces: int) -> list[str]:
    """``text`` cut into ``pieces`` non-empty pieces (fewer if it is short)."""
    pieces = max(1, min(pieces, len(text)))
    points = sorted(rng.sample(range(1, len(text)), pieces - 1)) if pieces > 1 else []
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _quote(rng: random.Random, value: str) -> str:
    if rng.random() < 0.6 or any(c in value for c in ' ;"()<>@,:\\/[]?='):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


# -- the message ---------------------------------------------------------------------------------


def _message(ctx: _Ctx, ct_params: str, cd_params: str | None, body: bytes) -> bytes:
    """A multipart/mixed mail; the attachment's headers end in the given parameter strings
    (each starts with its separator, "; " normally)."""
    rng = ctx.rng
    boundary = f"=_b{rng.randrange(10**9)}"
    encoded = base64.encodebytes(body).decode().replace("\n", "\r\n")
    cd = f"Content-Disposition: attachment{cd_params}\r\n" if cd_params is not None else ""
    head = (
        "From: Alice <alice@example.com>\r\n"
        "To: bob@example.net\r\n"
        "Subject: the file\r\n"
        "Date: Tue, 02 Jan 2024 10:00:00 +0000\r\n"
        f"Message-ID: <{rng.randrange(10**9)}@example.com>\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Here is the file.\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: application/octet-stream{ct_params}\r\n"
        f"{cd}"
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
    )
    tail = f"{encoded}--{boundary}--\r\n"
    return head.encode("utf-8", "surrogateescape") + tail.encode()


def _text(rng: random.Random) -> bytes:
    words = ["quarterly", "figures", "attached", "regards", "meeting", "notes", "draft"]
    return (" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "\n").encode()


def _place(ctx: _Ctx, hidden_params: str, decoy_params: str | None = None) -> tuple[str, str]:
    """Content-Type and Content-Disposition parameters: the hidden name's parameter string in
    one header, the decoy's (if any) in the same or the other one."""
    rng = ctx.rng
    hidden_in_cd = rng.random() < 0.6
    ct, cd = "", ""
    if hidden_in_cd:
        cd = hidden_params
    else:
        ct = hidden_params.replace("filename", "name")
    if decoy_params is not None:
        if rng.random() < 0.5:  # same header, before or after
            if hidden_in_cd:
                cd = decoy_params + cd if rng.random() < 0.5 else cd + decoy_params
            else:
                decoy = decoy_params.replace("filename", "name")
                ct = decoy + ct if rng.random() < 0.5 else ct + decoy
        elif hidden_in_cd:
            ct = decoy_params.replace("filename", "name")
        else:
            cd = decoy_params
    return ct, cd


def _mime_case(ctx: _Ctx, cls: str, name: str, hidden: str, decoy: bool = True) -> Case:
    decoy_params = f'; filename="{ctx.decoy()}"' if decoy and ctx.rng.random() < 0.7 else None
    ct, cd = _place(ctx, hidden, decoy_params)
    return Case(cls, _message(ctx, ct, cd, _text(ctx.rng)), name)


# -- the classes ---------------------------------------------------------------------------------


def _rfc2231_continuation(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name = ctx.hidden()
    pieces = _cuts(rng, name, rng.randint(2, 4))
    sections = []
    charset = rng.choice(["utf-8", "UTF-8", "iso-8859-1", ""])
    for index, piece in enumerate(pieces):
        if rng.random() < 0.5:
            data = piece.encode("latin-1" if charset == "iso-8859-1" else "utf-8")
            prefix = f"{charset}'{rng.choice(['', 'en'])}'" if index == 0 else ""
            sections.append(f"filename*{index}*={prefix}{_pct(rng, data)}")
        else:
            sections.append(f"filename*{index}={_quote(rng, piece)}")
    if rng.random() < 0.3:
        rng.shuffle(sections)  # out of order: readers sort them (RFC 2231 allows any order)
    params = "".join(";" + rng.choice([" ", "\r\n "]) + s for s in sections)
    if rng.random() < 0.3:
        # A gap in the numbering: some readers stop there, others join the rest.
        junk = f"; filename*{len(pieces) + 1}={_quote(rng, '.' + rng.choice(SAFE_EXTENSIONS))}"
        params += junk
    return _mime_case(ctx, "rfc2231-continuation", name, params)


def _rfc2231_charset(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name = ctx.hidden()
    charset = rng.choice(["utf-8", "iso-8859-1", "windows-1252", "x-unknown", "UTF-8", "koi8-r"])
    lang = rng.choice(["", "en", "de-DE", "x-klingon"])
    codec = {"x-unknown": "utf-8", "koi8-r": "utf-8"}.get(charset, charset)
    data = name.encode(codec, "replace")
    params = f"; filename*={charset}'{lang}'{_pct(rng, data, always=0.5)}"
    return _mime_case(ctx, "rfc2231-charset", name, params)


def _rfc2231_empty_charset(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name = ctx.hidden()
    data = name.encode()
    form = rng.randrange(4)
    if form == 0:
        params = f"; filename*=''{_pct(rng, data)}"
    elif form == 1:
        params = f"; filename*='{rng.choice(['en', 'fr'])}'{_pct(rng, data)}"
    elif form == 2:
        params = f"; filename*=\"''{_pct(rng, data)}\""  # quoted, against the RFC
    else:
        head, tail = _cuts(rng, name, 2)
        params = (
            f"; filename*0*=''{_pct(rng, head.encode())}; filename*1*={_pct(rng, tail.encode())}"
        )
    return _mime_case(ctx, "rfc2231-empty-charset", name, params)


def _rfc2047_param(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name = ctx.hidden()
    charset = rng.choice(["utf-8", "iso-8859-1", "UTF-8", "windows-1252"])
    codec = "utf-8" if charset.lower() == "utf-8" else charset
    pieces = _cuts(rng, name, rng.randint(1, 3))
    words = [_word(rng, p, codec).replace(f"={codec}?", f"={charset}?", 1) for p in pieces]
    value = rng.choice([" ", "\r\n ", ""]).join(words)
    if rng.random() < 0.3 and len(pieces) > 1:
        # Plain text right before the encoded words: lenient decoders decode them all the same.
        value = pieces[0] + "".join(words[1:])
    if rng.random() < 0.2:
        value = value.removesuffix("?=")  # the last word unterminated
    quoted = rng.random() < 0.7
    params = f'; filename="{value}"' if quoted else f"; filename={value}"
    return _mime_case(ctx, "rfc2047-param", name, params)


def _duplicate_param(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name, decoy = ctx.hidden(), ctx.decoy()
    form = rng.randrange(4)
    if form == 0:
        values = [f'filename="{name}"', f'filename="{decoy}"']
    elif form == 1:
        values = [f"filename={name}", f"FileName={decoy}"]
    elif form == 2:  # RFC 2231 against plain: which wins is the reader's choice
        values = [f'filename="{name}"', f"filename*=utf-8''{_pct(rng, decoy.encode())}"]
    else:
        values = [f"filename*=utf-8''{_pct(rng, name.encode())}", f'filename="{decoy}"']
    rng.shuffle(values)
    params = "".join(f"; {v}" for v in values)
    if rng.random() < 0.5:
        return _mime_case(ctx, "duplicate-param", name, params, decoy=False)
    # The same parameter in two Content-Disposition headers.
    ct = ""
    cd = f"; {values[0]}\r\nContent-Disposition: attachment; {values[1]}"
    return Case("duplicate-param", _message(ctx, ct, cd, _text(rng)), name)


def _type_vs_disposition(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name, decoy = ctx.hidden(), ctx.decoy()
    hidden_key = rng.choice(["name", "filename"])
    decoy_key = rng.choice(["name", "filename"])
    hidden_param, decoy_param = f'; {hidden_key}="{name}"', f'; {decoy_key}="{decoy}"'
    if rng.random() < 0.5:
        ct, cd = hidden_param, decoy_param
    else:
        ct, cd = decoy_param, hidden_param
    return Case("type-vs-disposition", _message(ctx, ct, cd, _text(rng)), name)


def _broken_quoting(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name = ctx.hidden()
    stem, ext = name.rsplit(".", 1)
    safe = rng.choice(SAFE_EXTENSIONS)
    forms = [
        f'; filename="{name}',  # unterminated at the end of the header
        f'; filename="{name}; size={rng.randrange(10**6)}',  # unterminated before more
        f"; filename='{name}'",  # single quotes
        f'; filename="{name};.{safe}"',  # a semicolon inside the quotes
        f'; filename={stem}".{ext}"',  # quotes inside a token
        f'; filename=""{name}""',  # doubled quotes
        f'; filename="{stem}.{ext[:-1]}\\{ext[-1]}"',  # a quoted-pair (or a path)
        f"; filename={name} ;.{safe}",  # space before the semicolon
    ]
    params = rng.choice(forms)
    if rng.random() < 0.3:  # no semicolon before the parameter
        params = " " + params[2:]
    return _mime_case(ctx, "broken-quoting", name, params)


def _folding(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name = ctx.hidden()
    fold = rng.choice(["\r\n ", "\r\n\t", "\r\n  "])
    cut = rng.randrange(1, len(name))
    folded = name[:cut] + fold + name[cut:]
    form = rng.randrange(3)
    if form == 0:
        params = f'; filename="{folded}"'
    elif form == 1:
        params = f"; filename={folded}"
    else:  # folded between encoded words, inside a word's text
        params = f'; filename="{_word(rng, name[:cut])}{fold}{name[cut:]}"'
    return _mime_case(ctx, "folding", name, params)


def _nul(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name = ctx.hidden()
    safe = ctx.decoy()
    cut = rng.randrange(1, len(name))
    form = rng.randrange(4)
    if form == 0:
        params = f'; filename="{name}\x00.{safe.rsplit(".", 1)[1]}"'  # C strings stop here
    elif form == 1:
        params = f'; filename="{name[:cut]}\x00{name[cut:]}"'  # readers that drop NULs
    elif form == 2:
        data = name.encode()
        params = f"; filename*=utf-8''{_pct(rng, data)}%00.{safe.rsplit('.', 1)[1]}"
    else:
        params = f'; filename="{_word(rng, name + chr(0) + safe)}"'
    return _mime_case(ctx, "nul", name, params)


def _utf16_no_bom(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name = ctx.hidden()
    codec = rng.choice(["utf-16-le", "utf-16-be"])
    label = rng.choice(
        ["utf-16", "UTF-16", "unicode", "utf-16le" if codec.endswith("le") else "utf-16be"]
    )
    data = name.encode(codec)
    form = rng.randrange(3)
    if form == 0:
        params = f"; filename*={label}''{_pct(rng, data)}"
    elif form == 1:
        params = f'; filename="=?{label}?B?{base64.b64encode(data).decode()}?="'
    else:  # the bytes themselves, NULs and all
        params = '; filename="' + data.decode("ascii", "surrogateescape") + '"'
    return _mime_case(ctx, "utf16-no-bom", name, params)


# -- archive members -----------------------------------------------------------------------------


def _zip_entry(
    raw_name: bytes,
    data: bytes,
    *,
    flags: int = 0,
    extra: bytes = b"",
    local_name: bytes | None = None,
) -> tuple[bytes, bytes]:
    """One stored member: (local header + data, central directory entry without offset)."""
    crc = zlib.crc32(data)
    lname = raw_name if local_name is None else local_name
    local = (
        struct.pack(
            "<4sHHHHHIIIHH",
            b"PK\x03\x04",
            20,
            flags,
            0,
            0,
            0x21,
            crc,
            len(data),
            len(data),
            len(lname),
            len(extra),
        )
        + lname
        + extra
        + data
    )
    central = struct.pack(
        "<4sHHHHHHIIIHHHHHII",
        b"PK\x01\x02", 20, 20, flags, 0, 0, 0x21, crc, len(data), len(data),
        len(raw_name), len(extra), 0, 0, 0, 0, 0,
    ) + raw_name + extra  # fmt: skip
    return local, central


def _zip(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = bytearray()
    directory = bytearray()
    for local, central in entries:
        offset = len(body)
        body += local
        patched = bytearray(central)
        struct.pack_into("<I", patched, 42, offset)
        directory += patched
    end = struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), len(body), 0
    )
    return bytes(body + directory + end)


def _unicode_path(name: str, header_name: bytes) -> bytes:
    """The Info-ZIP Unicode Path extra field (0x7075): version 1, CRC of the header name."""
    data = b"\x01" + struct.pack("<I", zlib.crc32(header_name)) + name.encode()
    return struct.pack("<HH", 0x7075, len(data)) + data


def _zip_names(ctx: _Ctx) -> Case:
    rng = ctx.rng
    name = ctx.hidden()
    decoy = ctx.decoy()
    content = _text(rng)
    form = rng.randrange(6)
    if form == 0:  # the Unicode Path extra field names the member, the header a decoy
        header = decoy.encode("cp437", "replace")
        entry = _zip_entry(header, content, extra=_unicode_path(name, header))
    elif form == 1:  # UTF-8 bytes without the UTF-8 flag (read as CP437 by the book)
        entry = _zip_entry(name.encode(), content)
    elif form == 2:  # the local header names it, the central directory a decoy
        entry = _zip_entry(decoy.encode(), content, local_name=name.encode())
    elif form == 3:  # NUL: zipfile stops there, other extractors do not
        entry = _zip_entry(f"{decoy}\x00{name}".encode(), content, flags=0x800)
    elif form == 4:  # a Windows path, trailing dots and spaces
        entry = _zip_entry(f"dir\\sub\\{name}{rng.choice(['.', ' ', '. .', ''])}".encode(), content)
    else:  # the UTF-8 flag over CP437 bytes: the decoding fails one way, reads the other
        entry = _zip_entry(name.encode("latin-1", "replace"), content, flags=0x800)
    archive = _zip([entry])
    ct = f'; name="{ctx.stem()}.zip"'
    cd = f'; filename="{ctx.stem()}.zip"'
    return Case("zip-member", _message(ctx, ct, cd, archive), name)


CLASSES: dict[str, Callable[[_Ctx], Case]] = {
    "rfc2231-continuation": _rfc2231_continuation,
    "rfc2231-charset": _rfc2231_charset,
    "rfc2231-empty-charset": _rfc2231_empty_charset,
    "rfc2047-param": _rfc2047_param,
    "duplicate-param": _duplicate_param,
    "type-vs-disposition": _type_vs_disposition,
    "broken-quoting": _broken_quoting,
    "folding": _folding,
    "nul": _nul,
    "utf16-no-bom": _utf16_no_bom,
    "zip-member": _zip_names,
}


def generate(count: int, *, seed: int, banned: bool = True) -> list[Case]:
    """``count`` cases, the classes in turn; ``banned=False``: only harmless names."""
    ctx = _Ctx(random.Random(seed), banned)
    makers = list(CLASSES.values())
    return [makers[i % len(makers)](ctx) for i in range(count)]
