"""SQL pair: PostgreSQL 15 primary + hot standby (streaming replication) holding customer
domains, routes and policy, and the verdict events of the tower."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.facts.files import File
from pyinfra.operations import files, postgres, server

from mailtower.controller.sqlpair import clone_commands, standby_slot
from mailtower.goc.sync.deployed import TowerSide
from mailtower.goc.sync.names import goc_sync_role
from roles import _common, backup
from roles._common import put_text, settings, template
from roles._facts import PostgresPasswordVerifiers, SyncPending, scram_matches

PG = "/etc/postgresql/15/main"
DATA = "/var/lib/postgresql/15/main"
SERVICE = "postgresql@15-main"


PACKAGES = ["postgresql-15", "python3-venv", "nftables", _common.NODE_EXPORTER, *backup.PACKAGES]


def install():
    """The mailtower wheel, on both hosts of a tower synced with a GOC (a promoted standby runs
    the same sync); None: a tower on its own needs none here."""
    if settings().goc is None:
        return None
    _common.service_user()
    return _common.install_stack()


def configure() -> dict[str, list]:
    s = settings()
    ops: dict[str, list] = {}
    ops["nftables"] = [template("sql/etc/nftables.conf")]
    ops["node_exporter"] = [_common.node_exporter_config()]
    ops["postgres"] = [
        template("sql/etc/postgresql/15/main/conf.d/mailtower.conf"),
        template(
            "sql/etc/postgresql/15/main/pg_hba.conf", mode="640", user="postgres", group="postgres"
        ),
        # Replication password for whichever host is the standby (either, after a failover).
        put_text(
            f"*:{s.ports.postgres}:*:replicator:{s.secret('sql_replication')}\n",
            "/var/lib/postgresql/.pgpass",
            mode="600",
            user="postgres",
            group="postgres",
        ),
    ]
    ops["sync"] = _sync_settings() if s.goc is not None else []
    if s.backup is not None:
        # WAL archiving is PostgreSQL's own setting (a change restarts it, as archive_mode needs).
        ops["postgres"] += backup.db_archive(backup.tower_stanza())
    ops["backup"] = backup.db_configure(backup.tower_stanza()) if s.backup is not None else []
    return ops


def activate(ops: dict[str, list], install_op) -> None:
    """The primary first (PostgreSQL, roles, schema, the sync with the GOC), then the standby
    is cloned from it."""
    changed = {k: _common.changes(v) for k, v in ops.items()}
    _common.activate_nftables(changed["nftables"])
    if settings().backup is not None:
        backup.db_activate(changed["backup"])  # before the repository host's first backup
    _common.activate_node_exporter(changed["node_exporter"])
    primary = _common.is_primary()
    if primary:
        _primary(changed["postgres"])
        if install_op is not None:
            _sync(lambda: changed["sync"]() or install_op.did_change())
    _common.barrier("SQL primary ready for its standby")
    if not primary:
        _standby(changed["postgres"])


def _primary(changed):
    s = settings()
    _common.activate(SERVICE, changed)
    roles = {
        "mailtower_relay": s.secret("sql_relay"),
        "mailtower_scanner": s.secret("sql_scanner"),
        "mailtower_monitor": s.secret("sql_monitor"),
    }
    roles["replicator"] = s.secret("sql_replication")
    verifiers = host.get_fact(PostgresPasswordVerifiers) or {}
    for role, password in roles.items():
        # Set the password only when the stored one differs: no change on a redeploy.
        postgres.role(
            name=f"Ensure SQL role {role}",
            role=role,
            login=True,
            replication=role == "replicator",
            password=None if scram_matches(verifiers.get(role), password) else password,
            _su_user="postgres",
        )
    postgres.database(
        name=f"Ensure database {s.sql_database}",
        database=s.sql_database,
        owner="postgres",
        _su_user="postgres",
    )
    schema = template("sql/etc/mailtower/sql/schema.sql")
    server.shell(
        name="Apply the schema",
        # One transaction: all of it or none, and its triggers are never seen half replaced
        # (CREATE OR REPLACE TRIGGER resets ENABLE ALWAYS until the next statement).
        commands=[
            f"psql --single-transaction -v ON_ERROR_STOP=1 -q -d {s.sql_database}"
            " -f /etc/mailtower/sql/schema.sql"
        ],
        _su_user="postgres",
        _if=schema.did_change,
    )
    if s.goc is not None:
        return  # customers come from the GOC (_sync)
    customers = template("sql/etc/mailtower/sql/customers.sql")
    server.shell(
        name="Apply the tower's customers from its settings (no GOC)",
        commands=[
            f"psql -v ON_ERROR_STOP=1 -q -d {s.sql_database} -f /etc/mailtower/sql/customers.sql"
        ],
        _su_user="postgres",
        _if=lambda: schema.did_change() or customers.did_change(),
    )


def _sync_settings() -> list:
    """Both hosts get the sync tool's settings: a promoted standby runs the same command."""
    s = settings()
    files.directory(name="Ensure /etc/mailtower/sync", path="/etc/mailtower/sync", mode="755")
    side = TowerSide(
        tower=s.name,
        dsn=f"dbname={s.sql_database} port={s.ports.postgres}",
        goc_conninfo=s.goc_conninfo(goc_sync_role(s.name), s.secrets.goc_sync or ""),
        sync_password=s.secrets.sql_sync or "",
    )
    config = put_text(
        side.model_dump_json(indent=2) + "\n",
        "/etc/mailtower/sync/tower.json",
        mode="600",
        user="postgres",
        group="postgres",
    )
    return [config]


