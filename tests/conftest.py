"""Shared pytest options: which tower verification runs against."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tower", default="lab-a", help="tower to verify: inventory/<tower>.py")


@pytest.fixture(scope="session")
def tower(request: pytest.FixtureRequest):
    from towerlib import Tower

    return Tower(request.config.getoption("--tower"))
