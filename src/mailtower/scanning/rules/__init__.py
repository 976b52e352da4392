"""Data files a tower can update: YARA rules (yara/), Skeptic rules (skeptic/) and reputation
lists (reputation/). The package holds the project's own; an installed rule bundle
(``mailtower.bundles``) replaces them as a whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RULES_DIR = Path(__file__).resolve().parent
YARA_DIR = RULES_DIR / "yara"
SKEPTIC_DIR = RULES_DIR / "skeptic"
REPUTATION_DIR = RULES_DIR / "reputation"


@dataclass(frozen=True)
class RuleDirs:
    """Where the in-process engines load their rules from, and which bundle that is."""

    yara: Path
    skeptic: Path
    reputation: Path
    bundle_version: int | None = None  # None: the rules shipped in the package

    @classmethod
    def packaged(cls) -> RuleDirs:
        return cls(YARA_DIR, SKEPTIC_DIR, REPUTATION_DIR)

    @classmethod
    def under(cls, root: Path, bundle_version: int | None = None) -> RuleDirs:
        """The sections of a bundle unpacked at ``root`` (root/yara, root/skeptic, …)."""
        return cls(root / "yara", root / "skeptic", root / "reputation", bundle_version)
