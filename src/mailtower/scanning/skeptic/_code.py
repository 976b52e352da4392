"""Script code wherever it hides, read for what it does: recognised in any text, unwrapped
from encoders, and normalised so renaming, padding and string building change nothing.

- ``sniff(text)`` — the language of undeclared code (a ``.txt`` that is a VBScript), by token
  statistics behind a cheap gate: text without a single scripting-host word costs one regex
  search and nothing else.
- ``layers(script)`` — scripts hidden inside a script: Microsoft Script Encoder blobs
  (``#@~^…^#~@``, JScript.Encode and VBScript.Encode) and PowerShell ``-EncodedCommand``
  (base64 of UTF-16LE).
- ``canonical(script)`` — the normalised code: comments and line layout gone, strings folded
  (``Chr(n) & …``, ``String.fromCharCode``, ``"a" + "b"``, ``Replace``, ``StrReverse``,
  ``split('').reverse().join('')``, single-assignment string variables), junk statements that
  assign names nothing reads dropped, keywords lower case, the author's names ``v1``, ``v2`` …
  by first use. ``Canonical.text`` is what behaviour rules read; ``Canonical.shape`` is the
  token list similarity rules shingle (strings that are not API names become ``s``).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from functools import lru_cache

from mailtower.scanning.skeptic import _script
from mailtower.scanning.skeptic._script import _KEEP, _LEXERS, Script

MAX_CODE_CHARS = 512 << 10  # canonicalised code per script; a worm is a few kilobytes
ENCODED = "encoded"  # the origin of a script unwrapped from an encoder (see ``layers``)
MAX_SNIFF_CHARS = 256 << 10
_MAX_PASSES = 8

# --- recognising undeclared code -------------------------------------------------------------

# Words no script that talks to Windows can do without, and the wrappers that hide them. Prose,
# CSV, JSON, logs and most source code people mail each other contain none of them, so for them
# recognition ends with these substring searches of the lower-cased text (the same lower-cased
# text the pattern rules read, computed once): ~10 µs for a typical part, where one regex with
# alternatives costs a millisecond.
_GATE = (
    "createobject", "activexobject", "getobject", "wscript", "execute(", "executeglobal",
    "eval(", "new-object", "powershell", "invoke-", "iex ", "iex(", "#@~^", "<script", "<hta:",
    "@echo", "cmd /c", "cmd.exe", "fromcharcode", "chr(", "chrw(", "start-process",
    "frombase64string", "downloadstring", "downloadfile", "regwrite", "xmlhttp", "winhttp",
)  # fmt: skip
_MARKERS = {
    "vb": re.compile(
        r"^[ \t]*(?:dim|set|sub|function|end[ \t]+(?:sub|function|if)|next|wend|loop|on[ \t]+"
        r"error|option[ \t]+explicit|if\b[^\n]*\bthen)\b|\bcreateobject[ \t]*\(|&[ \t]*chrw?\(",
        re.I | re.M,
    ),
    "js": re.compile(
        r"\bvar[ \t]+[\w$]+|\bfunction[ \t]*[\w$]*[ \t]*\(|\bnew[ \t]+activexobject\b|;[ \t]*$"
        r"|\{[ \t]*$|^[ \t]*\}|\bstring\.fromcharcode\b",
        re.I | re.M,
    ),
    "ps": re.compile(
        r"\$[a-z_][\w:]*[ \t]*=|\bnew-object\b|\b(?:invoke|start|get|set|new|add|remove|out)-[a-z]"
        r"+|\biex\b|\[(?:system\.)?[a-z.]+\]::|-encodedcommand\b",
        re.I | re.M,
    ),
    "bat": re.compile(
        r"^[ \t]*@?echo[ \t]+off|%[a-z_~0-9]+%|^[ \t]*(?:set|goto|call|start|if|for)[ \t]"
        r"|^:[a-z]\w*",
        re.I | re.M,
    ),
}
_MIN_MARKERS = 3
_PAGE_MARK = re.compile(r"<script\b|<hta:application", re.I)

# Code among prose. Mail about scripts quotes a few lines of code between paragraphs ("open
# PowerShell and paste these lines: …"), and English lines begin with If, For, Set, Call or
# Start: the markers above find them, but such a text is not a script anything runs. Undeclared
# text is code only if most of its lines (blank lines and comments aside) look like code.
MIN_CODE_SHARE = 0.7
_SNIFF_LINES = 400  # the lines judged (from the start): enough to tell
_LINE_CHARS = 1000  # of each line
_QUOTED = re.compile(r"\"[^\"\n]*\"|(?<![A-Za-z])'[^'\n]*'(?![A-Za-z])")
_COMMENT_LINE = re.compile(r"[ \t]*(?:'|//|/\*|\*|#|<#|rem\b|::)", re.I)
_CODE_LINE = re.compile(
    r"=|[;{}][ \t]*$|^[ \t]*[{}\])]|\w[ \t]*\(|\)[ \t]*$|[\w\])]\.[A-Za-z_$]"
    r"|^[ \t]*[@:%$<]|%\w+%|\$\w|\b[A-Z][a-z]+-[A-Z][A-Za-z]+\b|[ \t][-/][A-Za-z]+\b"
    r"|^[ \t]*(?:end|next|wend|loop|else|elseif|exit|option|on[ \t]+error|dim|set|sub|function"
    r"|return|var|let|const|if|for|do|while|try|catch|call|goto|echo|start|param|randomize|copy"
    r"|xcopy|del|cd|md|mkdir|rd|move|ren|cls|pause|shift|setlocal|endlocal|reg|net|taskkill)\b",
    re.I,
)
_PLAIN_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*[,.:;!?]?")
# English function words (not as, in, is, and, not, then: VBScript's words too).
_STOP_WORDS = frozenset({
    "a", "an", "the", "to", "of", "are", "be", "been", "we", "you", "i", "it", "its", "this",
    "that", "these", "those", "will", "would", "can", "could", "should", "with", "at", "from",
    "your", "our", "my", "me", "us", "they", "them", "there", "here", "what", "when", "which",
    "just", "also", "please", "have", "has", "had", "was", "were", "so", "but", "by", "about",
    "after", "before", "first",
})  # fmt: skip


def code_share(text: str) -> float:
    """The share of ``text``'s lines that look like code, blank lines and comments aside: a
    line of five or more words, most of them plain and two of them English function words, is
    prose; any other line is code if it has an assignment, a call, member access, a brace, a
    statement end, a variable, a switch or begins with a statement word."""
    code = other = 0
    for n, line in enumerate(text.splitlines()):
        if n >= _SNIFF_LINES:
            break
        line = line[:_LINE_CHARS]
        if not line.strip() or _COMMENT_LINE.match(line):
            continue
        bare = _QUOTED.sub("S", line)
        words = bare.split()
        if len(words) >= 5:
            plain = sum(1 for w in words if _PLAIN_WORD.fullmatch(w))
            stop = sum(1 for w in words if w.lower().strip(",.:;!?") in _STOP_WORDS)
            if stop >= 2 and plain >= 0.6 * len(words):
                other += 1
                continue
        if _CODE_LINE.search(bare):
            code += 1
        else:
            other += 1
    return code / (code + other) if code + other else 0.0


def sniff(text: str) -> str | None:
    """The script language of ``text`` ("vb", "js", "ps", "bat", "page"), or None for text
    that is not code a Windows host runs (prose quoting a few lines of code included)."""
    head = text[:MAX_SNIFF_CHARS]
    lowered = _script.lowered(text)[:MAX_SNIFF_CHARS] if len(text) < (1 << 20) else head.lower()
    if not any(needle in lowered for needle in _GATE):
        return None
    if _PAGE_MARK.search(head):
        return "page"
    scores = {}
    for language, marker in _MARKERS.items():
        count = 0
        for _ in marker.finditer(head):
            count += 1
            if count >= 50:
                break
        scores[language] = count
    best = max(scores, key=lambda language: scores[language])
    if scores[best] >= _MIN_MARKERS and code_share(head) >= MIN_CODE_SHARE:
        return best
    return None


def carries_encoded(text: str) -> bool:
    """Whether ``text`` may hold an encoded script (``layers`` finds it, whatever the text)."""
    head = text[:MAX_CODE_CHARS]
    return "#@~^" in head or _PS_ENCODED.search(head) is not None


# --- unwrapping encoded scripts --------------------------------------------------------------

# The Script Encoder's substitution: for each plain character from 0x09 to 0x7F, what it becomes
# in each of three columns (the column follows a fixed 64-step pattern). A property of the file
# format (public since 2001); the decoder is this table inverted.
_WSH_COLUMNS = (
    "7\n\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f~ZE:yY'"
    "vcbMQSR &Tq+f*X\x7f{01lI<x>_@)$/93o!u(BFJ\\H6K}]jPi#\tpet,wD?m|C8^[nW"
    'L4r%VshUG25.dO;-Aaz"`kN=g',
    "i\n\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f,er[fuLEv"
    "*C3B cJZ8y2Wl+FRO=p<{>Q@z~;GAwV_&xndtg}h5\"U:`jqoI\\]'Y%|#m(19\x7f6T4bN0^s\tKa$MkD!7SXH.P-)?/",
    'd\n\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1fP"Ja^][B'
    "`#e_~ORz!F &c*vG%,)i<'>g@bAZf2sMCq9|SH1rnpI?Kj.\x7f(5}$-T7{=l4mN+0otkL3V:xWw;D/YE\\h6Xy\tu8UQ",
)
_WSH_PATTERN = tuple(
    int(c) for c in "0120121221210212021200122102122100212120200120210212001220012021"
)
_WSH_UNTOUCHED = frozenset("\n\r<>@")  # never substituted (and < > @ are escaped instead)
_WSH_ENCODE = [
    {chr(p): column[p - 9] for p in range(9, 128) if chr(p) not in _WSH_UNTOUCHED}
    for column in _WSH_COLUMNS
]
_WSH_DECODE = [{v: k for k, v in table.items()} for table in _WSH_ENCODE]
_WSH_ESCAPES = {"@$": "@", "@!": "<", "@*": ">", "@#": "\r", "@&": "\n"}
# A blob: "#@~^" + 6 base64 characters (the length) + "==", the body, 6 more (the checksum) +
# "==^#~@". Found by two linear searches (start, then the end after it), never by one regex
# with a lazy body: that rescans to the end of the text for every start without an end.
_WSH_START = re.compile(r"#@~\^[\w+/]{6}==")
_WSH_END = re.compile(r"[\w+/]{6}==\^#~@")
_WSH_ESCAPE = re.compile(r"@[$!*#&]")


def wsh_decode(body: str) -> str:
    """The plain script inside a Script Encoder blob's body."""
    body = _WSH_ESCAPE.sub(lambda m: _WSH_ESCAPES[m.group()], body)
    out = []
    index = -1
    for char in body:
        if char < "\x80":
            index += 1
        table = _WSH_DECODE[_WSH_PATTERN[index % 64]]
        out.append(table.get(char, char))
    return "".join(out)


