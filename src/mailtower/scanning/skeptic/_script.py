"""Scripts as Skeptic sees them: where they hide, their tokens, and measures of obfuscation.

Languages are families, not grammars: "js" (JavaScript/JScript), "vb" (VBScript/VBA),
"ps" (PowerShell) and "bat" (cmd). The lexers only need to tell comments, strings,
identifiers and the rest apart well enough to measure and normalise code.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from mailtower.scanning.skeptic._sniff import decode_text, real_extension


@dataclass(frozen=True)
class Script:
    """One piece of executable text found in an object."""

    language: str  # "js" | "vb" | "ps" | "bat"
    text: str
    origin: str  # "file" (a script attachment), "html" (inside a page), "macro" (Office VBA),
    # "sniffed" (recognised by its content), "encoded" (unwrapped from an encoder)


SCRIPT_EXTENSIONS = {
    "js": "js",
    "jse": "js",
    "mjs": "js",
    "vbs": "vb",
    "vbe": "vb",
    "vba": "vb",
    "bas": "vb",
    "ps1": "ps",
    "psm1": "ps",
    "psd1": "ps",
    "bat": "bat",
    "cmd": "bat",
}
SCRIPT_TYPES = {
    "application/javascript": "js",
    "text/javascript": "js",
    "application/x-javascript": "js",
    "application/ecmascript": "js",
    "text/ecmascript": "js",
    "text/jscript": "js",
    "text/vbscript": "vb",
    "application/x-vbscript": "vb",
    "text/vbs": "vb",
    "application/x-powershell": "ps",
    "application/x-bat": "bat",
    "application/x-msdos-batch": "bat",
}
# Pages whose <script> elements run: HTML, HTA, Windows Script Files and components, SVG.
PAGE_EXTENSIONS = frozenset(
    {"htm", "html", "shtml", "xht", "xhtml", "hta", "mht", "mhtml", "svg", "wsf", "wsc", "sct"}
)
PAGE_TYPES = frozenset(
    {"text/html", "application/xhtml+xml", "application/hta", "image/svg+xml", "text/x-scriptlet"}
)

_SCRIPT_ELEMENT = re.compile(r"<script\b([^>]*)>(.*?)(?:</script\s*>|\Z)", re.I | re.S)
_LANGUAGE_ATTR = re.compile(r"\b(?:language|type)\s*=\s*[\"']?\s*([\w/.+-]+)", re.I)
_EVENT_HANDLER = re.compile(r"\son[a-z]+\s*=\s*(?:\"([^\"]*)\"|'([^']*)')", re.I)
_SCRIPT_URL = re.compile(
    r"\b(?:href|src|action|formaction|data)\s*=\s*[\"']?\s*(javascript|vbscript)\s*:([^\"'>]*)",
    re.I,
)
_PAGE_SNIFF = re.compile(
    rb"^\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body|script|iframe|object|svg|hta:|job|package|scriptlet|component)\b",
    re.I | re.S,
)


def page_language(attrs: str) -> str | None:
    """The language of a <script> element from its attributes; None if it is not code."""
    match = _LANGUAGE_ATTR.search(attrs)
    if not match:
        return "js"
    value = match.group(1).lower()
    if "vbs" in value or "vbscript" in value:
        return "vb"
    if any(word in value for word in ("javascript", "jscript", "ecmascript", "module")):
        return "js"
    # JSON-LD, templates and other data blocks never run.
    return None


def looks_like_page(data: bytes) -> bool:
    """Whether undeclared bytes open like a page a browser or mshta would render."""
    return bool(_PAGE_SNIFF.match(data[:2048]))


def scripts_in_page(text: str) -> Iterator[Script]:
    """Every script a page runs: <script> elements, event handlers, javascript: URLs."""
    for match in _SCRIPT_ELEMENT.finditer(text):
        language = page_language(match.group(1))
        body = match.group(2).strip()
        if language and body:
            yield Script(language, body, "html")
    inline: dict[str, list[str]] = {"js": [], "vb": []}
    for match in _EVENT_HANDLER.finditer(text):
        inline["js"].append(html.unescape(match.group(1) or match.group(2) or ""))
    for match in _SCRIPT_URL.finditer(text):
        language = "vb" if match.group(1).lower() == "vbscript" else "js"
        inline[language].append(html.unescape(match.group(2)))
    for language, snippets in inline.items():
        joined = ";\n".join(s for s in snippets if s.strip())
        if joined:
            yield Script(language, joined, "html")


def script_language(names: frozenset[str], types: frozenset[str]) -> str | None:
    """The language of a script file from its names or declared types, if it is one."""
    for name in sorted(names):
        language = SCRIPT_EXTENSIONS.get(real_extension(name))
        if language:
            return language
    for content_type in sorted(types):
        if content_type in SCRIPT_TYPES:
            return SCRIPT_TYPES[content_type]
    return None


def as_text(data: bytes, limit: int) -> str:
    """The first ``limit`` bytes of ``data`` as text."""
    return decode_text(data[:limit])


# --- lexing -----------------------------------------------------------------------------------

_LEXERS = {
    "js": re.compile(
        r"(?P<comment>//[^\n]*|/\*.*?(?:\*/|\Z)|<!--|-->)"
        r"|(?P<string>\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`)"
        r"|(?P<ident>[A-Za-z_$][\w$]*)"
        r"|(?P<number>\d[\w.]*)"
        r"|(?P<punct>\S)",
        re.S,
    ),
    "vb": re.compile(
        r"(?P<comment>'[^\n]*|(?<![\w.])rem\b[^\n]*)"
        r"|(?P<string>\"(?:[^\"\n]|\"\")*\")"
        r"|(?P<ident>[A-Za-z_]\w*)"
        r"|(?P<number>&h[0-9a-f]+|\d[\w.]*)"
        r"|(?P<punct>\S)",
        re.I,
    ),
    "ps": re.compile(
        r"(?P<comment><\#.*?(?:\#>|\Z)|\#[^\n]*)"
        r"|(?P<string>\"(?:[^\"`]|`.)*\"|'(?:[^']|'')*')"
        r"|(?P<ident>\$?[A-Za-z_]\w*(?:-[A-Za-z]\w*)*)"
        r"|(?P<number>0x[0-9a-f]+|\d[\w.]*)"
        r"|(?P<punct>\S)",
        re.S | re.I,
    ),
    "bat": re.compile(
        r"(?P<comment>(?:^|(?<=\n))[ \t@]*(?:rem\b|::)[^\n]*)"
        r"|(?P<string>\"[^\"\n]*\")"
        r"|(?P<ident>%?[A-Za-z_][\w]*%?)"
        r"|(?P<number>\d[\w.]*)"
        r"|(?P<punct>\S)",
        re.I,
    ),
}


MAX_TOKEN_CHARS = 2 << 20


@dataclass(frozen=True)
class Token:
    kind: str  # "comment" | "string" | "ident" | "number" | "punct"
    text: str


@lru_cache(maxsize=64)
def lowered(text: str) -> str:
    """``text`` in lower case, computed once for all the rules that match against it."""
    return text.lower()


@lru_cache(maxsize=16)
def tokens(script: Script) -> tuple[Token, ...]:
    """The tokens of a script (comments included), computed once for all rules."""
    lexer = _LEXERS.get(script.language, _LEXERS["js"])
    out = []
    # Token rules (names, comments, similarity) read the first MAX_TOKEN_CHARS; the regex
    # rules read the whole script. Bounds the cost of a multi-megabyte bundle.
    for match in lexer.finditer(script.text, 0, MAX_TOKEN_CHARS):
        kind = match.lastgroup or "punct"
        out.append(Token(kind, match.group()))
    return tuple(out)


# Words of the languages and of their runtime that carry meaning in every copy of a worm;
# everything else a script names is the author's choice and becomes a placeholder.
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_KEEP = {
    "js": _words(
        """break case catch class const continue debugger default delete do else export extends
        false finally for function if import in instanceof let new null return super switch this
        throw true try typeof var void while with yield await async of undefined nan infinity
        window document activexobject wscript getobject string math array object date regexp
        eval unescape escape parseint parsefloat settimeout setinterval"""
    ),
    "vb": _words(
        """and as byref byval call case class const dim do each else elseif end erase error
        exit explicit false for function get goto if in is let loop me mod new next not nothing
        on option or preserve private property public redim resume select set step sub then to
        true until wend while with xor createobject getobject wscript chr chrw asc mid left
        right len instr replace split join execute executeglobal eval msgbox inputbox lcase ucase
        trim cstr cint clng now rnd randomize array ubound lbound isnull isempty"""
    ),
    "ps": _words(
        """begin break catch class continue data do dynamicparam else elseif end exit filter
        finally for foreach from function if in param process return switch throw trap try
        until using while new-object invoke-expression iex invoke-webrequest start-process
        set-content out-file"""
    ),
    "bat": _words(
        """echo set if else for do in goto call start exit not exist errorlevel defined cmd
        copy del move type"""
    ),
}


def normalise(script: Script) -> list[str]:
    """Tokens with comments and layout gone, case folded, strings/numbers/names as placeholders.

    Member names after a dot are kept (``.addressentries`` is what a mass mailer does); names
    the author chose become ``v`` so renaming variables changes nothing.
    """
    keep = _KEEP.get(script.language, _KEEP["js"])
    out: list[str] = []
    for token in tokens(script):
        if token.kind == "comment":
            continue
        if token.kind == "string":
            out.append("s")
        elif token.kind == "number":
            out.append("n")
        elif token.kind == "ident":
            word = token.text.lower()
            out.append(word if word in keep or (out and out[-1] == ".") else "v")
        else:
            out.append(token.text.lower())
    return out


def shingles(normalised: list[str], size: int) -> frozenset[str]:
    """The set of ``size``-token runs of a normalised token list."""
    if len(normalised) < size:
        return frozenset([" ".join(normalised)]) if normalised else frozenset()
    return frozenset(" ".join(normalised[i : i + size]) for i in range(len(normalised) - size + 1))


# --- measures ---------------------------------------------------------------------------------


def entropy(text: str) -> float:
    """Shannon entropy of ``text`` in bits per character."""
    if not text:
        return 0.0
    total = len(text)
    return -sum(n / total * math.log2(n / total) for n in Counter(text).values())


_BASE64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_"
_DROP_BASE64 = str.maketrans("", "", _BASE64_CHARS)


def high_entropy_windows(text: str, window: int, threshold: float, data_ratio: float) -> int:
    """How many half-overlapping windows of ``text`` exceed ``threshold`` bits per character.

    Windows that are almost all base64 alphabet are embedded data (fonts, images), not code,
    and are skipped: their entropy is high by construction and says nothing about obfuscation.
    """
    step = max(1, window // 2)
    count = 0
    for start in range(0, max(1, len(text) - window + 1), step):
        chunk = text[start : start + window]
        if len(chunk) < window:
            break
        if window - len(chunk.translate(_DROP_BASE64)) >= data_ratio * window:
            continue
        if entropy(chunk) > threshold:
            count += 1
    return count


_VOWELS = frozenset("aeiouy")
_CHUNKS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


def _random_chunk(chunk: str, min_chunk: int) -> bool:
    letters = chunk.lower()
    if len(letters) < min_chunk or not letters.isalpha():
        return False
    # All-capital chunks are acronyms (XMLHTTP, HTTPS) unless they are very long.
    if chunk.isupper() and len(chunk) < 10:
        return False
    vowels = sum(c in _VOWELS for c in letters)
    run = longest = 0
    for c in letters:
        run = 0 if c in _VOWELS else run + 1
        longest = max(longest, run)
    return vowels / len(letters) < 0.2 or longest >= 5


def random_looking(word: str, min_length: int, patterns: list[re.Pattern[str]]) -> bool:
    """Whether an identifier or comment word looks machine-made rather than named by a person.

    Words are split at case changes, digits and underscores ("getElementsByTagName" →
    get/Elements/By/Tag/Name) and each part is judged on vowels and consonant runs; names with
    chaotic case or digits sprinkled through them are random too.
    """
    bare = word.lstrip("$_").rstrip("%")
    if any(p.search(word) for p in patterns):
        return True
    if len(bare) < min_length:
        return False
    chunks = _CHUNKS.findall(bare)
    if not chunks:
        return False
    letters = [c for c in chunks if c.isalpha()]
    # Chaotic case ("xKqZvTbn") splits into many tiny chunks; camelCase does not.
    if letters and len(bare) >= 8 and sum(map(len, letters)) / len(letters) < 2.6:
        return True
    if sum(1 for a, b in zip(bare, bare[1:], strict=False) if a.isdigit() != b.isdigit()) >= 4:
        return True
    return any(_random_chunk(c, 5) for c in chunks)
