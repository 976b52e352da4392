"""Load a bundle's rules exactly as scand will, so a bundle that would not load is refused."""

from __future__ import annotations

from pathlib import Path

from mailtower.bundles import _canary, _clamav
from mailtower.bundles._errors import InvalidRules
from mailtower.bundles._format import SECTIONS
from mailtower.scanning.rules import RuleDirs


def check_rules(root: Path) -> None:
    """Compile / parse every section under ``root``; raise InvalidRules naming file and line.

    ``root`` has every section directory (an unpacked bundle). YARA and Skeptic must each load
    at least one rule: an installed bundle replaces the shipped rules as a whole.
    """
    # The engines' modules are heavy (yara, tlsh, oletools): loaded only when checking.
    from mailtower.scanning.engines import reputation as reputation_mod
    from mailtower.scanning.engines.yara import compile_rules
    from mailtower.scanning.errors import EngineError, RuleError
    from mailtower.scanning.skeptic import Skeptic

    dirs = RuleDirs.under(root)
    prefix = f"{root}/"
    checks = (
        ("yara", lambda: compile_rules([dirs.yara])),
        ("skeptic", lambda: Skeptic.from_rules(dirs.skeptic)),
        ("reputation", lambda: reputation_mod.load([dirs.reputation])),
    )
    for section, check in checks:
        try:
            check()
        except (EngineError, RuleError) as exc:
            raise InvalidRules(f"{section}: {str(exc).replace(prefix, '')}") from exc
        except Exception as exc:  # a loader crashing on the data: the data is not loadable
            raise InvalidRules(f"{section}: loading failed: {type(exc).__name__}: {exc}") from exc
    _clamav.check_directory(root / "clamav")
    _canary.check_directory(root / _canary.SECTION)


def make_sections(root: Path) -> None:
    """Create every section directory under ``root`` (an absent section is an empty one)."""
    for section in SECTIONS:
        (root / section).mkdir(parents=True, exist_ok=True)
