"""The backups' alerts (issue 19): the rules the monitor renders read exactly the metrics the
repository host's textfile has (mailtower.backup_metrics), promtool accepts them, and its
rule tests show each alert firing at its typed limit and not before."""

# ruff: noqa: E501  (promtool's expected annotations: the rules' one-line summaries, verbatim)
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import sample_settings
from needs import missing

from mailtower import backup_metrics
from mailtower.settings import Backup

BACKUP = {"tls_dir": "/t", "alert_full_age_h": 192, "alert_backup_age_h": 26}
H = 3600
NOW = 200 * H  # the rule test's evaluation time (its clock starts at 0)

PROMTOOL_TEST = f"""
rule_files: [backup.yml]
evaluation_interval: 5m
tests:
  - interval: 5m
    input_series:
      - series: 'mailtower_backup_metrics_timestamp_seconds{{instance="repo"}}'
        values: '{NOW - 60}x2500'
      - series: 'mailtower_backup_info_up{{instance="repo"}}'
        values: '1x2500'
      # stanza fresh: a full 191 h ago, a diff 25 h ago, WAL 20 minutes ago: no alert
      - series: 'mailtower_backup_status_code{{stanza="fresh"}}'
        values: '0x2500'
      - series: 'mailtower_backup_last_full_timestamp_seconds{{stanza="fresh"}}'
        values: '{NOW - 191 * H}x2500'
      - series: 'mailtower_backup_last_timestamp_seconds{{stanza="fresh"}}'
        values: '{NOW - 25 * H}x2500'
      - series: 'mailtower_backup_archive_last_push_timestamp_seconds{{stanza="fresh"}}'
        values: '{NOW - 1200}x2500'
      # stanza stale: never backed up (0), no WAL for 40 minutes, and not ok
      - series: 'mailtower_backup_status_code{{stanza="stale"}}'
        values: '2x2500'
      - series: 'mailtower_backup_last_full_timestamp_seconds{{stanza="stale"}}'
        values: '0x2500'
      - series: 'mailtower_backup_last_timestamp_seconds{{stanza="stale"}}'
        values: '0x2500'
      - series: 'mailtower_backup_archive_last_push_timestamp_seconds{{stanza="stale"}}'
        values: '{NOW - 2400}x2500'
    alert_rule_test:
      - eval_time: {NOW}s
        alertname: BackupTooOld
        exp_alerts:
          - exp_labels: {{severity: page, backup: full, stanza: stale}}
            exp_annotations:
              summary: "stanza stale: no full backup for 8d 8h 0m 0s (limit 192 h): see journalctl -u pgbackrest-full on the repository host"
          - exp_labels: {{severity: page, backup: any, stanza: stale}}
            exp_annotations:
              summary: "stanza stale: no backup for 8d 8h 0m 0s (limit 26 h): see journalctl -u pgbackrest-diff on the repository host"
      - eval_time: {NOW}s
        alertname: WalArchivingStalled
        exp_alerts:
          - exp_labels: {{severity: page, stanza: stale}}
            exp_annotations:
              summary: "stanza stale: no WAL archived for 40m 0s: point-in-time recovery stops there (pg_stat_archiver on the primary says why)"
      - eval_time: {NOW}s
        alertname: BackupRepositoryError
        exp_alerts:
          - exp_labels: {{severity: page, stanza: stale}}
            exp_annotations:
              summary: "backup repository : stanza stale not ok (pgbackrest info as user pgbackrest there says why)"
      - eval_time: {NOW}s
        alertname: BackupMetricsMissing
        exp_alerts: []
  - interval: 5m
    input_series:
      - series: 'up{{job="node"}}'
        values: '1x20'
    alert_rule_test:
      - eval_time: 60m
        alertname: BackupMetricsMissing
        exp_alerts:
          - exp_labels: {{severity: warn}}
            exp_annotations:
              summary: "no backup metrics from the repository host for 30 minutes (systemctl status mailtower-backup-metrics.timer there)"
"""


def _rules(render) -> str:
    s = sample_settings(backup=BACKUP)
    assert s.backup is not None
    return render("monitor/etc/prometheus/rules/backup.yml", s, backup=s.backup)


def test_the_rules_read_only_metrics_the_textfile_has(render) -> None:
    read = set(re.findall(r"mailtower_backup_[a-z_]+", _rules(render)))
    stanza = backup_metrics.StanzaInfo("goc", 0, "ok", 1.0, 2.0, {"full": 1}, None)
    written = set(
        re.findall(r"^(mailtower_backup_[a-z_]+)", backup_metrics.render([stanza], 3.0, {}), re.M)
    )
    assert read and read <= written, read - written


def test_prometheus_loads_the_backup_rules_only_with_backups(render) -> None:
    with_backup = render("monitor/etc/prometheus/prometheus.yml", sample_settings(backup=BACKUP))
    without = render("monitor/etc/prometheus/prometheus.yml", sample_settings())
    assert "/etc/prometheus/rules/backup.yml" in with_backup
    assert "backup.yml" not in without