def wsh_encode(plain: str) -> str:
    """A Script Encoder blob of ``plain`` (what ``screnc`` writes): for the tests' generators."""
    out = []
    index = -1
    for char in plain:
        if char < "\x80":
            index += 1
        out.append(_WSH_ENCODE[_WSH_PATTERN[index % 64]].get(char, char))
    escaped = "".join(out).replace("@", "@$").replace("<", "@!").replace(">", "@*")
    escaped = escaped.replace("\r", "@#").replace("\n", "@&")
    length = base64.b64encode(len(escaped).to_bytes(4, "little")).decode()[:6]
    checksum = sum(map(ord, plain)) & 0xFFFFFFFF
    check = base64.b64encode(checksum.to_bytes(4, "little")).decode()[:6]
    return f"#@~^{length}=={escaped}{check}==^#~@"


_PS_ENCODED = re.compile(
    r"-(?:e|ec|en|enc|enco|encod|encode|encoded|encodedc|encodedco|encodedcom|encodedcomm"
    r"|encodedcomma|encodedcomman|encodedcommand)\s+[\"']?([a-z0-9+/]{16,}={0,2})",
    re.I,
)


def layers(script: Script) -> list[Script]:
    """The scripts hidden inside ``script`` (one level; callers recurse if they wish)."""
    found: list[Script] = []
    text = script.text[:MAX_CODE_CHARS]
    for body in wsh_bodies(text):
        plain = wsh_decode(body)
        language = "vb" if script.language == "vb" or _vb_like(plain) else "js"
        found.append(Script(language, plain, ENCODED))
    if "-" in text:
        for match in _PS_ENCODED.finditer(text):
            try:
                raw = base64.b64decode(match.group(1), validate=False)
                found.append(Script("ps", raw.decode("utf-16-le"), ENCODED))
            except (binascii.Error, ValueError):
                continue
    return found


