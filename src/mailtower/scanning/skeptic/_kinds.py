"""Rule kinds: the code behind the rules. The rule data chooses lists, regexes and thresholds.

Each kind examines one object (``check``) or the whole message (``check_message``) and yields
finding-name suffixes: ``""`` names the finding after the rule itself, anything else is appended
(``skeptic.anomaly`` + ``mime.boundary-collision``).
"""

from __future__ import annotations

import fnmatch
import html
import io
import re
import unicodedata
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator
from functools import cached_property

from mailtower.scanning.objects import Analysis, ScanObject
from mailtower.scanning.skeptic import _code, _office, _script
from mailtower.scanning.skeptic._rules import Params, RuleSpec
from mailtower.scanning.skeptic._sniff import (
    ZIP_MAGIC,
    base_name,
    extensions,
    looks_binary,
    native_kind,
    real_extension,
)

MAX_TEXT_BYTES = 8 << 20  # text beyond this is not analysed as script (mail limits are lower)
# The whole raw message is an object too; its parts are examined on their own, so the raw text
# is not read for undeclared code a second time.
_RAW_MESSAGE_PATH = "message"
SNIFFED = "sniffed"  # the origin of code recognised by its content in undeclared text


class Subject:
    """One object under examination, with what Skeptic learns about it computed once."""

    def __init__(self, obj: ScanObject, message_names: frozenset[str]) -> None:
        self.obj = obj
        self.names = sorted(obj.filenames)
        self.message_names = message_names  # every file name in the message, lower case

    @cached_property
    def native(self) -> str | None:
        return native_kind(self.obj.data)

    @cached_property
    def extensions(self) -> set[str]:
        return {real_extension(n) for n in self.names} - {""}

    @cached_property
    def binary(self) -> bool:
        return looks_binary(self.obj.data)

    @cached_property
    def text(self) -> str:
        return "" if self.binary else _script.as_text(self.obj.data, MAX_TEXT_BYTES)

    @cached_property
    def is_page(self) -> bool:
        if self.binary:
            return False
        return (
            bool(self.extensions & _script.PAGE_EXTENSIONS)
            or bool(self.obj.content_types & _script.PAGE_TYPES)
            or _script.looks_like_page(self.obj.data)
        )

    @cached_property
    def scripts(self) -> list[_script.Script]:
        found: list[_script.Script] = []
        if not self.binary:
            language = _script.script_language(self.obj.filenames, self.obj.content_types)
            if language:
                found.append(_script.Script(language, self.text, "file"))
            elif self.is_page:
                found.extend(_script.scripts_in_page(self.text))
        found.extend(
            _script.Script("vb", m.source, "macro") for m in self.all_macros if m.status == "found"
        )
        return found

    @cached_property
    def code(self) -> list[_script.Script]:
        """Every script in the object whatever its name and declared type: ``scripts``, code
        recognised in any other text (``origin="sniffed"``), and scripts hidden in encoders."""
        found = list(self.scripts)
        carriers = list(found)  # what encoded scripts are searched in
        declared = any(s.origin == "file" for s in found) or self.is_page
        if not (declared or self.binary or self.obj.path == _RAW_MESSAGE_PATH):
            language = _code.sniff(self.text)
            if language == "page":
                found.extend(_script.scripts_in_page(self.text))
                carriers = list(found)
            elif language:
                found.append(_script.Script(language, self.text, SNIFFED))
                carriers = list(found)
            elif _code.carries_encoded(self.text):
                # Not code itself (prose, a one-line command): only what it carries is read.
                carriers.append(_script.Script("text", self.text, "text"))
        unwrapped = carriers
        for _ in range(3):  # encoders nest (an encoded command inside an encoded script)
            unwrapped = [inner for script in unwrapped for inner in _code.layers(script)]
            if not unwrapped:
                break
            found.extend(unwrapped)
        return found

    @cached_property
    def canonical(self) -> list[_code.Canonical]:
        """The normalised form of every script in ``code``."""
        return [_code.canonical(script) for script in self.code]

    @cached_property
    def all_macros(self) -> list[_office.Macros]:
        """The object's own VBA and that of macro documents embedded in it as RTF objects."""
        return _office.all_macros(self.obj.data, self.rtf)

    @cached_property
    def rtf(self) -> list[_office.RtfObject]:
        return _office.rtf_objects(self.obj.data) if _office.is_rtf(self.obj.data) else []


