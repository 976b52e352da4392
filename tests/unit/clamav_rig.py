"""Settings and a fake freshclam for the tests of scand's official ClamAV database requests."""

from __future__ import annotations

import json
import sys
from ipaddress import IPv4Address
from pathlib import Path

from scand_fakes import make_settings

from mailtower.scand import clamav_apply
from mailtower.settings import ClamavMirror, Goc, TowerSettings

CANARY = "canary-secret-0123456789"

FAKE_FRESHCLAM = """\
import json, shutil, sys
from pathlib import Path
plan = json.loads(Path({plan!r}).read_text())
staged = Path({staged!r})
for name in plan.get("remove", []):
    (staged / name).unlink(missing_ok=True)
for name, source in plan.get("copy", {{}}).items():
    shutil.copyfile(source, staged / name)
Path({calls!r}).open("a").write(" ".join(sys.argv[1:]) + "\\n")
print(plan.get("say", "test.cld updated"))
sys.exit(plan.get("rc", 0))
"""


def clamav_settings(tmp_path: Path, databases: list[str], **kwargs: object) -> TowerSettings:
    base = make_settings(tmp_path / "spool", reinject_port=9, **kwargs)  # type: ignore[arg-type]
    secrets = {"canary": CANARY, "sql_sync": "y" * 16, "goc_sync": "g" * 16}
    return base.model_copy(
        update={
            "engines": [],
            "clamav_db_dir": str(tmp_path / "live"),
            "goc": Goc(address=IPv4Address("127.0.0.9")),
            "clamav": ClamavMirror(databases=databases, engine_mib=64, working_set_mib=64),
            "secrets": base.secrets.model_copy(update={**secrets, "goc_status": "t" * 16}),
        }
    )


class FakeFreshclam:
    """A freshclam stand-in: each run copies the planned files into the staging directory,
    prints ``say`` and exits with ``rc``; ``calls`` holds the argument lines it was given."""

    def __init__(self, tmp_path: Path, staged: Path) -> None:
        self.plan_path = tmp_path / "freshclam-plan.json"
        self.calls_path = tmp_path / "freshclam-calls"
        self.program = tmp_path / "freshclam"
        self.program.write_text(
            f"#!{sys.executable}\n"
            + FAKE_FRESHCLAM.format(
                plan=str(self.plan_path), staged=str(staged), calls=str(self.calls_path)
            )
        )
        self.program.chmod(0o755)
        self.plan()

    def plan(
        self,
        copy: dict[str, Path] | None = None,
        *,
        remove: list[str] | None = None,
        say: str = "test.cld updated",
        rc: int = 0,
    ) -> None:
        doc = {"copy": {k: str(v) for k, v in (copy or {}).items()}, "remove": remove or []}
        self.plan_path.write_text(json.dumps({**doc, "say": say, "rc": rc}))

    @property
    def calls(self) -> list[str]:
        return self.calls_path.read_text().splitlines() if self.calls_path.exists() else []


def paths(tmp_path: Path, freshclam: str = "/usr/bin/freshclam") -> clamav_apply.Paths:
    live, staged, previous = tmp_path / "live", tmp_path / "staged", tmp_path / "previous"
    for d in (live, staged, previous):
        d.mkdir(exist_ok=True)
    return clamav_apply.Paths(live, staged, previous, tmp_path / "freshclam.conf", freshclam)