def wsh_bodies(text: str) -> list[str]:
    """The bodies of the Script Encoder blobs in ``text``, in one left-to-right pass: each
    start's end is searched from the start on; a start without an end stops the search (no
    later start can have an end either), so every character is read at most twice."""
    bodies = []
    at = text.find("#@~^")
    while at >= 0:
        start = _WSH_START.match(text, at)
        if start is None:
            at = text.find("#@~^", at + 1)
            continue
        end = _WSH_END.search(text, start.end())
        if end is None:
            break
        bodies.append(text[start.end() : end.start()])
        at = text.find("#@~^", end.end())
    return bodies


def _vb_like(text: str) -> bool:
    return len(_MARKERS["vb"].findall(text[:8192])) > len(_MARKERS["js"].findall(text[:8192]))


# --- canonical form --------------------------------------------------------------------------

_NEWLINE_LEXERS = {
    language: re.compile(r"(?P<nl>\n)|" + lexer.pattern, lexer.flags)
    for language, lexer in _LEXERS.items()
}
_SEPARATORS = {"vb": ":", "js": ";", "ps": ";", "bat": "&"}
_JS_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|(.))", re.S)
_JS_SIMPLE = {"n": "\n", "t": "\t", "r": "\r", "0": "\0"}
_PS_ESCAPE = re.compile(r"`(.)", re.S)
_DECLARE = frozenset({"dim", "var", "let", "const", "set", "private", "public", "static"})
# Functions that compute and do nothing else: a junk statement may call them.
_PURE = frozenset(
    [
        "chr",
        "chrw",
        "chrb",
        "asc",
        "ascw",
        "len",
        "mid",
        "left",
        "right",
        "lcase",
        "ucase",
        "trim",
        "int",
        "cint",
        "clng",
        "cstr",
        "abs",
        "sqr",
        "rnd",
        "hex",
        "oct",
        "fix",
        "round",
        "math",
        "floor",
        "ceil",
        "random",
        "parseint",
        "parsefloat",
        "string",
        "fromcharcode",
        "tostring",
        "substr",
        "substring",
        "charat",
        "charcodeat",
    ]
)
_API_NAME = re.compile(r"[a-z][a-z0-9]*(?:\.[a-z][a-z0-9]*)+|mapi")
_NUMBER = re.compile(r"&h[0-9a-f]+|0x[0-9a-f]+|\d+")
_MAX_NUMBER_CHARS = 12

