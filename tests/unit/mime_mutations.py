"""Hypothesis strategies that mutate a MIME message line by line, for the parser's and the
pipeline's property tests."""

from __future__ import annotations

import base64

from hypothesis import strategies as st


class Base:
    """A message to mutate, and which of its lines are its payload's base64 body."""

    def __init__(self, raw: bytes, payload: bytes | None = None) -> None:
        self.raw = raw
        self.lines = raw.splitlines(keepends=True)
        encoded = base64.b64encode(payload) if payload is not None else b""
        self.body = frozenset(
            i for i, line in enumerate(self.lines) if line.strip() and line.strip() in encoded
        )
        if payload is not None:
            # The body must be found, and as one run of lines: the strategy keeps it whole.
            assert self.body, "payload's base64 not found in the message"
            assert self.body == set(range(min(self.body), max(self.body) + 1)), self.body


# Bytes that matter to MIME parsers, plus anything at all.
_interesting = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b"--",
        b";",
        b":",
        b'"',
        b"=",
        b" ",
        b"\t",
        b"\x00",
        b"==b0undary==",
        b"boundary=",
        b"Content-Type: ",
        b"multipart/mixed",
        b"base64",
        b"=?",
        b"?=",
    ]
)
chunk = st.one_of(_interesting, st.binary(min_size=1, max_size=8))


@st.composite
def mutated(
    draw: st.DrawFn, base: Base, *, protect_body: bool, seal_body: bool = False
) -> tuple[bytes, list[str]]:
    """``base`` after 1-6 random mutations, and their names; with ``protect_body`` the base64
    lines stay intact, whole lines (the MIME around them — headers, boundaries — changes).

    ``seal_body`` also keeps the blank line before the body, so nothing joins the body at its
    start: the payload decodes to exactly its bytes, not just contains them — for payloads
    that a prefix breaks (a program is no longer one behind a line of junk)."""
    protect_body = protect_body or seal_body
    protected = set(base.body)
    if seal_body and base.body:
        protected.add(min(base.body) - 1)
    insert_line = st.one_of(
        st.lists(chunk, min_size=1, max_size=4).map(lambda parts: b"".join(parts) + b"\r\n"),
        st.sampled_from(base.lines),
    )
    lines = [(line, i in protected) for i, line in enumerate(base.lines)]
    log: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        targets = [i for i, (_, kept) in enumerate(lines) if not (protect_body and kept)]
        op = draw(st.sampled_from(["del", "dup", "ins", "del-bytes", "ins-bytes", "case", "cut"]))
        if op == "cut":
            floor = max((i for i, (_, k) in enumerate(lines) if k), default=-1) + 1
            if protect_body and floor >= len(lines):
                continue
            at = draw(st.integers(floor if protect_body else 0, len(lines)))
            keep = lines[:at]
            if at < len(lines) and draw(st.booleans()):
                text, kept = lines[at]
                keep.append((text[: draw(st.integers(0, len(text)))], kept))
            lines = keep
        elif op == "ins":
            at = draw(st.integers(0, len(lines)))
            if protect_body and 0 < at < len(lines) and lines[at - 1][1] and lines[at][1]:
                continue  # not between two protected lines
            lines.insert(at, (draw(insert_line), False))
        elif not targets:
            continue
        else:
            i = draw(st.sampled_from(targets))
            text, kept = lines[i]
            if op == "del":
                del lines[i]
            elif op == "dup":
                lines.insert(i, (text, False))
            elif op == "case":
                lines[i] = (text.swapcase(), kept)
            else:
                # Keeping each line's own end keeps the base64 lines whole lines.
                end = len(text.rstrip(b"\r\n")) if protect_body else len(text)
                at = draw(st.integers(0, end))
                if op == "del-bytes":
                    cut = min(at + draw(st.integers(1, 12)), end)
                    lines[i] = (text[:at] + text[cut:], kept)
                else:
                    lines[i] = (text[:at] + draw(chunk) + text[at:], kept)
        log.append(op)
    return b"".join(text for text, _ in lines), log