def test_promtool_accepts_the_rules_and_each_alert_fires_past_its_limit(render, tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (package prometheus)")
    assert promtool
    (tmp_path / "backup.yml").write_text(_rules(render))
    (tmp_path / "test.yml").write_text(PROMTOOL_TEST)
    for args in (["check", "rules", "backup.yml"], ["test", "rules", "test.yml"]):
        proc = subprocess.run(
            [promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"promtool {args[0]}: {proc.stdout}{proc.stderr}"


def test_the_stall_limit_must_exceed_the_segment_switch() -> None:
    with pytest.raises(ValueError, match="twice archive_switch_s"):
        Backup(tls_dir="/t", archive_switch_s=600, alert_archive_stall_s=900)
    assert Backup(tls_dir="/t", archive_switch_s=0, alert_archive_stall_s=60)


@pytest.mark.parametrize(
    ("repo", "error"),
    [
        ("192.0.2.12", r"backup\.repo_host 192\.0\.2\.12 is not the monitor.*a SQL host"),
        ("192.0.2.50", r"backup\.repo_host 192\.0\.2\.50 is not the monitor 192\.0\.2\.11"),
    ],
)
def test_a_towers_repository_host_is_its_monitor(repo: str, error: str) -> None:
    """Only the monitor's role sets a repository up: another host would never be deployed."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=error):
        sample_settings(backup={**BACKUP, "repo_host": repo})
    monitor = sample_settings(backup={**BACKUP, "repo_host": "192.0.2.11"})
    assert str(monitor.backup_repo) == "192.0.2.11"
    assert str(sample_settings(backup=BACKUP).backup_repo) == "192.0.2.11"


GOC_METRICS = {"address": "198.51.100.25", "port": 9100}

PROMTOOL_GOC_TEST = f"""
rule_files: [backup.yml]
evaluation_interval: 5m
tests:
  # The GOC's stanza, scraped from its repository host (job goc_backup): its alerts fire too.
  - interval: 5m
    input_series:
      - series: 'mailtower_backup_metrics_timestamp_seconds{{job="node"}}'
        values: '{NOW - 60}x2500'
      - series: 'mailtower_backup_metrics_timestamp_seconds{{job="goc_backup"}}'
        values: '{NOW - 60}x2500'
      - series: 'mailtower_backup_last_full_timestamp_seconds{{job="goc_backup",stanza="goc"}}'
        values: '{NOW - 9 * 24 * H}x2500'
    alert_rule_test:
      - eval_time: {NOW}s
        alertname: BackupTooOld
        exp_alerts:
          - exp_labels: {{severity: page, backup: full, job: goc_backup, stanza: goc}}
            exp_annotations:
              summary: "stanza goc: no full backup for 9d 0h 0m 0s (limit 192 h): see journalctl -u pgbackrest-full on the repository host"
      - eval_time: {NOW}s
        alertname: BackupMetricsMissing
        exp_alerts: []
  # The GOC's repository host no longer scraped, the tower's own still there.
  - interval: 5m
    input_series:
      - series: 'mailtower_backup_metrics_timestamp_seconds{{job="node"}}'
        values: '0+300x20'
    alert_rule_test:
      - eval_time: 60m
        alertname: BackupMetricsMissing
        exp_alerts:
          - exp_labels: {{severity: warn, stanza: goc, job: goc_backup}}
            exp_annotations:
              summary: "no backup metrics from the GOC's repository host 198.51.100.25:9100 for 30 minutes (is prometheus-node-exporter running there, and mailtower-backup-metrics.timer?)"
"""


def test_a_tower_scraping_the_gocs_repository_alerts_on_its_stanza(render, tmp_path) -> None:
    s = sample_settings(backup=BACKUP, goc_backup_metrics=GOC_METRICS)
    conf = render("monitor/etc/prometheus/prometheus.yml", s)
    assert (
        '- job_name: goc_backup\n    static_configs:\n      - targets: ["198.51.100.25:9100"]'
        in conf
    )
    assert "goc_backup" not in render(
        "monitor/etc/prometheus/prometheus.yml", sample_settings(backup=BACKUP)
    )
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (package prometheus)")
    assert promtool
    (tmp_path / "backup.yml").write_text(
        render("monitor/etc/prometheus/rules/backup.yml", s, backup=s.backup)
    )
    (tmp_path / "test.yml").write_text(PROMTOOL_GOC_TEST)
    for args in (["check", "rules", "backup.yml"], ["test", "rules", "test.yml"]):
        proc = subprocess.run(
            [promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"promtool {args[0]}: {proc.stdout}{proc.stderr}"


def test_goc_backup_metrics_need_the_towers_backup() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="goc_backup_metrics needs backup"):
        sample_settings(goc_backup_metrics=GOC_METRICS)
