"""Skeptic's rule data: TOML/JSON files of named lists and rules, loaded and checked up front.

A rules directory holds ``*.toml`` and ``*.json`` files, read in name order. Each may define

- ``[lists]``: named lists (extensions, keywords, regexes) that rule parameters reference as
  ``"@list-name"``;
- ``[[rule]]``: ``id`` (the finding name), ``kind`` (which code examines it), ``severity``
  (``hostile`` or ``info``), optional ``summary`` and ``enabled``, and ``[rule.params]``.

A later file replaces a list or rule of the same name, so a tower can ship an override file
(``zz-local.toml``) next to the project's bundle. Any error — unknown kind, bad regex, missing
parameter — fails the whole load: a tower keeps its old rules rather than run half a bundle.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from mailtower.scanning.errors import RuleError


class Severity(StrEnum):
    """What a finding means for the verdict."""

    HOSTILE = "hostile"  # the message is suspicious (or a virus): quarantine it
    INFO = "info"  # a fact for the policy layer (e.g. an executable attachment), not a verdict


@dataclass(frozen=True)
class RuleSpec:
    """One rule as written in the data, parameters resolved (``@list`` replaced)."""

    id: str
    kind: str
    severity: Severity
    summary: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it came from, for error messages


_ID = re.compile(r"^skeptic(\.[a-z0-9][a-z0-9_-]*)+$")


def load_specs(directory: Path) -> list[RuleSpec]:
    """Every enabled rule in ``directory``, in file order; raise RuleError on any problem."""
    if not directory.is_dir():
        raise RuleError(f"{directory}: no such rules directory")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".toml", ".json"))
    if not files:
        raise RuleError(f"{directory}: no *.toml or *.json rule files")
    lists: dict[str, Any] = {}
    raw_rules: dict[str, tuple[dict[str, Any], str]] = {}
    for path in files:
        doc = _read(path)
        file_lists = doc.get("lists", {})
        if not isinstance(file_lists, dict):
            raise RuleError(f"{path.name}: [lists] must be a table")
        lists.update(file_lists)
        rules = doc.get("rule", [])
        if not isinstance(rules, list):
            raise RuleError(f"{path.name}: 'rule' must be an array of tables ([[rule]])")
        for raw in rules:
            if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
                raise RuleError(f"{path.name}: every [[rule]] needs a string id")
            raw_rules[raw["id"]] = (raw, path.name)
    specs = []
    for rule_id, (raw, source) in raw_rules.items():
        if raw.get("enabled", True) is False:
            continue
        specs.append(_spec(rule_id, raw, source, lists))
    return specs


def _read(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".toml":
            with path.open("rb") as f:
                return tomllib.load(f)
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise RuleError(f"{path.name}: cannot read rules: {exc}") from exc
    if not isinstance(doc, dict):
        raise RuleError(f"{path.name}: top level must be an object")
    return doc


def _spec(rule_id: str, raw: dict[str, Any], source: str, lists: dict[str, Any]) -> RuleSpec:
    where = f"{source}: rule {rule_id}"
    if not _ID.match(rule_id):
        raise RuleError(f"{where}: id must look like skeptic.<area>.<name> (lower case)")
    try:
        severity = Severity(str(raw.get("severity")))
    except ValueError:
        raise RuleError(f"{where}: severity must be 'hostile' or 'info'") from None
    kind = raw.get("kind")
    if not isinstance(kind, str):
        raise RuleError(f"{where}: missing kind")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise RuleError(f"{where}: params must be a table")
    resolved = {key: _resolve(value, lists, where) for key, value in params.items()}
    return RuleSpec(rule_id, kind, severity, str(raw.get("summary", "")), resolved, source)


def _resolve(value: Any, lists: dict[str, Any], where: str) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        if value[1:] not in lists:
            raise RuleError(f"{where}: unknown list {value}")
        return lists[value[1:]]
    return value


class Params:
    """Typed access to a rule's parameters; every mistake names the rule."""

    def __init__(self, spec: RuleSpec) -> None:
        self._spec = spec
        self._values = spec.params

    def _get(self, key: str, default: Any) -> Any:
        if key in self._values:
            return self._values[key]
        if default is _REQUIRED:
            raise RuleError(f"{self._where}: missing parameter {key!r}")
        return default

    @property
    def _where(self) -> str:
        return f"{self._spec.source}: rule {self._spec.id} (kind {self._spec.kind})"

    def strings(self, key: str, default: Any = None) -> list[str]:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RuleError(f"{self._where}: {key!r} must be a list of strings")
        return value

    def lower_set(self, key: str, default: Any = None) -> frozenset[str]:
        return frozenset(v.lower() for v in self.strings(key, default))

    def regexes(
        self, key: str, default: Any = None, *, case_sensitive: bool = False
    ) -> list[re.Pattern[str]]:
        """Compiled regexes. Unless ``case_sensitive``, they run on lower-cased text (much
        faster than re.IGNORECASE), so literals must be written in lower case."""
        return self.compile(self.strings(key, default), key, case_sensitive=case_sensitive)

    def compile(
        self, patterns: Any, what: str, *, case_sensitive: bool = False
    ) -> list[re.Pattern[str]]:
        """``patterns`` (a list of regex strings from ``what``, e.g. a table's key) compiled,
        checked like ``regexes``."""
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise RuleError(f"{self._where}: {what!r} must be a list of strings")
        compiled = []
        for pattern in patterns:
            if not case_sensitive and _UPPER_LITERAL.search(_ESCAPE.sub("", pattern)):
                raise RuleError(
                    f"{self._where}: {what!r}: {pattern!r} has capital letters; patterns match "
                    "lower-cased text, write them in lower case (escapes like \\S are fine)"
                )
            try:
                compiled.append(re.compile(pattern))
            except re.error as exc:
                raise RuleError(
                    f"{self._where}: bad regex in {what!r}: {pattern!r}: {exc}"
                ) from exc
        return compiled

    def number(self, key: str, default: float | None = None) -> float:
        value = self._get(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RuleError(f"{self._where}: {key!r} must be a number")
        return float(value)

    def integer(self, key: str, default: int | None = None) -> int:
        value = self._get(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RuleError(f"{self._where}: {key!r} must be an integer")
        return value

    def string(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str) or (choices and value not in choices):
            allowed = f" (one of {', '.join(choices)})" if choices else ""
            raise RuleError(f"{self._where}: {key!r} must be a string{allowed}")
        return value

    def tables(self, key: str) -> list[dict[str, Any]]:
        value = self._get(key, _REQUIRED)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise RuleError(f"{self._where}: {key!r} must be an array of tables")
        return value

    def fail(self, message: str) -> RuleError:
        return RuleError(f"{self._where}: {message}")


_REQUIRED: Any = object()
_ESCAPE = re.compile(r"\\.|\(\?P?<[^>]*>|\(\?P=\w+\)")  # escapes and group names
_UPPER_LITERAL = re.compile(r"[A-Z]")
