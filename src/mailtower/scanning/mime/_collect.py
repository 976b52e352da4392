"""The union of what the readings yield: objects merged by content, and the anomalies.

Objects are keyed by their bytes themselves: a dict compares equal contents exactly, and a
bytes object computes its hash once (the readings hand in the same part several times), where
a SHA-256 of every handed-in copy cost about a millisecond per message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mailtower.scanning.mime import _anomalies as A
from mailtower.scanning.mime import _names
from mailtower.scanning.mime._limits import Budget
from mailtower.scanning.mime._transfer import Decoded, decode_base64, decode_body, looks_like_base64
from mailtower.scanning.objects import Analysis, ScanObject
from mailtower.scanning.risk import (
    names_disagree_about_risk,
    risky_content,
    risky_name,
    risky_type,
)

# The readings that rebuild the message's structure; their object sets must agree.
STRUCTURAL_VIEWS = ("email-default", "email-compat32", "raw-boundary")


@dataclass
class _Entry:
    data: bytes
    path: str
    filenames: set[str] = field(default_factory=set)
    content_types: set[str] = field(default_factory=set)
    views: set[str] = field(default_factory=set)
    level: int = 0  # how many encoded blocks (uuencode in a text part …) deep


class Collector:
    """Gathers objects and anomalies from all readings of one message."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.entries: dict[bytes, _Entry] = {}
        self.anomalies: dict[str, None] = {}
        self.failed: set[str] = set()
        self.limit_hit = False
        # per structural view: the parts it reads as the message's own parts (their contents)
        self.compared: dict[str, set[bytes]] = {v: set() for v in STRUCTURAL_VIEWS}
        # per view, per object: the names its parts carry (for mime.filename-mismatch)
        self.names: dict[str, dict[bytes, set[str]]] = {}
        self._decode_cache: dict[tuple[str | None, bytes], Decoded] = {}
        self.embedded: list[tuple[bytes, str, int]] = []  # messages to read again, whole

    def anomaly(self, name: str) -> None:
        self.anomalies.setdefault(name, None)

    def add(
        self,
        data: bytes,
        *,
        path: str,
        view: str,
        content_types: Iterable[str] = (),
        names: _names.Names | None = None,
        compare: bool = False,
        level: int = 0,
        check: bool = True,
    ) -> None:
        """Record one decoded object as seen by ``view`` (``check=False``: whatever the limits)."""
        if check:
            self.budget.check_time()
            if not data:
                return  # empty parts carry nothing to scan (the whole message is kept even so)
        digest = data  # the key (see the module doc)
        entry = self.entries.get(digest)
        if entry is None:
            entry = self.entries[digest] = _Entry(data, path, level=level)
            self.budget.add_bytes(len(data), check=check)
        entry.views.add(view)
        entry.content_types.update(ct for ct in content_types if ct)
        if names is not None:
            entry.filenames |= names.variants
            if names.primary:
                self.names.setdefault(view, {}).setdefault(digest, set()).update(names.primary)
        if compare and view in self.compared:
            self.compared[view].add(digest)

    def decode(self, body: bytes, cte: str | None) -> Decoded:
        key = (cte, body)
        if key not in self._decode_cache:
            self._decode_cache[key] = decode_body(body, cte)
        return self._decode_cache[key]

    def decoded_bodies(self) -> set[bytes]:
        """The encoded bodies the readers decoded already (stripped)."""
        return {body.strip() for _cte, body in self._decode_cache}

    def leaf(
        self,
        *,
        view: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        reader_data: bytes | None = None,
        content_type: str | None = None,
        extra_names: Iterable[str] = (),
    ) -> None:
        """Record a leaf part: every decoding of its body under every CTE it declares.

        ``reader_data`` is the reader's own decoding (compared across readings); without it the
        lenient decoding under the first CTE stands for the reader.
        """
        ct_values = [v for k, v in headers if k == "content-type"]
        cd_values = [v for k, v in headers if k == "content-disposition"]
        cte_values = [v for k, v in headers if k == "content-transfer-encoding"]
        for values in (ct_values, cd_values, cte_values):
            if len({_names.unfold(v).strip().lower() for v in values}) > 1:
                self.anomaly(A.DUPLICATE_HEADER)
        types = {_names.main_value(v) for v in ct_values}
        if content_type:
            types.add(content_type)
        names = _names.from_headers(ct_values + cd_values)
        for extra in extra_names:
            if extra:
                names.variants.add(_names.strip_path(extra))
                names.primary.add(_names.canonical(extra))
        names.primary.discard("")
        if names.ambiguous():
            self.anomaly(A.FILENAME_AMBIGUOUS)
        ctes: list[str | None] = list(dict.fromkeys(cte_values)) or [None]
        decodings = [self.decode(body, cte) for cte in ctes]
        if reader_data is not None:
            self.add(
                reader_data, path=path, view=view, content_types=types, names=names, compare=True
            )
        for index, decoded in enumerate(decodings):
            for name in decoded.anomalies:
                self.anomaly(name)
            if A.BASE64_JUNK in decoded.anomalies and (
                _risky_label(names.primary | names.variants, types)
                or any(risky_content(d) for d in (decoded.primary, *decoded.alternatives))
            ):
                # Decoders part ways on this body, and what one of them gets may run.
                self.anomaly(A.risky(A.BASE64_JUNK))
            self.add(
                decoded.primary,
                path=path,
                view=view,
                content_types=types,
                names=names,
                compare=reader_data is None and index == 0,
            )
            for alt in decoded.alternatives:
                self.add(alt, path=path, view=view, content_types=types, names=names)
        if len(names.primary) > 1 and not _same_names(names.primary):
            self.anomaly(A.FILENAME_MISMATCH)
            if names_disagree_about_risk(names.primary):
                self.anomaly(A.risky(A.FILENAME_MISMATCH))

    def outside(self, *, view: str, path: str, body: bytes) -> None:
        """Text outside any part (preamble, epilogue): decoded when it is base64 in disguise."""
        if looks_like_base64(body):
            self.anomaly(A.DATA_OUTSIDE_PARTS)
            self.add(decode_base64(body).primary, path=path, view=view)

    def embed(self, data: bytes, path: str, depth: int) -> None:
        """A message inside the message (encoded message/rfc822): all readings run on it."""
        self.embedded.append((data, path, depth))

    def finish(self) -> Analysis:
        if not self.limit_hit:
            sets = [s for v, s in self.compared.items() if v not in self.failed]
            if any(s != sets[0] for s in sets[1:]):
                self.anomaly(A.VIEWS_DISAGREE)
                # What some readings see and others do not: risky content makes it hostile.
                if any(
                    self._risky(d) for d in set().union(*sets) - sets[0].intersection(*sets[1:])
                ):
                    self.anomaly(A.risky(A.VIEWS_DISAGREE))
            self._check_names()
        objects = [
            ScanObject(
                data=e.data,
                path=e.path,
                filenames=frozenset(e.filenames),
                content_types=frozenset(e.content_types),
                views=frozenset(e.views),
            )
            for e in self.entries.values()
        ]
        return Analysis(objects=objects, anomalies=list(self.anomalies))

    def _risky(self, digest: bytes) -> bool:
        """Whether an object is risky by its content, a name or a declared type."""
        entry = self.entries.get(digest)
        if entry is None:
            return risky_content(digest) is not None
        return _risky_label(entry.filenames, entry.content_types) or (
            risky_content(entry.data) is not None
        )

    def _check_names(self) -> None:
        digests = {d for per_view in self.names.values() for d in per_view}
        for digest in digests:
            seen = [per_view[digest] for per_view in self.names.values() if digest in per_view]
            union: set[str] = set().union(*seen)
            if any(s != seen[0] for s in seen[1:]) and not _same_names(union):
                self.anomaly(A.FILENAME_MISMATCH)
                if names_disagree_about_risk(union):
                    self.anomaly(A.risky(A.FILENAME_MISMATCH))
                    return


def _risky_label(names: Iterable[str], types: Iterable[str]) -> bool:
    """Whether a file name or a declared type says the object is risky."""
    return any(risky_name(n) for n in names) or any(risky_type(t) for t in types)


def _same_names(names: set[str]) -> bool:
    """Whether ``names`` are one name; names with undecodable bytes compare by their ASCII."""
    if len(names) <= 1:
        return True
    if any("\ufffd" in n for n in names):
        return len({n.encode("ascii", "ignore") for n in names}) == 1
    return False
