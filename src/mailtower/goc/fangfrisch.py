"""Fangfrisch's configuration at the GOC: third-party ClamAV feeds, each off by default.

Fangfrisch (pinned, its own venv, run by ``mtcvd`` in the cvdupdate timer's script before
publish) knows its providers' URLs and checks (sanesecurity, urlhaus, securiteinfo,
malwarepatrol, …: each a section of its built-in configuration, disabled unless enabled). The
rendered file enables exactly the settings' enabled feeds, with their options (``prefix``,
``auth_key``, ``customer_id``, ``receipt``, ``url_*``, ``integrity_check``, …), and gives each
its own ``local_directory`` :data:`FEEDS_DIR`/<feed>, which ``mailtower clamavdb publish
--feeds-dir`` reads. See docs/runbook.md, "Third-party feeds".
"""

from __future__ import annotations

from mailtower.settings import ClamavUpstream

HOME = "/var/lib/mailtower/fangfrisch"  # mtcvd's: the refresh log database and the feeds
CONFIG = "/etc/mailtower/fangfrisch.conf"
FEEDS_DIR = f"{HOME}/feeds"
DB_URL = f"sqlite:///{HOME}/db.sqlite"


def enabled(upstream: ClamavUpstream | None) -> list[str]:
    """The names of the enabled feeds."""
    return sorted(f.name for f in (upstream.feeds if upstream else []) if f.enabled)


def config_text(upstream: ClamavUpstream, home: str = HOME) -> str:
    """fangfrisch.conf: its [DEFAULT] and one section per enabled feed (the others stay off,
    as Fangfrisch's own defaults have them)."""
    lines = [
        "# Managed by mailtower (roles/goc.py, mailtower.goc.fangfrisch): the GOC's clamav.feeds",
        "[DEFAULT]",
        f"db_url = sqlite:///{home}/db.sqlite",
        "log_method = console",
        "log_level = WARNING",  # every line logged is a failed download or check
        "cleanup = automatic",
        "",
    ]
    for feed in sorted(upstream.feeds, key=lambda f: f.name):
        if not feed.enabled:
            continue
        lines += [f"[{feed.name}]", "enabled = yes", f"local_directory = {home}/feeds/{feed.name}"]
        lines += [f"{key} = {value}" for key, value in sorted(feed.options.items())]
        lines.append("")
    return "\n".join(lines)
