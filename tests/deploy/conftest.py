"""Deploy tests: render the roles' templates from settings, with no hosts."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from mailtower.settings import TowerSettings

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"


def sample_settings(scanners: int = 23, **overrides) -> TowerSettings:
    data = {
        "name": "tower-x",
        "hostname": "mx.tower-x.example.net",
        "hosts": {
            "relay": "192.0.2.10",
            "monitor": "192.0.2.11",
            "sql": ["192.0.2.12", "192.0.2.13"],
            "scanners": [f"192.0.2.{100 + i}" for i in range(1, scanners + 1)],
        },
        "customers": [{"domain": "customer.example", "server": "mail.customer.example"}],
        "secrets": {
            k: "s3cret-password-0123456789"
            for k in ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication")
        },
        **overrides,
    }
    return TowerSettings.model_validate(data)


@pytest.fixture
def settings() -> TowerSettings:
    return sample_settings()


@pytest.fixture
def render():
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )

    def _render(path: str, s: TowerSettings, **data) -> str:
        return env.get_template(f"{path}.j2").render(settings=s, **data)

    return _render


def all_templates() -> list[str]:
    return sorted(str(p.relative_to(TEMPLATES))[:-3] for p in TEMPLATES.rglob("*.j2"))