Tok = tuple[str, str]  # (kind, value): "nl", "str", "id", "num", "op"
_NL: Tok = ("nl", "\n")


@dataclass(frozen=True)
class Canonical:
    """A script's normalised code."""

    language: str
    tokens: tuple[str, ...]  # strings quoted ("…"), names v1 …, statement ends "\n"
    text: str  # the tokens as one lower-case text: what behaviour rules search
    # How the author hid the code: letters built from character codes, strings reversed or
    # spliced (Chr(79), fromCharCode, StrReverse, Replace on literals), and junk statements
    # (values nothing reads) dropped. Ordinary code has next to none of either.
    built_strings: int = 0
    junk_statements: int = 0

    @property
    def shape(self) -> list[str]:
        """The tokens similarity compares: names ``v``, strings ``s`` unless an API name."""
        out = []
        for token in self.tokens:
            if token == "\n":
                continue
            if token.startswith('"'):
                inner = token[1:-1]
                out.append(inner if _API_NAME.fullmatch(inner) else "s")
            elif token[0] == "v" and token[1:].isdigit():
                out.append("v")
            elif token[0].isdigit() or token.startswith("&h"):
                out.append("n")
            else:
                out.append(token)
        return out


@lru_cache(maxsize=32)
def canonical(script: Script) -> Canonical:
    """The canonical form of ``script`` (computed once for all the rules that read it)."""
    language = script.language if script.language in _LEXERS else "js"
    toks = _lex(script.text[:MAX_CODE_CHARS], language)
    built = junk = 0
    for _ in range(_MAX_PASSES):
        folded, built_now = _fold(toks, language)
        propagated = _propagate(toks)
        dropped, junk_now = _drop_junk(toks)
        built += built_now
        junk += junk_now
        if not (folded or propagated or dropped):
            break
    if language == "bat":
        junk = 0  # %name% reads are inside words the lexer keeps whole: no name looks read
    names = _rename(toks, language)
    return Canonical(language, tuple(names), _join(names), built, junk)


