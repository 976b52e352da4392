"""End to end: real SMTP from this controller to the tower's relay, read back at the customer."""

from __future__ import annotations

from pathlib import Path

import pytest
from towerlib import ROOT, Mail


@pytest.fixture(scope="session")
def mail(tower) -> Mail:
    return Mail(tower)


@pytest.fixture(scope="session")
def workdir() -> Path:
    path = ROOT / "tests" / "output"
    path.mkdir(parents=True, exist_ok=True)
    return path