class FileKind:
    """Base of every rule kind."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def check(self, subject: Subject) -> Iterator[str]:
        return iter(())

    def check_message(self, analysis: Analysis) -> Iterator[str]:
        return iter(())


# --- disguised executables --------------------------------------------------------------------


class ExecutableAttachment(FileKind):
    """Native code, or a name Windows would run: informational, the policy layer decides."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.executable = params.lower_set("executable")

    def check(self, subject: Subject) -> Iterator[str]:
        if subject.native or subject.extensions & self.executable:
            yield ""


class ContentMismatch(FileKind):
    """Native code under a name whose extension is not one such code is shipped as."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.allowed = {kind: params.lower_set(kind) for kind in ("pe", "elf", "macho", "lnk")}

    def check(self, subject: Subject) -> Iterator[str]:
        if subject.native and any(
            ext not in self.allowed[subject.native] for ext in subject.extensions
        ):
            yield ""


class DeclaredTypeMismatch(FileKind):
    """Native code declared as a type that is not a program (text/plain, application/pdf …)."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.allowed = params.lower_set("allowed_types")
        self.skip_prefixes = tuple(params.lower_set("skip_prefixes", []))

    def check(self, subject: Subject) -> Iterator[str]:
        if subject.native and any(
            t not in self.allowed and not t.startswith(self.skip_prefixes)
            for t in subject.obj.content_types
        ):
            yield ""


class DoubleExtension(FileKind):
    """A document-looking extension right before an executable one (invoice.pdf   .exe)."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.executable = params.lower_set("executable")
        self.decoys = params.lower_set("decoys")

    def check(self, subject: Subject) -> Iterator[str]:
        for name in subject.names:
            exts = [e for e in extensions(name) if not e.isdigit()]
            if len(exts) >= 2 and exts[-1] in self.executable and exts[-2] in self.decoys:
                yield ""
                return


_PADDING = re.compile(r"[\s\u2800\u3164\uffa0\u115f\u1160_]")


class PaddedName(FileKind):
    """A run of blanks in an executable's name, pushing the real extension out of sight."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.executable = params.lower_set("executable")
        self.min_run = params.integer("min_run")
        self.padding = re.compile(f"(?:{_PADDING.pattern}){{{self.min_run},}}")

    def check(self, subject: Subject) -> Iterator[str]:
        for name in subject.names:
            if real_extension(name) in self.executable and self.padding.search(base_name(name)):
                yield ""
                return


class NameCharacters(FileKind):
    """Invisible or direction-changing characters in a name (U+202E "exe.pdf" tricks)."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.characters = frozenset("".join(params.strings("characters")))
        self.categories = params.lower_set("categories", [])  # e.g. "cc" for control chars
        self.require_executable = params.string("require_executable", "no", ("yes", "no"))
        self.executable = params.lower_set("executable", [])

    def _hit(self, c: str) -> bool:
        return c in self.characters or unicodedata.category(c).lower() in self.categories

    def check(self, subject: Subject) -> Iterator[str]:
        for name in subject.names:
            hits = [i for i, c in enumerate(name) if self._hit(c)]
            if not hits:
                continue
            if self.require_executable == "no":
                yield ""
                return
            # What a program that drops the characters, or stops at the first one, would see.
            readings = ("".join(c for c in name if not self._hit(c)), name[: hits[0]])
            if any(real_extension(r) in self.executable for r in readings):
                yield ""
                return


class NamePattern(FileKind):
    """A file name matching one of the rule's regexes."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.patterns = params.regexes("patterns")

    def check(self, subject: Subject) -> Iterator[str]:
        if any(p.search(base_name(n).lower()) for n in subject.names for p in self.patterns):
            yield ""


