"""The readings of Python's ``email`` package, under its modern and its compat32 policy.

Both readings usually build the same tree: the parser cuts a message the same way under either
policy unless a part's content type or boundary reads differently. :class:`SharedParse` then
parses the message once and serves that tree to both readings (most of their cost is the
parser walking every line of the encoded bodies); otherwise each reading parses for itself.
"""

from __future__ import annotations

import functools
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import Policy, compat32, default

from mailtower.scanning.mime import _anomalies as A
from mailtower.scanning.mime._collect import Collector
from mailtower.scanning.mime._names import main_value
from mailtower.scanning.mime._transfer import BASE64, QUOTED_PRINTABLE, classify_cte

# Header values remembered by the default policy's factory: enough for the messages being
# read at once (a few content headers each); longer values are parsed every time.
_MEMO_ENTRIES = 512
_MEMO_MAX_CHARS = 1000


class _CachedHeaderClasses(HeaderRegistry):
    """The default policy's header factory, minus its cost. The stock one builds a new class
    (``type(...)``) for every header it parses, the same one each time for a kind of header,
    and the policy parses a header again on every access (a reading asks for a part's
    Content-Type half a dozen times). This builds each class once — keyed by the specialised
    class, so hostile header names cannot grow it — and remembers the last parsed values
    (header objects are immutable strings; nothing in a reading changes them)."""

    def __init__(self) -> None:
        super().__init__()
        self._built: dict[type, type[BaseHeader]] = {}
        self._memo = functools.lru_cache(maxsize=_MEMO_ENTRIES)(super().__call__)

    def __call__(self, name: str, value: str) -> BaseHeader:
        if len(value) > _MEMO_MAX_CHARS:
            return super().__call__(name, value)
        header: BaseHeader = self._memo(name, value)
        return header

    def __getitem__(self, name: str) -> type[BaseHeader]:
        cls = self.registry.get(name.lower(), self.default_class)
        built = self._built.get(cls)
        if built is None:
            built = self._built[cls] = super().__getitem__(name)
        return built


_DEFAULT = default.clone(header_factory=_CachedHeaderClasses())
POLICIES: dict[str, Policy] = {"email-default": _DEFAULT, "email-compat32": compat32}


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


# What each policy's parser builds its parts as (policy.message_factory; compat32 has none).
_CLASSES: dict[str, type[Message]] = {"email-default": EmailMessage, "email-compat32": Message}


def _parts(msg: Message) -> list[Message]:
    """Every part of the tree, message/* children included (iteratively: nesting can be deep)."""
    out: list[Message] = []
    stack = [msg]
    while stack:
        part = stack.pop()
        out.append(part)
        if part.is_multipart():  # message/* parts too: their payload is the enclosed message
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(c for c in payload if isinstance(c, Message))
    return out


def _decisions(part: Message) -> tuple[object, ...]:
    """What the parser decides a part's structure by (email.feedparser calls exactly these:
    get_content_type, get_content_maintype, get_boundary; the rest of its work — header lines
    through header_source_parse, which both policies implement alike — is policy-free)."""
    return (part.get_content_type(), part.get_content_maintype(), part.get_boundary())


def _same_structure(parts: list[Message]) -> bool:
    """Whether the parser under the other policy would have built the same tree.

    By induction from the root: equal header lists and default types (both policies store
    header lines alike) plus equal decisions give equal children. A decision that raises under
    either policy counts as a difference (that reading then parses, and fails, on its own).
    """
    try:
        for part in parts:
            part.policy = compat32
            mine = _decisions(part)
            part.policy = POLICIES["email-default"]
            if _decisions(part) != mine:
                return False
        return True
    except Exception:
        return False
    finally:
        for part in parts:
            part.policy = compat32


class SharedParse:
    """One message's parse under compat32, lent to the default reading too when provably the
    same tree (see the module doc). One per message; the readings use it one after the other."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._tree: Message | None = None
        self._parts: list[Message] = []
        self._same: bool | None = None  # None: not parsed yet (or the parse failed)
        self._decoded: dict[tuple[Message, str], object] = {}

    def tree(self, view: str) -> Message:
        """The tree ``view``'s own parser would build (raises as that parser would)."""
        if self._same is None:
            try:
                self._tree = BytesParser(policy=compat32).parsebytes(self.raw)
                self._parts = _parts(self._tree)
                self._same = _same_structure(self._parts)
            except Exception:
                self._tree, self._same = None, False
        if self._tree is None or (view != "email-compat32" and not self._same):
            return BytesParser(policy=POLICIES[view]).parsebytes(self.raw)
        cls, policy = _CLASSES[view], POLICIES[view]
        for part in self._parts:
            # The same attributes either way (EmailMessage only adds methods): the tree as
            # that policy's parser builds it.
            part.__class__ = cls
            part.policy = policy
        return self._tree

    def decoded(self, part: Message) -> object:
        """``part.get_payload(decode=True)``, decoded once for both readings of a shared tree.

        For a leaf it depends on nothing but the payload and the Content-Transfer-Encoding
        header as the policy reads it (email.message.Message.get_payload), so it is kept per
        part and per that reading of the header.
        """
        if not self._same:  # the readings do not share the parts: nothing to share
            return part.get_payload(decode=True)
        key = (part, str(part.get("content-transfer-encoding", "")).lower())
        if key not in self._decoded:
            self._decoded[key] = part.get_payload(decode=True)
        return self._decoded[key]


def read(
    view: str,
    raw: bytes,
    col: Collector,
    *,
    prefix: str,
    depth: int,
    shared: SharedParse | None = None,
) -> None:
    """Parse ``raw`` with the policy named by ``view`` and record every leaf part it yields.
    ``shared``: a parse of ``raw`` the other email reading may have made already."""
    if shared is None:
        msg = BytesParser(policy=POLICIES[view]).parsebytes(raw)
    else:
        msg = shared.tree(view)
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
        data = part.get_payload(decode=True) if shared is None else shared.decoded(part)
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
