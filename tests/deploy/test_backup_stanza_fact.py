"""The deploy around backups: the repository host's "is the first full backup due?"
(roles/backup.py StanzaBackups): only an explicit none makes one, and a failing `pgbackrest
info` fails the deploy with the host, the check and the fix instead of a full backup on every
deploy that meets a blip; and a SQL host a restore fenced is refused with the rebuild."""

from __future__ import annotations

import json
import pwd
import subprocess
from ipaddress import IPv4Address

import pytest
from pyinfra.api.exceptions import DeployError

from mailtower.controller import backup as controller_backup
from mailtower.settings import Backup
from roles import backup


def _info(code: int, message: str, backups: int) -> list[str]:
    entry = {
        "name": "tower-a",
        "status": {"code": code, "message": message},
        "backup": [{"label": f"b{i}", "type": "full"} for i in range(backups)],
    }
    return json.dumps([entry]).splitlines()


@pytest.mark.parametrize(
    ("output", "count"),
    [
        ([backup.NO_REPOSITORY], 0),  # the first deploy: no user pgbackrest yet
        (_info(1, "missing stanza path", 0), 0),
        (_info(2, "no valid backups", 0), 0),
        (_info(0, "ok", 3), 3),
        ([backup.INFO_FAILED], None),  # the blip that used to read as "none"
        ([], None),
        (_info(99, "other: [PathOpenError] unable to list file info", 0), None),
        (_info(5, "database mismatch across repos", 0), None),
        (["WARN: a line that is not JSON"], None),
    ],
)
def test_only_an_explicit_none_counts_as_no_backup(output: list[str], count) -> None:
    assert backup.StanzaBackups().process(output) == count


def test_the_fact_command_runs_here_without_a_repository() -> None:
    """This machine has no user pgbackrest: what a repository host's first deploy sees."""
    try:
        pwd.getpwnam("pgbackrest")
    except KeyError:
        pass
    else:
        pytest.skip("this machine has a user pgbackrest")
    command = backup.StanzaBackups().command("tower-a")
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    assert backup.StanzaBackups().process(out.stdout.splitlines()) == 0


def _stanza() -> backup.Stanza:
    pg = controller_backup.PgHost("10.0.0.12", "10.0.0.12", 8432)
    return backup.Stanza(
        "tower-a",
        Backup(tls_dir="/nonexistent", repo_host=IPv4Address("10.0.0.11")),
        (pg,),
        "10.0.0.11",
    )


def test_an_unknown_count_fails_the_deploy_naming_host_check_and_fix() -> None:
    with pytest.raises(DeployError) as exc:
        backup.check_backups(_stanza(), None)
    text = str(exc.value)
    assert text.startswith("10.0.0.11: ")
    assert "sudo -u pgbackrest pgbackrest --stanza=tower-a info" in text
    assert "deploy again" in text


def test_a_first_backup_is_due_only_when_the_repository_holds_none() -> None:
    assert backup.check_backups(_stanza(), 0) is True
    assert backup.check_backups(_stanza(), 2) is False


def test_a_deploy_refuses_a_fenced_sql_host_naming_the_rebuild() -> None:
    from roles import sql

    assert sql.PostgresMasked().process(["masked"]) is True
    assert sql.PostgresMasked().process(["masked-runtime"]) is True
    assert sql.PostgresMasked().process(["enabled"]) is False
    assert sql.PostgresMasked().process([]) is False  # the first deploy: no PostgreSQL yet
    sql.refuse_fenced("10.0.0.12", "tower-a", False)
    with pytest.raises(
        DeployError,
        match=r"^10\.0\.0\.12: PostgreSQL is masked.*"
        r"invoke sql\.rebuild --tower tower-a --host 10\.0\.0\.12",
    ):
        sql.refuse_fenced("10.0.0.12", "tower-a", True)