# --- known-vulnerability tricks ---------------------------------------------------------------


class MediaTypeExecutable(FileKind):
    """A part declared audio/image/video that is or is named a program (Nimda, Klez)."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.prefixes = tuple(params.lower_set("type_prefixes"))
        self.executable = params.lower_set("executable")

    def check(self, subject: Subject) -> Iterator[str]:
        media = any(t.startswith(self.prefixes) for t in subject.obj.content_types)
        if media and (subject.native or subject.extensions & self.executable):
            yield ""


_ATTRIBUTE = re.compile(r"([\w:-]+)\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s>]+)")
_URL_NOISE = re.compile(r"[\x00-\x20\x7f]")


class HtmlAutorun(FileKind):
    """Frames/objects in a page that load an attachment or a local-content scheme on view."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        tags = "|".join(re.escape(t) for t in params.strings("tags"))
        self.element = re.compile(rf"<\s*(?:{tags})\b([^>]*)>", re.I)
        self.attributes = params.lower_set("attributes")
        self.schemes = tuple(params.lower_set("schemes"))

    def check(self, subject: Subject) -> Iterator[str]:
        if not subject.is_page:
            return
        for element in self.element.finditer(subject.text):
            for name, raw in _ATTRIBUTE.findall(element.group(1)):
                if name.lower() in self.attributes and self._autoruns(raw, subject):
                    yield ""
                    return

    def _autoruns(self, raw: str, subject: Subject) -> bool:
        # Browsers drop whitespace and control characters inside URLs and decode entities.
        value = _URL_NOISE.sub("", html.unescape(raw.strip("\"'"))).lower()
        if value.startswith(self.schemes):
            return True
        target = base_name(urllib.parse.unquote(value.split("?")[0]))
        return bool(target) and "://" not in value and target in subject.message_names


class Pattern(FileKind):
    """Regexes over scripts, pages or any text: ``all`` must each match, ``any`` must reach
    ``min_count`` matches in total. The general kind a tower uses for new tricks."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.scope = params.string("scope", choices=("script", "page", "text", "code"))
        self.all = params.regexes("all", [])
        self.any = params.regexes("any", [])
        self.min_count = params.integer("min_count", 1)
        if not self.all and not self.any:
            raise params.fail("needs 'all' or 'any' regexes")

    def _texts(self, subject: Subject) -> list[str]:
        if self.scope == "script":
            return [_script.lowered(s.text) for s in subject.scripts]
        if self.scope == "code":  # normalised code, wherever it was found (see _code)
            return [c.text for c in subject.canonical]
        if self.scope == "page":
            return [_script.lowered(subject.text)] if subject.is_page else []
        return [_script.lowered(subject.text)] if subject.text else []

    def check(self, subject: Subject) -> Iterator[str]:
        for text in self._texts(subject):
            if not all(p.search(text) for p in self.all):
                continue
            if self.any and _count(self.any, text, self.min_count) < self.min_count:
                continue
            yield ""
            return


def _count(patterns: list[re.Pattern[str]], text: str, enough: int) -> int:
    total = 0
    for pattern in patterns:
        for _ in pattern.finditer(text):
            total += 1
            if total >= enough:
                return total
    return total


class RtfObjectKind(FileKind):
    """RTF embedded objects: executables inside, dangerous classes, or forced auto-update."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.look_for = params.string("look_for", choices=("executable", "class", "autoupdate"))
        self.classes = params.lower_set("classes", [])
        self.executable = params.lower_set("executable", [])

    def check(self, subject: Subject) -> Iterator[str]:
        for obj in subject.rtf:
            if self._matches(obj):
                yield ""
                return

    def _matches(self, obj: _office.RtfObject) -> bool:
        if self.look_for == "executable":
            return obj.has_executable or self._package_names_program(obj)
        if self.look_for == "class":
            return any(c in self.classes for c in obj.class_names)
        return obj.auto_update

    def _package_names_program(self, obj: _office.RtfObject) -> bool:
        # An OLE Package carries its file's name and path as NUL-terminated strings.
        if "package" not in obj.class_names or not self.executable:
            return False
        for raw in re.findall(rb"[\x20-\x7e]{3,260}(?=\x00)", obj.data[:65536]):
            if real_extension(raw.decode("ascii")) in self.executable:
                return True
        return False


