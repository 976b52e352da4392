"""Skeptic: the heuristic engine — disguised executables, known-vulnerability tricks,
obfuscation and polymorphic padding, similarity to known worms.

Usage::

    skeptic = Skeptic.from_rules()          # the shipped rules (scanning/rules/skeptic)
    findings = skeptic.examine(analysis)    # [Finding(engine="skeptic", name=<rule id>, part=…)]
    skeptic.severity(finding.name)          # Severity.HOSTILE → suspicious; INFO → policy facts

Rule data (lists, regexes, thresholds, fingerprints) lives in TOML/JSON files; the code
implements rule *kinds* (see ``_kinds.KINDS``). ``fingerprint()`` turns a script into the token
text a ``code-similarity`` rule stores.
"""

from __future__ import annotations

from mailtower.scanning.errors import RuleError
from mailtower.scanning.skeptic._engine import INTERNAL_ERROR, Rule, Skeptic, shipped_rules_dir
from mailtower.scanning.skeptic._office import vba_sources
from mailtower.scanning.skeptic._rules import Severity
from mailtower.scanning.skeptic._script import Script, normalise


def fingerprint(text: str, language: str) -> str:
    """The normalised token text of a script, as stored in a code-similarity fingerprint."""
    return " ".join(normalise(Script(language, text, "file")))


__all__ = [
    "INTERNAL_ERROR",
    "Rule",
    "RuleError",
    "Severity",
    "Skeptic",
    "fingerprint",
    "shipped_rules_dir",
    "vba_sources",
]