def _lex(text: str, language: str) -> list[Tok]:
    lexer = _NEWLINE_LEXERS[language]
    separator = _SEPARATORS[language]
    out: list[Tok] = []
    for match in lexer.finditer(text):
        kind = match.lastgroup
        value = match.group()
        if kind == "comment":
            continue
        if kind == "nl" or (kind == "punct" and value == separator):
            if out and out[-1] == ("id", "_") and language == "vb":
                out.pop()  # VBScript line continuation
            elif out and out[-1] != _NL:
                out.append(_NL)
        elif kind == "string":
            out.append(("str", _unquote(value, language)))
        elif kind == "ident":
            out.append(("id", value.lower()))
        elif kind == "number":
            out.append(("num", value.lower()))
        else:
            out.append(("op", value))
    return out


def _unquote(literal: str, language: str) -> str:
    quote, body = literal[0], literal[1:-1]
    if language == "vb":
        return body.replace('""', '"')
    if language == "ps":
        return body.replace("''", "'") if quote == "'" else _PS_ESCAPE.sub(r"\1", body)
    if language == "js":
        return _JS_ESCAPE.sub(_js_escape, body)
    return body


def _js_escape(match: re.Match[str]) -> str:
    if match.group(1):
        return chr(int(match.group(1), 16))
    if match.group(2):
        return chr(int(match.group(2), 16))
    char = match.group(3)
    return _JS_SIMPLE.get(char, char)


def _number(value: str) -> int | None:
    # A character code has a few digits; a longer number is nothing a string is built from
    # (and int() refuses decimals of more than 4300 digits).
    if len(value) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(value):
        return None
    if value.startswith(("&h", "0x")):
        return int(value[2:], 16)
    return int(value)


def _arith(toks: list[Tok], start: int) -> tuple[int, int] | None:
    """A constant integer expression (n, n + n, n - n, n * n) from ``start``: (value, end)."""
    if start >= len(toks) or toks[start][0] != "num":
        return None
    value = _number(toks[start][1])
    if value is None:
        return None
    at = start + 1
    while at + 1 < len(toks) and toks[at] in (("op", "+"), ("op", "-"), ("op", "*")):
        right = _number(toks[at + 1][1]) if toks[at + 1][0] == "num" else None
        if right is None:
            break
        op = toks[at][1]
        value = value + right if op == "+" else value - right if op == "-" else value * right
        at += 2
    return value, at


def _char(code: int) -> str | None:
    return chr(code) if 0 <= code < 0x110000 else None


def _strs(toks: list[Tok], at: int, pattern: str) -> list[str] | None:
    """Match ``pattern`` (space-separated: ``S`` a string, anything else a literal token)."""
    found = []
    for want in pattern.split():
        if at >= len(toks):
            return None
        kind, value = toks[at]
        if want == "S":
            if kind != "str":
                return None
            found.append(value)
        elif value != want or kind == "str":
            return None
        at += 1
    return found


