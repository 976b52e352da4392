"""Files encoded inside text: uuencode, yEnc, and bare runs of base64 lines.

Runs of base64 lines are decoded wherever they stand (in the whole message too), so a payload
whose MIME structure around it is damaged beyond any parser's reading is still scanned.
"""

from __future__ import annotations

import re

from mailtower.scanning.mime import _anomalies as A
from mailtower.scanning.mime import _names
from mailtower.scanning.mime._collect import Collector
from mailtower.scanning.mime._transfer import decode_base64, decode_uu_lines, mixed_alphabet

VIEW_UU = "uuencode"
VIEW_YENC = "yenc"
VIEW_BASE64_BLOCK = "base64-block"

_UU_BEGIN = re.compile(rb"^begin(-base64)?[ \t]+[0-7]{1,4}[ \t]+([^\r\n]+)\r?$", re.MULTILINE)
_YENC_BEGIN = re.compile(rb"^=ybegin[ \t]([^\r\n]*)\r?$", re.MULTILINE)
_YENC_NAME = re.compile(rb"\bname=([^\r\n]*)")
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n|$)")
_YENC_ESCAPE = re.compile(rb"=(.)", re.DOTALL)
_YENC_SHIFT = bytes.maketrans(bytes(range(256)), bytes((b - 42) % 256 for b in range(256)))
_MAX_BLOCKS = 100  # per object
# A last line may be a single padded quantum ("AA==", "AAA="): without it the run decodes short
# and a base64 attachment ending so reads as a truncated (corrupt) file.
_BASE64_RUN = re.compile(
    rb"(?:^(?:[A-Za-z0-9+/]{4,}={0,2}|[A-Za-z0-9+/]{2,3}={1,2})\r?(?:\n|$))+", re.MULTILINE
)
_BINARY_SNIFF = 4096  # bytes looked at to tell binary data (not searched for base64 runs)
_MIN_RUN = 32  # characters; shorter runs are words


def _lines_after(data: bytes, pos: int) -> list[bytes]:
    return [m.group(0).rstrip(b"\r\n") for m in _LINE.finditer(data, pos) if m.group(0)]


def _names_of(raw_name: bytes) -> _names.Names:
    names = _names.Names()
    text = raw_name.decode("ascii", "surrogateescape")
    for form in _names.fix_text(text):
        stripped = _names.strip_path(form)
        if stripped:
            names.variants.add(stripped)
    return names


def _uu_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for m in _UU_BEGIN.finditer(data):
        lines = _lines_after(data, m.end())
        if m.group(1):  # begin-base64 (uuencode -m): base64 up to a "====" line
            body = b"\n".join(
                lines[: next((i for i, ln in enumerate(lines) if ln == b"===="), len(lines))]
            )
            decoded = decode_base64(body).primary
        else:
            decoded = decode_uu_lines(lines)
        if decoded:
            out.append((m.group(2), decoded))
        if len(out) >= _MAX_BLOCKS:
            break
    return out


def _yenc_decode(lines: list[bytes]) -> bytes:
    chunks = []
    for line in lines:
        if line.startswith(b"=yend"):
            break
        if line.startswith(b"=ypart"):
            continue
        chunks.append(line)
    escaped = _YENC_ESCAPE.sub(lambda m: bytes([(m.group(1)[0] - 64) % 256]), b"".join(chunks))
    return escaped.translate(_YENC_SHIFT)


def _yenc_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for m in _YENC_BEGIN.finditer(data):
        name = _YENC_NAME.search(m.group(1))
        decoded = _yenc_decode(_lines_after(data, m.end()))
        if decoded:
            out.append((name.group(1) if name else b"", decoded))
        if len(out) >= _MAX_BLOCKS:
            break
    return out


def _segments(lines: list[bytes]) -> list[list[bytes]]:
    """Encoder-shaped pieces of a run: equal-length lines, then at most one shorter line."""
    if lines and len(set(map(len, lines[:-1]))) <= 1 and len(lines[-1]) <= len(lines[0]):
        return [lines]  # one encoder's block (the usual case): the loop below agrees
    out: list[list[bytes]] = []
    for line in lines:
        seg = out[-1] if out else None
        if seg and len(line) <= len(seg[0]) and len(seg[-1]) == len(seg[0]):
            seg.append(line)
        else:
            out.append([line])
    return out


def _base64_runs(data: bytes, known: set[bytes]) -> list[bytes]:
    """Decoded runs of base64 lines in ``data``, except bodies a reader decoded already."""
    out: list[bytes] = []
    for m in _BASE64_RUN.finditer(data):
        run = m.group(0).strip()
        if len(run) < _MIN_RUN or not mixed_alphabet(run):  # padding inside is fine here
            continue
        segments = _segments(run.split())
        candidates = [] if run in known else [run]
        if len(segments) > 1:  # lines of another length stuck to an encoder's block
            candidates += [b"\n".join(seg) for seg in segments]
        for cand in dict.fromkeys(candidates):
            decoded = decode_base64(cand).primary
            if decoded:
                out.append(decoded)
        if len(out) >= _MAX_BLOCKS:
            break
    return out


# Encoded blocks inside a body: (marker that must occur, decoder, anomaly, view, path suffix).
_BLOCK_KINDS = (
    (b"begin", _uu_blocks, A.UUENCODE, VIEW_UU, "uu"),
    (b"=ybegin", _yenc_blocks, A.YENC, VIEW_YENC, "yenc"),
)


def extract(col: Collector) -> None:
    """Decode the encoded blocks in every object so far, and in what they yield, as objects."""
    known = col.decoded_bodies()
    entries = list(col.entries.values())
    index = 0
    while index < len(entries):
        entry = entries[index]
        index += 1
        col.budget.check_time()
        if entry.level >= col.budget.limits.max_depth:
            continue
        data = entry.data
        for marker, blocks, anomaly, view, suffix in _BLOCK_KINDS:
            if marker not in data:
                continue
            for n, (name, decoded) in enumerate(blocks(data)):
                col.anomaly(anomaly)
                col.add(
                    decoded,
                    path=f"{entry.path}/{suffix}{n}",
                    view=view,
                    content_types=["application/octet-stream"],
                    names=_names_of(name),
                    level=entry.level + 1,
                )
        if b"\n" in data and (entry.path == "message" or b"\x00" not in data[:_BINARY_SNIFF]):
            for n, decoded in enumerate(_base64_runs(data, known)):
                col.add(
                    decoded,
                    path=f"{entry.path}/b64-{n}",
                    view=VIEW_BASE64_BLOCK,
                    level=entry.level + 1,
                )
        if len(col.entries) != len(entries):
            entries = list(col.entries.values())
