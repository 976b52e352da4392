"""The readings of Python's ``email`` package, under its modern and its compat32 policy."""

from __future__ import annotations

from email.message import Message
from email.parser import BytesParser
from email.policy import Policy, compat32, default

from mailtower.mime import _anomalies as A
from mailtower.mime._collect import Collector
from mailtower.mime._names import main_value
from mailtower.mime._transfer import BASE64, QUOTED_PRINTABLE, classify_cte

POLICIES: dict[str, Policy] = {"email-default": default, "email-compat32": compat32}


def _raw_headers(part: Message) -> list[tuple[str, str]]:
    return [(k.strip().lower(), str(v)) for k, v in part.raw_items()]


def _payload_bytes(part: Message) -> bytes:
    payload = part.get_payload()
    if isinstance(payload, bytes):
        return payload
    if not isinstance(payload, str):
        return b""
    try:
        return payload.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return payload.encode("raw-unicode-escape")


def _child_path(path: str, index: int) -> str:
    return f"{path}.{index}" if path else str(index)


def read(view: str, raw: bytes, col: Collector, *, prefix: str, depth: int) -> None:
    """Parse ``raw`` with the policy named by ``view`` and record every leaf part it yields."""
    msg = BytesParser(policy=POLICIES[view]).parsebytes(raw)
    # (part, path, depth, is_root): explicit stack, since hostile nesting can be deep
    stack: list[tuple[Message, str, int, bool]] = [(msg, prefix, depth, True)]
    count = 0
    while stack:
        part, path, level, is_root = stack.pop()
        count += 1
        col.budget.check_parts(count)
        col.budget.check_depth(level)
        headers = _raw_headers(part)
        ctype = part.get_content_type()
        if ctype == "message/partial":
            col.anomaly(A.MESSAGE_PARTIAL)
        if part.is_multipart():
            payload = part.get_payload()
            if not isinstance(payload, list):
                continue
            children = [c for c in payload if isinstance(c, Message)]
            if part.get_content_maintype() == "message":
                if ctype == "message/delivery-status":
                    continue  # header blocks, not content; the whole message carries them
                ctes = [v for k, v in headers if k == "content-transfer-encoding"]
                kind = classify_cte(ctes[0] if ctes else None)[0]
                if kind in (BASE64, QUOTED_PRINTABLE):
                    # Encoded message/rfc822 (forbidden, yet sent): Python parses the encoded
                    # text as a message; clients decode it first, so do that and read it again.
                    inner = col.decode(_payload_bytes_of_message(part), ctes[0]).primary
                    col.add(inner, path=path, view=view, content_types=[ctype])
                    col.embed(inner, path, level + 1)
                    continue
                stack.extend((c, path, level + 1, True) for c in reversed(children))
            else:
                stack.extend(
                    (c, _child_path(path, i), level + 1, False)
                    for i, c in reversed(list(enumerate(children, 1)))
                )
            continue
        leaf_path = _child_path(path, 1) if is_root else path
        if main_value(ctype).startswith("multipart/"):
            col.outside(view=view, path=leaf_path, body=_payload_bytes(part))
            continue
        data = part.get_payload(decode=True)
        try:
            extra = [part.get_filename() or ""]
        except Exception:  # a policy bug on a hostile parameter must not end this reading
            extra = []
        col.leaf(
            view=view,
            path=leaf_path,
            headers=headers,
            body=_payload_bytes(part),
            reader_data=data if isinstance(data, bytes) else b"",
            content_type=ctype,
            extra_names=extra,
        )


def _payload_bytes_of_message(part: Message) -> bytes:
    """The body of a message/* part as it stood in the source (Python parsed it as a message)."""
    children = part.get_payload()
    if isinstance(children, list) and children and isinstance(children[0], Message):
        return children[0].as_bytes(policy=compat32)
    return _payload_bytes(part)