def _fold(toks: list[Tok], language: str) -> tuple[bool, int]:
    """One pass of string folding over ``toks`` in place: whether anything changed, and how
    many folds built letters or digits from codes, or reversed or spliced literals."""
    changed = False
    built = 0
    i = 0
    while i < len(toks):
        kind, value = toks[i]
        replaced = None  # (length, new string)
        hides = True  # whether this fold undoes hiding (not a plain "a" & "b")
        if kind == "id" and value in ("chr", "chrw", "chrb", "chr$", "chrw$"):
            if i + 1 < len(toks) and toks[i + 1] == ("op", "("):
                arith = _arith(toks, i + 2)
                if arith and arith[1] < len(toks) and toks[arith[1]] == ("op", ")"):
                    char = _char(arith[0])
                    if char is not None:
                        replaced = (arith[1] + 1 - i, char)
        elif (
            kind == "id"
            and value == "string"
            and _strs(toks, i + 1, ". fromcharcode (") is not None
        ):
            replaced = _char_codes(toks, i + 4)
            if replaced:
                replaced = (replaced[0] + 4, replaced[1])
        elif kind == "op" and value == "[" and _strs(toks, i + 1, "char ]") is not None:
            arith = _arith(toks, i + 3)
            if arith and (char := _char(arith[0])) is not None:
                replaced = (arith[1] - i, char)
        elif kind == "id" and value in ("replace", "strreverse", "lcase", "ucase"):
            replaced = _vb_function(toks, i, value)
            hides = value in ("replace", "strreverse")
        elif kind == "op" and value == "(" and i + 2 < len(toks):
            # ("a") → "a" unless it is a call's or an index's argument list. In PowerShell a
            # name before "(" is a parameter or a command (-Path ('x')); only methods are calls.
            before = toks[i - 1] if i else _NL
            call = before[0] == "str" or before in (("op", ")"), ("op", "]"))
            if before[0] == "id":
                call = language != "ps" or (i >= 2 and toks[i - 2] == ("op", "."))
            if toks[i + 1][0] == "str" and toks[i + 2] == ("op", ")") and not call:
                replaced = (3, toks[i + 1][1])
                hides = False
        elif kind == "str":
            replaced = _string_method(toks, i)
            hides = replaced is not None and toks[i + 2][1] not in ("tolowercase", "touppercase")
            if replaced is None and i + 2 < len(toks) and toks[i + 2][0] == "str":
                op = toks[i + 1]
                if op in (("op", "&"), ("op", "+")):
                    # "a" & "b" is only a concatenation of these two if nothing binds tighter
                    # on the left ("x" * 2 & …): strings take no arithmetic, so it holds.
                    replaced = (3, value + toks[i + 2][1])
        if replaced is not None:
            length, new = replaced
            if hides and any(c.isalnum() for c in new):
                built += 1
            toks[i : i + length] = [("str", new)]
            changed = True
            i = max(0, i - 3)
            continue
        i += 1
    return changed, built


def _char_codes(toks: list[Tok], at: int) -> tuple[int, str] | None:
    """fromCharCode's argument list from ``at`` to its ")": (tokens used, the string)."""
    chars = []
    i = at
    while i < len(toks):
        arith = _arith(toks, i)
        if arith is None:
            return None
        char = _char(arith[0])
        if char is None:
            return None
        chars.append(char)
        i = arith[1]
        if i < len(toks) and toks[i] == ("op", ")"):
            return i + 1 - at, "".join(chars)
        if i >= len(toks) or toks[i] != ("op", ","):
            return None
        i += 1
    return None


def _vb_function(toks: list[Tok], i: int, name: str) -> tuple[int, str] | None:
    if name == "replace":
        args = _strs(toks, i + 1, "( S , S , S )")
        if args is not None:
            return 8, args[0].replace(args[1], args[2]) if args[1] else args[0]
        return None
    args = _strs(toks, i + 1, "( S )")
    if args is None:
        return None
    text = args[0]
    return 4, text[
        ::-1
    ] if name == "strreverse" else text.lower() if name == "lcase" else text.upper()


