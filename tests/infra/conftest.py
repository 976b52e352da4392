"""testinfra per role: each module names its inventory group in ``GROUP``; tests get ``node``."""

from __future__ import annotations

import pytest


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "node_name" not in metafunc.fixturenames:
        return
    from towerlib import Tower

    tower = Tower(metafunc.config.getoption("--tower"))
    group = metafunc.module.GROUP
    names = [h.name for h in tower.hosts(group)]
    if hasattr(metafunc.module, "PICK"):
        names = metafunc.module.PICK(names)
    metafunc.parametrize("node_name", names, scope="module")


@pytest.fixture(scope="module")
def node(tower, node_name):
    return tower.node(node_name)
