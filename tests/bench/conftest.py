"""Benchmarks against a built tower (run by `invoke bench`, not by verify or CI)."""

from __future__ import annotations

import pytest
from towerlib import Mail


@pytest.fixture(scope="session")
def mail(tower) -> Mail:
    return Mail(tower)
