"""The Skeptic engine: rules loaded once, applied to every object of a message."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mailtower.scanning.engines import Finding
from mailtower.scanning.errors import RuleError
from mailtower.scanning.objects import Analysis
from mailtower.scanning.skeptic import _kinds
from mailtower.scanning.skeptic._rules import RuleSpec, Severity, load_specs
from mailtower.scanning.skeptic._sniff import base_name

log = logging.getLogger(__name__)

ENGINE = "skeptic"
# A rule that crashes on some input must not let that input pass (fail closed): the object
# gets this finding instead, and the log says which rule broke.
INTERNAL_ERROR = "skeptic.internal-error"


@dataclass(frozen=True)
class Rule:
    """A loaded rule: its data and the kind object that applies it."""

    spec: RuleSpec
    kind: _kinds.FileKind

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def severity(self) -> Severity:
        return self.spec.severity


def shipped_rules_dir() -> Path:
    """The project's own rules (package data ``mailtower/scanning/rules/skeptic``)."""
    return Path(str(resources.files("mailtower.scanning.rules") / "skeptic"))


class Skeptic:
    """Heuristic engine: pure, bytes in and findings out; rules come from data files."""

    name = ENGINE

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self._severity = {rule.id: rule.severity for rule in rules}
        self._severity[INTERNAL_ERROR] = Severity.HOSTILE

    @classmethod
    def from_rules(cls, directory: Path | None = None) -> Skeptic:
        """Load every rule in ``directory`` (None: the shipped rules); raise RuleError."""
        specs = load_specs(directory if directory is not None else shipped_rules_dir())
        rules = [Rule(spec, _kinds.build(spec)) for spec in specs]
        if not rules:
            raise RuleError(f"{directory}: no enabled rules")
        return cls(rules)

    def severity(self, finding_name: str) -> Severity | None:
        """The severity of a finding this engine produced (its rule's), None if not ours."""
        name = finding_name
        while name:
            if name in self._severity:
                return self._severity[name]
            name = name.rpartition(".")[0]
        return None

    def hostile(self, findings: list[Finding]) -> list[Finding]:
        """The findings that should make the message suspicious (not just informational)."""
        return [f for f in findings if self.severity(f.name) is Severity.HOSTILE]

    def examine(self, analysis: Analysis) -> list[Finding]:
        """Every finding of every rule on the message's objects and anomalies, in rule order."""
        findings: dict[tuple[str, str | None], None] = {}
        message_names = frozenset(
            base_name(name).lower() for obj in analysis.objects for name in obj.filenames
        )
        subjects = [_kinds.Subject(obj, message_names) for obj in analysis.objects]
        for rule in self.rules:
            try:
                for suffix in rule.kind.check_message(analysis):
                    findings[(_name(rule.id, suffix), None)] = None
            except Exception:
                log.exception("skeptic rule %s failed on the message", rule.id)
                findings[(INTERNAL_ERROR, None)] = None
            for subject in subjects:
                try:
                    for suffix in rule.kind.check(subject):
                        findings[(_name(rule.id, suffix), subject.obj.path)] = None
                except Exception:
                    log.exception("skeptic rule %s failed on %s", rule.id, subject.obj.path)
                    findings[(INTERNAL_ERROR, subject.obj.path)] = None
        return [Finding(ENGINE, name, part) for name, part in findings]


def _name(rule_id: str, suffix: str) -> str:
    return f"{rule_id}.{suffix}" if suffix else rule_id