def _string_method(toks: list[Tok], i: int) -> tuple[int, str] | None:
    """JS/PS methods on a string literal: replace, split/reverse/join, case changes."""
    text = toks[i][1]
    args = _strs(toks, i + 1, ". replace ( S , S )")
    if args is not None:
        return 8, text.replace(args[0], args[1]) if args[0] else text
    args = _strs(toks, i + 1, ". split ( S ) . reverse ( ) . join ( S )")
    if args is not None:
        parts = list(text) if args[0] == "" else text.split(args[0])
        return 16, args[1].join(reversed(parts))
    args = _strs(toks, i + 1, ". split ( S ) . join ( S )")
    if args is not None:
        parts = list(text) if args[0] == "" else text.split(args[0])
        return 11, args[1].join(parts)
    for method, change in (("tolowercase", str.lower), ("touppercase", str.upper)):
        if _strs(toks, i + 1, f". {method} ( )") is not None:
            return 5, change(text)
    args = _strs(toks, i + 1, "- replace S , S")
    if args is not None:  # PowerShell's -replace takes a regex
        try:
            return 6, re.sub(args[0], args[1], text)
        except (re.error, IndexError):
            return None
    return None


def _statements(toks: list[Tok]) -> list[tuple[int, int]]:
    """(start, end) of each statement: runs of tokens between line ends."""
    spans = []
    start = 0
    for i, tok in enumerate(toks):
        if tok == _NL:
            if i > start:
                spans.append((start, i))
            start = i + 1
    if start < len(toks):
        spans.append((start, len(toks)))
    return spans


def _target(toks: list[Tok], start: int, end: int) -> tuple[str, int] | None:
    """The name a statement assigns (``[var|set|…] name [op]= …``) and where its value starts."""
    at = start
    while at < end and toks[at][0] == "id" and toks[at][1] in _DECLARE:
        at += 1
    if at >= end or toks[at][0] != "id" or toks[at][1] in _DECLARE:
        return None
    name = toks[at][1]
    at += 1
    if at < end and toks[at][0] == "op" and toks[at][1] in "+-&*/|" and at + 1 < end:
        at += 1
    if at < end and toks[at] == ("op", "="):
        if at + 1 < end and toks[at + 1] == ("op", "="):
            return None  # a comparison (==)
        return name, at + 1
    return None


def _uses(toks: list[Tok]) -> dict[str, int]:
    """How often each name occurs outside member position (``x.name`` is not a use of name)."""
    counts: dict[str, int] = {}
    previous: Tok = _NL
    declaring = False  # inside "Dim a, b": declarations are not uses
    for tok in toks:
        if previous == _NL:
            declaring = tok == ("id", "dim")
        if tok[0] == "id" and previous != ("op", ".") and not declaring:
            counts[tok[1]] = counts.get(tok[1], 0) + 1
        previous = tok
    return counts


def _propagate(toks: list[Tok]) -> bool:
    """Names assigned once, to a string or a member chain, replaced by that value."""
    spans = _statements(toks)
    assigned: dict[str, list[tuple[int, int, int]]] = {}
    for start, end in spans:
        target = _target(toks, start, end)
        if target:
            assigned.setdefault(target[0], []).append((start, end, target[1]))
    uses = _uses(toks)
    for name, where in assigned.items():
        if len(where) != 1 or name in _KEEP_ANY:
            continue
        start, end, value_at = where[0]
        value = toks[value_at:end]
        if not _inlinable(value) or toks[value_at - 1] != ("op", "="):
            continue
        if toks[value_at - 2][0] == "op":
            continue  # x += …: not a single value
        if uses.get(name, 0) <= 1:
            continue  # nothing reads it: junk removal's business
        declaring = _declaring(toks)
        out: list[Tok] = []
        previous: Tok = _NL
        for index, tok in enumerate(toks):
            if start <= index < end:
                continue
            if tok == ("id", name) and previous != ("op", ".") and not declaring[index]:
                out.extend(value)
            else:
                out.append(tok)
            previous = tok
        toks[:] = out
        return True  # spans are stale now: one name per call, the pass loop repeats
    return False


_KEEP_ANY = frozenset().union(*_KEEP.values())


