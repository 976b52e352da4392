"""The YARA engine: compiled rules from directories of ``.yar``/``.yara`` files, reloadable.

``reload()`` compiles the new rule set completely before it replaces the old one, and the swap
is one reference assignment: a scan in progress keeps the set it started with, and a rule file
that does not compile leaves the running set untouched (the error names the file and line).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yara

from mailtower.scanning.engines import Finding
from mailtower.scanning.errors import EngineScanError, EngineTimeout, YaraRuleError
from mailtower.scanning.objects import ScanObject
from mailtower.scanning.rules import YARA_DIR

log = logging.getLogger(__name__)

RULE_SUFFIXES = (".yar", ".yara")


@dataclass(frozen=True)
class RuleSet:
    """One compiled generation of rules and what it was built from."""

    rules: yara.Rules
    files: tuple[Path, ...]
    meta: dict[str, dict[str, Any]]  # rule name → its meta values (e.g. "severity")


def default_rule_dirs() -> tuple[Path, ...]:
    """The project's own rules (package data)."""
    return (YARA_DIR,)


def rule_files(dirs: Iterable[Path]) -> list[Path]:
    """Every rule file under ``dirs``, recursively, in a stable order."""
    found: list[Path] = []
    for directory in dirs:
        if not directory.is_dir():
            raise YaraRuleError(f"YARA rule directory {directory} does not exist")
        found += sorted(
            path
            for path in directory.rglob("*")
            if path.suffix.lower() in RULE_SUFFIXES and path.is_file()
        )
    return found


def compile_rules(dirs: Sequence[Path]) -> RuleSet:
    """Compile every rule file under ``dirs`` into one set; raise YaraRuleError if any fails."""
    files = rule_files(dirs)
    if not files:
        raise YaraRuleError(f"no .yar/.yara files under {', '.join(map(str, dirs))}")
    # One namespace per file: two files may each define a rule with the same name.
    filepaths = {f"{index}:{path.name}": str(path) for index, path in enumerate(files)}
    try:
        rules = yara.compile(filepaths=filepaths)
    except yara.SyntaxError as exc:
        # yara's message already reads "<file>(<line>): <error>".
        raise YaraRuleError(f"YARA rule does not compile: {exc}") from exc
    except yara.Error as exc:
        raise YaraRuleError(f"YARA rules under {', '.join(map(str, dirs))}: {exc}") from exc
    meta = {rule.identifier: dict(rule.meta) for rule in rules}
    return RuleSet(rules=rules, files=tuple(files), meta=meta)


class YaraEngine:
    """Scans bytes with a compiled rule set; ``reload()`` swaps in a new set atomically."""

    name = "yara"

    def __init__(self, rule_dirs: Sequence[Path | str] | None = None, *, timeout_s: float = 10.0):
        dirs = default_rule_dirs() if rule_dirs is None else rule_dirs
        self.rule_dirs = tuple(Path(d) for d in dirs)
        self.timeout_s = timeout_s
        self._reload_lock = threading.Lock()
        self._set = compile_rules(self.rule_dirs)

    @property
    def rule_set(self) -> RuleSet:
        return self._set

    def reload(self) -> RuleSet:
        """Compile the rule files again and swap them in; on error keep the current set."""
        with self._reload_lock:
            new = compile_rules(self.rule_dirs)
            self._set = new  # one assignment: scans see the old set or the new, never a mix
        log.info("YARA: %d rules from %d files", len(new.meta), len(new.files))
        return new

    def meta(self, rule: str) -> dict[str, Any]:
        """The meta values of ``rule`` (e.g. ``severity``: virus | suspicious | info)."""
        return self._set.meta.get(rule, {})

    def scan(self, data: bytes) -> list[Finding]:
        deadline = time.monotonic() + self.timeout_s
        return [Finding(self.name, rule) for rule in self._match(self._set, data, deadline)]

    def scan_objects(self, objects: Iterable[ScanObject]) -> list[Finding]:
        """Scan each object (one deadline for all); each finding names the object's path."""
        rule_set = self._set  # one generation for the whole message
        deadline = time.monotonic() + self.timeout_s
        findings: list[Finding] = []
        for obj in objects:
            for rule in self._match(rule_set, obj.data, deadline):
                findings.append(Finding(self.name, rule, part=obj.path))
        return findings

    def health(self, timeout_s: float) -> str:
        rule_set = self._set
        # A real scan of a few bytes proves the compiled rules are usable.
        self._match(rule_set, b"mailtower health check", time.monotonic() + timeout_s)
        return f"yara {yara.__version__} ({len(rule_set.meta)} rules)"

    def _match(self, rule_set: RuleSet, data: bytes, deadline: float) -> list[str]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EngineTimeout(f"yara: no time left within {self.timeout_s}s")
        # yara takes whole seconds; the overall deadline above keeps the total honest.
        timeout = max(1, math.ceil(left))
        try:
            matches = rule_set.rules.match(data=data, timeout=timeout)
        except yara.TimeoutError as exc:
            raise EngineTimeout(f"yara: scan did not finish within {timeout}s") from exc
        except yara.Error as exc:
            raise EngineScanError(f"yara: {exc}") from exc
        names: list[str] = []
        for match in matches:
            if match.rule not in names:
                names.append(match.rule)
        return names
