"""Shared pytest options: which tower verification runs against."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tower", default="lab-a", help="tower to verify: inventory/<tower>.py")


@pytest.fixture(scope="session")
def tower(request: pytest.FixtureRequest):
    from towerlib import Tower

    return Tower(request.config.getoption("--tower"))


@pytest.fixture(autouse=True)
def _lab_inventories_of_the_repo(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Unit and deploy tests load the repository's lab inventories, whatever lab this machine
    runs (a lab deployed from init's inventories records that in .lab/); tests of that choice
    set it themselves."""
    if request.node.path.parent.name in ("unit", "deploy"):
        monkeypatch.setenv("MAILTOWER_LAB_INVENTORY", "repo")