def _inlinable(value: list[Tok]) -> bool:
    if len(value) == 1:
        return value[0][0] == "str"
    # A member chain without calls (WScript.ScriptFullName), read where it is used.
    return (
        0 < len(value) <= 7
        and len(value) % 2 == 1
        and all(t[0] == "id" for t in value[::2])
        and all(t == ("op", ".") for t in value[1::2])
    )


_DECLARING = frozenset({"dim", "var", "let", "const"})


def _declaring(toks: list[Tok]) -> list[bool]:
    """For each token, whether it sits in a declaration list (Dim a, b): after a declaring word
    with nothing but names and commas between. One forward pass over the statement."""
    flags = []
    inside = False
    for tok in toks:
        flags.append(inside)
        if tok[0] == "id":
            inside = inside or tok[1] in _DECLARING
        elif tok != ("op", ","):
            inside = False  # anything else, the end of the statement too
    return flags


def _drop_junk(toks: list[Tok]) -> tuple[bool, int]:
    """Statements that only give a value nothing reads, and declarations of unused names:
    whether anything changed, and how many statements were junk."""
    uses = _uses(toks)
    keep: list[Tok] = []
    changed = False
    junk = 0
    for start, end in _statements(toks):
        statement = toks[start:end]
        if _junk(statement, uses):
            changed = True
            junk += 1
            continue
        if statement[0] == ("id", "dim") and len(statement) > 1:
            names = [t for t in statement[1:] if t[0] == "id"]
            if all(t[0] == "id" or t == ("op", ",") for t in statement[1:]):
                used = [t for t in names if uses.get(t[1], 0) > 0]
                if len(used) != len(names):
                    changed = True
                    if not used:
                        continue
                    statement = [("id", "dim")] + _comma_joined(used)
        keep.extend(statement)
        keep.append(_NL)
    if changed:
        toks[:] = keep
    return changed, junk


def _comma_joined(names: list[Tok]) -> list[Tok]:
    out: list[Tok] = []
    for name in names:
        if out:
            out.append(("op", ","))
        out.append(name)
    return out


def _junk(statement: list[Tok], uses: dict[str, int]) -> bool:
    target = _target(statement, 0, len(statement))
    if target is None:
        return False
    name, value_at = target
    if name in _KEEP_ANY or uses.get(name, 0) != _occurrences(statement, name):
        return False  # read elsewhere, or a language word
    value = statement[value_at:]
    for i, tok in enumerate(value):
        if tok == ("op", "."):
            nxt = value[i + 1] if i + 1 < len(value) else _NL
            if nxt[1] not in _PURE:
                return False
        if tok[0] == "id" and tok[1] in ("new", "createobject", "getobject", "activexobject"):
            return False
        if tok == ("op", "(") and i and value[i - 1][0] == "id" and value[i - 1][1] not in _PURE:
            return False  # a call may do something
    return True


def _occurrences(statement: list[Tok], name: str) -> int:
    count = 0
    previous: Tok = _NL
    for tok in statement:
        if tok == ("id", name) and previous != ("op", "."):
            count += 1
        previous = tok
    return count


def _rename(toks: list[Tok], language: str) -> list[str]:
    keep = _KEEP.get(language, _KEEP["js"])
    names: dict[str, str] = {}
    out: list[str] = []
    previous: Tok = _NL
    for tok in toks:
        kind, value = tok
        if kind == "str":
            out.append('"' + value.lower().replace('"', "'").replace("\n", " ") + '"')
        elif kind == "id":
            if (
                value in keep
                or previous == ("op", ".")
                or (language == "ps" and not value.startswith("$"))
                or language == "bat"
            ):
                out.append(value)
            else:
                out.append(names.setdefault(value, f"v{len(names) + 1}"))
        elif tok == _NL:
            if out and out[-1] != "\n":
                out.append("\n")
        else:
            out.append(value)
        previous = tok
    return out


def _join(tokens: list[str]) -> str:
    parts: list[str] = []
    glue = True
    for token in tokens:
        if token == "\n":
            parts.append("\n")
            glue = True
        elif token == ".":
            parts.append(".")
            glue = True
        else:
            if not glue:
                parts.append(" ")
            parts.append(token)
            glue = False
    return "".join(parts)