class VbaMacro(FileKind):
    """Office VBA: present, auto-executing with shell/download behaviour, or unanalysable."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.require = params.string(
            "require", choices=("present", "autoexec+behaviour", "behaviour", "unanalysable")
        )
        self.autoexec = params.regexes("autoexec", [])
        self.behaviour = params.regexes("behaviour", [])

    def check(self, subject: Subject) -> Iterator[str]:
        if any(self._matches(m.status, m.source) for m in subject.all_macros):
            yield ""

    def _matches(self, status: str, source: str) -> bool:
        if self.require == "unanalysable":
            return status == "unanalysable"
        if status != "found":
            return False
        if self.require == "present":
            return True
        behaviour = bool(_office.macro_keywords(source, self.behaviour))
        if self.require == "behaviour":
            return behaviour
        return behaviour and bool(_office.macro_keywords(source, self.autoexec))


class OoxmlExternal(FileKind):
    """OOXML relationships that fetch a template/object from the network when opened."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.types = tuple(params.lower_set("types"))
        self.schemes = tuple(params.lower_set("schemes"))

    def check(self, subject: Subject) -> Iterator[str]:
        if not subject.obj.data.startswith(ZIP_MAGIC):
            return
        try:
            with zipfile.ZipFile(io.BytesIO(subject.obj.data)) as archive:
                rels = [
                    i
                    for i in archive.infolist()[:5000]
                    if i.filename.endswith(".rels") and i.file_size < (4 << 20)
                ]
                for info in rels:
                    text = archive.read(info).decode("utf-8", "replace")
                    if self._external(text):
                        yield ""
                        return
        except _office.ZIP_ERRORS:  # a broken archive is the container stage's to report
            return

    def _external(self, rels: str) -> bool:
        for rel in re.findall(r"<Relationship\b[^>]*>", rels, re.I):
            attrs = {k.lower(): v.strip("\"'") for k, v in _ATTRIBUTE.findall(rel)}
            if (
                attrs.get("targetmode", "").lower() == "external"
                and attrs.get("type", "").lower().endswith(self.types)
                and html.unescape(attrs.get("target", "")).strip().lower().startswith(self.schemes)
            ):
                return True
        return False


# --- obfuscation ------------------------------------------------------------------------------


class EvalDecode(FileKind):
    """An evaluating sink (eval, Function, Execute, IEX) fed by a decoder within reach."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.sinks = params.regexes("sinks")
        self.decoders = params.regexes("decoders")
        self.window = params.integer("window")

    def check(self, subject: Subject) -> Iterator[str]:
        for script in subject.scripts:
            text = _script.lowered(script.text)
            for sink in self.sinks:
                for n, match in enumerate(sink.finditer(text)):
                    if n >= 1000:
                        break
                    if any(d.search(self._reach(text, match)) for d in self.decoders):
                        yield ""
                        return

    def _reach(self, text: str, sink: re.Match[str]) -> str:
        """What a sink evaluates: its parenthesised argument, or its line if it takes none."""
        if sink.group().rstrip().endswith("("):
            end = min(len(text), sink.end() + self.window)
            depth = 1
            for at in range(sink.end(), end):
                depth += {"(": 1, ")": -1}.get(text[at], 0)
                if depth == 0:
                    return text[sink.end() : at]
            return text[sink.end() : end]
        start = max(text.rfind("\n", 0, sink.start()) + 1, sink.start() - self.window)
        end = text.find("\n", sink.end())
        end = min(len(text) if end < 0 else end, sink.end() + self.window)
        return text[start : sink.start()] + " " + text[sink.end() : end]


class HighEntropy(FileKind):
    """Script text whose character distribution is far more random than code or prose."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.window = params.integer("window")
        self.threshold = params.number("threshold")
        self.min_windows = params.integer("min_windows")
        self.data_ratio = params.number("data_ratio")

    def check(self, subject: Subject) -> Iterator[str]:
        for script in subject.scripts:
            windows = _script.high_entropy_windows(
                script.text, self.window, self.threshold, self.data_ratio
            )
            if windows >= self.min_windows:
                yield ""
                return