def _sync(changed):
    """Events publication and config subscription on the primary (mailtower sync tower)."""
    pending = host.get_fact(SyncPending, side="tower")
    server.shell(
        name="Sync with the GOC: events publication, config subscription (mailtower sync tower)",
        commands=["cd /tmp && su postgres -c '/opt/mailtower/venv/bin/mailtower sync tower'"],
        _if=lambda: bool(pending) or changed(),
    )


def _standby(changed):
    s = settings()
    # A fresh standby is cloned from the primary once; afterwards it follows by streaming.
    slot = standby_slot(host_address())  # keeps WAL until the standby has it
    need_clone = host.get_fact(File, path=f"{DATA}/standby.signal") is None
    server.shell(
        name=f"Clone the standby from the primary {s.sql_primary}",
        commands=clone_commands(str(s.sql_primary), s.ports.postgres, slot),
        _if=lambda: need_clone,
    )
    _common.activate(SERVICE, lambda: changed() and not need_clone)


def host_address() -> str:
    return _common.address(host)


class PostgresMasked(FactBase):
    """Whether PostgreSQL is masked here: a restore fenced this host (controller/backup.py)."""

    def command(self) -> str:
        return f"systemctl is-enabled {SERVICE} 2>/dev/null || true"

    def process(self, output) -> bool:
        return "\n".join(output).strip() in ("masked", "masked-runtime")


def refuse_fenced(address: str, tower: str, masked: bool) -> None:
    """A fenced host is not deployed: neither as the primary (its data is the old one), nor as
    the standby (sql.rebuild clones it, unmasked, from the restored primary)."""
    if masked:
        raise DeployError(
            f"{address}: PostgreSQL is masked here: sql.restore fenced this host after restoring"
            " another SQL host as the primary. List the restored host first in the inventory's"
            f" sql group, run `invoke sql.rebuild --tower {tower} --host {address}` (it unmasks"
            " and clones it as the standby), then deploy again"
        )


@deploy("mailtower sql")
def deploy_sql():
    refuse_fenced(host_address(), settings().name, bool(host.get_fact(PostgresMasked)))
    install_op = install()
    activate(configure(), install_op)
