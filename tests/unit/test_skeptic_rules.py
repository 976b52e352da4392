"""Skeptic: rule data loading, overrides, errors, severities and fail-closed behaviour."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import skeptic_fixtures as fx

from mailtower.scanning.engines import Finding
from mailtower.scanning.skeptic import (
    INTERNAL_ERROR,
    RuleError,
    Severity,
    Skeptic,
    shipped_rules_dir,
)
from mailtower.scanning.testdata import eicar


def test_shipped_rules_load_and_name_every_area() -> None:
    skeptic = Skeptic.from_rules()
    ids = {r.id for r in skeptic.rules}
    for prefix in (
        "skeptic.disguised-exe.",
        "skeptic.vuln.",
        "skeptic.macro.",
        "skeptic.obfuscation.",
    ):
        assert any(i.startswith(prefix) for i in ids), prefix
    assert "skeptic.known-worm" in ids and "skeptic.anomaly" in ids
    assert shipped_rules_dir().is_dir()


def test_severity_of_suffixed_and_foreign_names() -> None:
    skeptic = Skeptic.from_rules()
    assert skeptic.severity("skeptic.known-worm.synthetic-massmailer-vbs") is Severity.HOSTILE
    assert skeptic.severity("skeptic.macro.present") is Severity.INFO
    assert skeptic.severity("Mailtower.Test.EICAR") is None


def test_eicar_named_com_is_only_an_executable_attachment() -> None:
    findings = Skeptic.from_rules().examine(fx.analysis(fx.obj(eicar(), names=("eicar.com",))))
    assert findings == [Finding("skeptic", "skeptic.executable-attachment", "1.2")]


def write(directory: Path, name: str, text: str) -> None:
    (directory / name).write_text(text, encoding="utf-8")


RULE = """
[[rule]]
id = "skeptic.test.marker"
kind = "pattern"
severity = "hostile"
[rule.params]
scope = "text"
any = ["{pattern}"]
"""


def test_a_tower_adds_a_rule_as_data(tmp_path: Path) -> None:
    # Patterns match lower-cased text: the rule finds the marker whatever its case.
    write(tmp_path, "local.toml", RULE.format(pattern="mailtower-test-signature"))
    skeptic = Skeptic.from_rules(tmp_path)
    findings = skeptic.examine(fx.analysis(fx.obj("x MAILTOWER-TEST-SIGNATURE-7f3c1a9e y")))
    assert findings == [Finding("skeptic", "skeptic.test.marker", "1.2")]
    assert skeptic.examine(fx.analysis(fx.obj("nothing here"))) == []


def test_later_files_override_lists_and_rules(tmp_path: Path) -> None:
    for path in shipped_rules_dir().iterdir():
        shutil.copy(path, tmp_path / path.name)
    write(tmp_path, "zz-local.toml", '[lists]\nexecutable-extensions = ["exe"]\n')
    skeptic = Skeptic.from_rules(tmp_path)
    js = fx.obj("var a = 1;", names=("app.js",))
    assert skeptic.examine(fx.analysis(js)) == []  # .js no longer counts as executable here
    write(
        tmp_path,
        "zz-local.toml",
        '[[rule]]\nid = "skeptic.executable-attachment"\nenabled = false\n',
    )
    skeptic = Skeptic.from_rules(tmp_path)
    assert "skeptic.executable-attachment" not in {r.id for r in skeptic.rules}


def test_json_rule_files_work(tmp_path: Path) -> None:
    doc = {
        "rule": [
            {
                "id": "skeptic.test.json",
                "kind": "name-pattern",
                "severity": "info",
                "params": {"patterns": ["^secret"]},
            }
        ]
    }
    write(tmp_path, "r.json", json.dumps(doc))
    findings = Skeptic.from_rules(tmp_path).examine(
        fx.analysis(fx.obj(b"x", names=("secret.txt",)))
    )
    assert [f.name for f in findings] == ["skeptic.test.json"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (RULE.replace('kind = "pattern"', 'kind = "telepathy"'), "unknown kind"),
        (RULE.format(pattern="(unclosed"), "bad regex"),
        (RULE.format(pattern="WScript"), "capital letters"),
        (RULE.replace('severity = "hostile"', 'severity = "mild"'), "severity"),
        (RULE.replace('scope = "text"', 'scope = "everywhere"'), "scope"),
        (RULE.replace('["{pattern}"]', '"@no-such-list"'), "unknown list"),
        (RULE.replace("skeptic.test.marker", "Test Marker"), "id must look like"),
        ("[[rule]\nbroken", "cannot read"),
    ],
)
def test_bad_rule_data_fails_the_whole_load(tmp_path: Path, text: str, message: str) -> None:
    write(tmp_path, "bad.toml", text.replace("{pattern}", "x"))
    with pytest.raises(RuleError, match=message):
        Skeptic.from_rules(tmp_path)


def test_missing_or_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="no such"):
        Skeptic.from_rules(tmp_path / "absent")
    with pytest.raises(RuleError, match="no \\*.toml"):
        Skeptic.from_rules(tmp_path)


def test_a_rule_that_crashes_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    skeptic = Skeptic.from_rules()
    rule = next(r for r in skeptic.rules if r.id == "skeptic.vuln.html-autorun")

    def boom(subject):
        raise ValueError("bug")

    monkeypatch.setattr(rule.kind, "check", boom)
    findings = skeptic.examine(fx.analysis(fx.obj("<html></html>")))
    assert Finding("skeptic", INTERNAL_ERROR, "1.2") in findings
    assert skeptic.severity(INTERNAL_ERROR) is Severity.HOSTILE


def test_an_empty_message_has_no_findings() -> None:
    assert Skeptic.from_rules().examine(fx.analysis()) == []
