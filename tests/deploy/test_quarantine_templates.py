"""The quarantine manager's share of the monitor's templates: its alerts, and that their
expressions read what the monitor exports; the relay lets the monitor re-inject."""

from __future__ import annotations

import re

from mailtower.settings import Goc


def alerts(render, s) -> dict[str, dict[str, str]]:
    """Alert name → its fields (the one-line ones) in the rendered rules file."""
    text = render("monitor/etc/prometheus/rules/mailtower.yml", s)
    blocks = re.split(r"\n(?=      - alert: )", text)[1:]
    found = {}
    for block in blocks:
        fields = dict(re.findall(r"^\s+(\w+): (.*)$", block, re.M))
        found[block.split()[2]] = fields
    return found


def test_the_manager_alerts_and_requests_alert_only_with_a_goc(render, settings):
    plain = alerts(render, settings)
    with_goc = alerts(render, settings.model_copy(update={"goc": Goc(address="10.0.9.10")}))
    assert "QuarantineManagerFailing" in plain and "QuarantineManagerFailing" in with_goc
    assert "QuarantineRequestsWaiting" not in plain  # no GOC, no portal, no requests
    waiting = with_goc["QuarantineRequestsWaiting"]
    assert waiting["expr"] == "mailtower_quarantine_requests_pending > 0"
    failing = plain["QuarantineManagerFailing"]["expr"]
    # Prometheus owns the label "job": the manager's passes are labelled "pass"
    assert "by (pass)" in failing and "mailtower_quarantine_failures_total" in failing


def test_the_monitor_unit_is_unchanged_by_the_manager(render, settings):
    """The manager is a task of mailtower-monitor: no unit, port or scrape job of its own."""
    unit = render("monitor/etc/systemd/system/mailtower-monitor.service", settings)
    assert "ExecStart=/opt/mailtower/venv/bin/mailtower-monitor " in unit
    assert "NoNewPrivileges=yes" in unit and "ProtectSystem=strict" in unit
    scrape = render("monitor/etc/prometheus/prometheus.yml", settings)
    assert len(re.findall(rf":{settings.ports.monitor_http}\b", scrape)) >= 1
