"""Data files a tower can update: YARA rules (yara/) and reputation lists (reputation/)."""

from __future__ import annotations

from pathlib import Path

RULES_DIR = Path(__file__).resolve().parent
YARA_DIR = RULES_DIR / "yara"
REPUTATION_DIR = RULES_DIR / "reputation"
