"""The GOC's backups (issue 19): the lab backs its GOC up to the twin lab's sender (and a
lab-a alone, which has no sender, not at all); a GOC must name a repository host; the
stanza's two sides admit each other for stanza goc alone, with the same code a tower's pair
uses (roles/backup.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mailtower.controller import backup as controller_backup
from mailtower.settings import GocSettings
from roles import backup


def _lab(monkeypatch, tmp_path: Path, *, sender: bool) -> None:
    from mailtower.controller.lab import lxc, plan

    monkeypatch.setattr(plan, "STATE_DIR", tmp_path / "lab")  # not the real lab's secrets
    monkeypatch.setattr(lxc, "LXC_DIR", tmp_path / "lxc")
    if sender:
        (tmp_path / "lxc" / "mt-sender").mkdir(parents=True)
        (tmp_path / "lxc" / "mt-sender" / "config").write_text("")


def test_the_twin_labs_goc_is_backed_up_to_the_sender(monkeypatch, tmp_path) -> None:
    from inventory._lab import goc_backup_groups, goc_data

    _lab(monkeypatch, tmp_path, sender=True)
    g = GocSettings.model_validate(goc_data())
    assert g.backup is not None and str(g.backup.repo_host) == "10.201.0.25"
    assert g.backup.tls_dir == str(tmp_path / "lab" / "pgbackrest-tls")
    assert [h for h, _ in goc_backup_groups()["goc_backup"]] == ["10.201.0.25"]
    stanza = backup.goc_stanza(g, "10.201.9.10")
    assert (stanza.name, stanza.repo, stanza.hosts) == (
        "goc",
        "10.201.0.25",
        ["10.201.9.10", "10.201.0.25"],
    )


def test_a_lab_without_the_sender_does_not_back_its_goc_up(monkeypatch, tmp_path) -> None:
    from inventory._lab import goc_backup_groups, goc_data

    _lab(monkeypatch, tmp_path, sender=False)
    assert GocSettings.model_validate(goc_data()).backup is None
    assert goc_backup_groups() == {"goc_backup": []}


def test_a_goc_names_its_repository_host(monkeypatch, tmp_path) -> None:
    from inventory._lab import goc_data

    _lab(monkeypatch, tmp_path, sender=True)
    data = goc_data()
    data["backup"] = {k: v for k, v in data["backup"].items() if k != "repo_host"}
    with pytest.raises(ValidationError, match="a GOC names its repository host"):
        GocSettings.model_validate(data)


def test_each_side_of_the_goc_stanza_admits_only_the_other_for_goc(monkeypatch, tmp_path) -> None:
    from inventory._lab import goc_data

    _lab(monkeypatch, tmp_path, sender=True)
    g = GocSettings.model_validate(goc_data())
    assert g.backup is not None
    stanza = backup.goc_stanza(g, "10.201.9.10")
    (pg,) = stanza.pg_hosts
    repo = controller_backup.render(
        controller_backup.repo_sections(
            stanza.name,
            [pg],
            stanza.repo,
            g.backup.port,
            repo_path="/r",
            retention_full=2,
            retention_diff=6,
        ),
        "t",
    )
    db = controller_backup.render(
        controller_backup.db_sections(stanza.name, pg, stanza.repo, stanza.repo, g.backup.port),
        "t",
    )
    assert "tls-server-auth=10.201.9.10=goc\n" in repo and "pg1-host=10.201.9.10\n" in repo
    assert "pg2" not in repo and f"pg1-port={g.port}\n" in repo
    assert "tls-server-auth=10.201.0.25=goc\n" in db and "repo1-host=10.201.0.25\n" in db
    # Archiving of the GOC: every minute a segment with writes in it (the lab's tests wait).
    assert controller_backup.switch_settings(g.backup.archive_switch_s) == (
        "# A segment with writes is archived after this at the latest (docs/runbook.md).\n"
        "archive_timeout = 60s\n"
    )
    assert "--stanza=goc archive-push %p" in controller_backup.archive_settings(stanza.name)


def test_the_gocs_repository_host_serves_its_metrics_to_tower_a(monkeypatch, tmp_path) -> None:
    """The sender's node exporter (its backup textfile) on its address; tower A's monitor
    scrapes it (job goc_backup), tower B's does not; a lab without the sender scrapes none."""
    from inventory._lab import goc_data, lab_tower_data
    from roles import goc
    from roles._common import NODE_EXPORTER

    _lab(monkeypatch, tmp_path, sender=True)
    g = GocSettings.model_validate(goc_data())
    assert NODE_EXPORTER in goc.REPOSITORY_PACKAGES
    args = goc.repository_exporter_args(g, "10.201.0.25")
    assert f'ARGS="--web.listen-address=10.201.0.25:{g.backup_exporter_port}"' in args
    assert lab_tower_data("a")["goc_backup_metrics"] == {
        "address": "10.201.0.25",
        "port": g.backup_exporter_port,
    }
    assert "goc_backup_metrics" not in lab_tower_data("b")
    (tmp_path / "lxc" / "mt-sender" / "config").unlink()  # a lab-a alone: no sender
    assert lab_tower_data("a").get("goc_backup_metrics") is None