class JunkIdentifiers(FileKind):
    """Many long, random-looking names: generated per copy to defeat signatures."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.min_length = params.integer("min_length")
        self.min_count = params.integer("min_count")
        self.min_ratio = params.number("min_ratio")
        self.patterns = params.regexes("patterns", [], case_sensitive=True)

    def check(self, subject: Subject) -> Iterator[str]:
        for script in subject.scripts:
            names = {t.text for t in _script.tokens(script) if t.kind == "ident"}
            candidates = [
                n
                for n in names
                if len(n) >= self.min_length or any(p.search(n) for p in self.patterns)
            ]
            junk = sum(
                _script.random_looking(n, self.min_length, self.patterns) for n in candidates
            )
            if junk >= self.min_count and junk >= self.min_ratio * len(candidates):
                yield ""
                return


_WORD = re.compile(r"[^\W\d_]{5,}")


class JunkComments(FileKind):
    """Long comments made of random letters: padding that changes every copy's hash."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.min_chars = params.integer("min_chars")
        self.min_words = params.integer("min_words")
        self.min_ratio = params.number("min_ratio")

    def check(self, subject: Subject) -> Iterator[str]:
        for script in subject.scripts:
            comments = " ".join(t.text for t in _script.tokens(script) if t.kind == "comment")
            if len(comments) < self.min_chars:
                continue
            words = _WORD.findall(comments)
            junk = sum(_script.random_looking(w, 5, []) for w in words)
            if junk >= self.min_words and junk >= self.min_ratio * len(words):
                yield ""
                return


class CodeSimilarity(FileKind):
    """Normalised code close to a known worm's (token shingles: Jaccard or containment).

    A fingerprint gives either ``tokens`` (``skeptic.fingerprint``'s output, compared with the
    plain token normalisation of declared scripts) or ``source``: a reference script kept in the
    rule data, compared in canonical form (``_code.canonical``: strings folded, junk dropped)
    with every script the object holds, declared or recognised by content.
    """

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.size = params.integer("shingle")
        self.jaccard = params.number("jaccard")
        self.containment = params.number("containment")
        self.min_shingles = params.integer("min_shingles")
        self.fingerprints: list[tuple[str, str, frozenset[str], bool]] = []
        for table in params.tables("fingerprints"):
            name, language = table.get("name"), table.get("language")
            tokens, source = table.get("tokens"), table.get("source")
            if not (isinstance(name, str) and isinstance(language, str)):
                raise params.fail("every fingerprint needs a string name and language")
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
                raise params.fail(f"fingerprint name {name!r}: lower case, digits, - and _")
            if isinstance(source, str) == isinstance(tokens, str):
                raise params.fail(f"fingerprint {name}: give either tokens or source (a string)")
            if isinstance(source, str):
                shape = _code.canonical(_script.Script(language, source, "file")).shape
                grams = _script.shingles(shape, self.size)
            else:
                grams = _script.shingles(str(tokens).split(), self.size)
            if len(grams) < self.min_shingles:
                raise params.fail(f"fingerprint {name} is too short to be specific")
            self.fingerprints.append((name, language, grams, isinstance(source, str)))

    def check(self, subject: Subject) -> Iterator[str]:
        found: set[str] = set()
        for script in subject.scripts:
            self._compare(_script.normalise(script), script.language, False, found)
        for canon in subject.canonical:
            self._compare(canon.shape, canon.language, True, found)
        yield from sorted(found)

    def _compare(self, tokens: list[str], language: str, canonical: bool, found: set[str]) -> None:
        grams = _script.shingles(tokens, self.size)
        if len(grams) < self.min_shingles:
            return
        for name, known_language, known, from_source in self.fingerprints:
            if known_language != language or from_source != canonical or name in found:
                continue
            common = len(grams & known)
            if (
                common / len(grams | known) >= self.jaccard
                or common / len(known) >= self.containment
            ):
                found.add(name)


class ScriptBehaviour(FileKind):
    """What normalised code does (``behaviours``: named ``all``/``any`` regexes over
    ``Canonical.text``), weighed by how the code was found.

    Code declared a script (by name, type or page tag), unwrapped from an encoder, or a macro:
    every behaviour is conclusive. Code only recognised by its content in some text: one
    behaviour alone is as often a how-to mail or an admin's script as a worm, so it is
    conclusive only together with ``combine`` behaviours, letters built from codes or literals
    reversed (``min_built_strings``), or padding (``min_junk_statements``). ``report`` says
    which this rule reports: ``conclusive`` (a hostile rule) or ``single`` (the rest: an
    informational one). A known family (``code-similarity``) is a rule of its own.
    """

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.report = params.string("report", choices=("conclusive", "single"))
        self.combine = params.integer("combine")
        self.min_built = params.integer("min_built_strings")
        self.min_junk = params.integer("min_junk_statements")
        self.behaviours: list[tuple[str, list[re.Pattern[str]], list[re.Pattern[str]]]] = []
        for table in params.tables("behaviours"):
            name = table.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
                raise params.fail(f"behaviour name {name!r}: lower case, digits, - and _")
            needed = params.compile(table.get("all", []), f"{name}.all")
            some = params.compile(table.get("any", []), f"{name}.any")
            if not needed and not some:
                raise params.fail(f"behaviour {name} needs 'all' or 'any' regexes")
            self.behaviours.append((name, needed, some))

    def check(self, subject: Subject) -> Iterator[str]:
        found: set[str] = set()
        for script, canon in zip(subject.code, subject.canonical, strict=True):
            hits = [
                name
                for name, needed, some in self.behaviours
                if all(p.search(canon.text) for p in needed)
                and (not some or any(p.search(canon.text) for p in some))
            ]
            if not hits:
                continue
            conclusive = (
                script.origin != SNIFFED
                or len(hits) >= self.combine
                or canon.built_strings >= self.min_built
                or canon.junk_statements >= self.min_junk
            )
            if conclusive == (self.report == "conclusive"):
                found.update(hits)
        yield from sorted(found)


# --- MIME parser anomalies --------------------------------------------------------------------


class Anomaly(FileKind):
    """Parser/container anomalies the rule data lists as hostile, passed through by name."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.hostile = params.strings("hostile")

    def check_message(self, analysis: Analysis) -> Iterator[str]:
        for anomaly in dict.fromkeys(analysis.anomalies):
            if any(fnmatch.fnmatchcase(anomaly, pattern) for pattern in self.hostile):
                yield anomaly


KINDS: dict[str, Callable[[Params], FileKind]] = {
    "executable-attachment": ExecutableAttachment,
    "content-mismatch": ContentMismatch,
    "declared-type-mismatch": DeclaredTypeMismatch,
    "double-extension": DoubleExtension,
    "padded-name": PaddedName,
    "name-characters": NameCharacters,
    "name-pattern": NamePattern,
    "media-type-executable": MediaTypeExecutable,
    "html-autorun": HtmlAutorun,
    "pattern": Pattern,
    "script-behaviour": ScriptBehaviour,
    "rtf-object": RtfObjectKind,
    "vba-macro": VbaMacro,
    "ooxml-external": OoxmlExternal,
    "eval-decode": EvalDecode,
    "high-entropy": HighEntropy,
    "junk-identifiers": JunkIdentifiers,
    "junk-comments": JunkComments,
    "code-similarity": CodeSimilarity,
    "anomaly": Anomaly,
}


def build(spec: RuleSpec) -> FileKind:
    """The kind object for a rule spec (raises RuleError for unknown kinds or bad params)."""
    factory = KINDS.get(spec.kind)
    if factory is None:
        raise Params(spec).fail(f"unknown kind (known: {', '.join(sorted(KINDS))})")
    return factory(Params(spec))
