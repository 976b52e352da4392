"""The relay's recipient maps, rendered from its real templates and queried by real Postfix
(postmap, the pgsql client Postfix's proxymap uses) against a real PostgreSQL with the
tower's schema: which recipients exist (relay_recipient_maps) and which domains are verified
with the customer's server (check_recipient_access)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pgclusters  # tests/ is on sys.path (rootdir conftest)
import pytest
from needs import missing

from mailtower.settings import TowerSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"
SCHEMA = TEMPLATES / "sql/etc/mailtower/sql/schema.sql.j2"
TOWER_ROLES = ("mailtower_relay", "mailtower_scanner", "mailtower_monitor")
POSTMAP = "/usr/sbin/postmap"
PASSWORD = "relay-pw-0123456789"
DEAD_SQL = "127.0.0.2"  # the settings' second SQL host: nothing listens there

# Issue 17's shape of the tables (SPEC-17): a policy as JSON, and the listed recipients.
# Idempotent, so it is a no-op once the tower schema has it.
SPEC_17 = """
ALTER TABLE policies ADD COLUMN IF NOT EXISTS policy jsonb NOT NULL DEFAULT '{}'::jsonb;
CREATE TABLE IF NOT EXISTS recipients (
    address     text PRIMARY KEY CHECK (address = lower(address)),
    domain      text NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS recipients_domain ON recipients (domain);
GRANT SELECT ON recipients TO mailtower_relay;
"""

# customer → (recipient_check or None: no policies row, domains, active)
CUSTOMERS: dict[str, tuple[str | None, list[str], bool]] = {
    "listco": ("list", ["list.example"], True),
    "verifyco": ("verify", ["verify.example"], True),
    "noneco": ("none", ["none.example"], True),
    "defaultco": (None, ["default.example"], True),  # no policies row: the default policy
    "emptyco": ("", ["empty.example"], True),  # a policy without recipient_check
    "goneco": ("none", ["gone.example"], False),
    "golistco": ("list", ["golist.example"], False),
    "goverifyco": ("verify", ["goverify.example"], False),
}
LISTED = ["alice@list.example", "bob@list.example", "carol@golist.example", "o'brien@list.example"]


def _settings(port: int) -> TowerSettings:
    return TowerSettings.model_validate(
        {
            "name": "tower-m",
            "hostname": "mx.tower-m.test",
            # The second SQL host has nothing listening: Postfix must try the other one.
            "hosts": {
                "relay": "127.0.0.10",
                "monitor": "127.0.0.11",
                "sql": ["127.0.0.1", DEAD_SQL],
                "scanners": ["127.0.0.5"],
            },
            "ports": {"postgres": port},
            "customers": [{"domain": "list.example", "server": "127.0.0.9"}],
            "secrets": {
                "sql_relay": PASSWORD,
                "sql_scanner": "x" * 20,
                "sql_monitor": "y" * 20,
                "sql_replication": "z" * 20,
            },
        }
    )


@pytest.fixture(scope="module")
def maps() -> Iterator[dict[str, Path]]:
    """The relay's pgsql maps as files, over a cluster with the schema and CUSTOMERS."""
    if not Path(POSTMAP).exists():
        missing("postmap (package postfix)", module=True)
    if not Path(pgclusters.PG_BIN / "initdb").exists():
        missing("PostgreSQL 15 (package postgresql-15)", module=True)
    workdir = pgclusters.make_workdir("mailtower-relaymaps-")
    cluster = pgclusters.Cluster.create("relaymaps", workdir)
    try:
        with cluster.connect() as conn:
            for role in TOWER_ROLES:
                conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
            conn.execute(SCHEMA.read_text().encode())
            conn.execute(SPEC_17.encode())
            _load(conn)
        s = _settings(cluster.port)
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
        )
        conf = workdir / "postfix"
        conf.mkdir()
        # postmap reads main.cf from -c; pgsql support comes from /etc/postfix/dynamicmaps.cf.
        (conf / "main.cf").write_text("compatibility_level = 3.6\n")
        files = {}
        for name in ("relay_recipients", "recipient_check", "relay_domains", "transport"):
            path = conf / f"{name}.cf"
            path.write_text(
                env.get_template(f"relay/etc/postfix/pgsql/{name}.cf.j2").render(settings=s)
            )
            files[name] = path
        yield files
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def _load(conn: Any) -> None:
    for customer, (check, domains, active) in CUSTOMERS.items():
        cid = conn.execute(
            "INSERT INTO customers (name) VALUES (%s) RETURNING id", (customer,)
        ).fetchone()[0]
        for domain in domains:
            conn.execute(
                "INSERT INTO domains (name, customer_id, active) VALUES (%s, %s, %s)",
                (domain, cid, active),
            )
        if check is not None:
            policy = f'{{"recipient_check": "{check}"}}' if check else "{}"
            conn.execute(
                "INSERT INTO policies (customer_id, policy) VALUES (%s, %s::jsonb)", (cid, policy)
            )
    for address in LISTED:
        conn.execute(
            "INSERT INTO recipients (address, domain) VALUES (%s, %s)",
            (address, address.split("@")[1]),
        )


def _query(table: Path, key: str) -> str | None:
    """postmap -q KEY pgsql:TABLE: the value, None when not found; a failure fails the test."""
    proc = subprocess.run(
        [POSTMAP, "-c", str(table.parent), "-q", key, f"pgsql:{table}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # 0: found, 1: not found; anything else (or a warning) is a broken map or query.
    assert proc.returncode in (0, 1), f"postmap -q {key!r} pgsql:{table}: {proc.stderr}"
    # The one warning allowed: the second SQL host, which has nothing listening, refused.
    other = [ln for ln in proc.stderr.splitlines() if f"pgsql server {DEAD_SQL}:" not in ln]
    assert not other, proc.stderr
    return proc.stdout.strip() if proc.returncode == 0 else None


def _relay_accepts(maps: dict[str, Path], address: str) -> bool:
    """relay_recipient_maps as smtpd applies it (no recipient_delimiter): the whole address,
    then @domain; the first that is found decides."""
    table = maps["relay_recipients"]
    domain = address.rsplit("@", 1)[1]
    return _query(table, address) == "OK" or _query(table, f"@{domain}") == "OK"


def test_listed_addresses_of_a_list_domain_exist(maps):
    assert _query(maps["relay_recipients"], "alice@list.example") == "OK"
    assert _query(maps["relay_recipients"], "o'brien@list.example") == "OK"
    assert _relay_accepts(maps, "bob@list.example")


def test_unlisted_addresses_of_a_list_domain_do_not(maps):
    table = maps["relay_recipients"]
    assert _query(table, "mallory@list.example") is None
    assert _query(table, "@list.example") is None
    assert not _relay_accepts(maps, "mallory@list.example")
    # A listed address of another domain does not make the name valid here.
    assert not _relay_accepts(maps, "carol@list.example")


@pytest.mark.parametrize(
    "domain", ["none.example", "verify.example", "default.example", "empty.example"]
)
def test_every_address_exists_unless_the_customer_lists_them(maps, domain):
    assert _query(maps["relay_recipients"], f"@{domain}") == "OK"
    assert _query(maps["relay_recipients"], f"anyone@{domain}") is None  # found via @domain
    assert _relay_accepts(maps, f"anyone@{domain}")


@pytest.mark.parametrize("domain", ["gone.example", "golist.example", "goverify.example"])
def test_an_inactive_domain_has_no_recipients(maps, domain):
    assert _query(maps["relay_recipients"], f"@{domain}") is None
    assert not _relay_accepts(maps, f"anyone@{domain}")
    assert _query(maps["recipient_check"], domain) is None
    assert not _relay_accepts(maps, "carol@golist.example")  # listed, but the domain is off


def test_postmaster_of_every_active_customer_domain_exists_listed_or_not(maps):
    """RFC 5321 4.5.1: a list customer that never listed postmaster still receives it."""
    assert _query(maps["relay_recipients"], "postmaster@list.example") == "OK"
    assert _relay_accepts(maps, "postmaster@list.example")
    assert not _relay_accepts(maps, "postmaster@golist.example")  # the domain is off
    assert not _relay_accepts(maps, "postmaster@foreign.example")
    assert not _relay_accepts(maps, "xpostmaster@list.example")


def test_a_domain_that_is_no_customers_has_no_recipients(maps):
    assert not _relay_accepts(maps, "anyone@foreign.example")
    assert _query(maps["relay_recipients"], "@") is None


def test_only_verify_domains_are_verified(maps):
    table = maps["recipient_check"]
    assert _query(table, "verify.example") == "reject_unverified_recipient"
    for domain in ("list.example", "none.example", "default.example", "empty.example"):
        assert _query(table, domain) is None, domain
    # The other keys of an access table lookup (address, "user@") never match.
    assert _query(table, "anyone@verify.example") is None
    assert _query(table, "anyone@") is None
    assert _query(table, "foreign.example") is None


@pytest.mark.parametrize(
    "key",
    [
        "x' OR '1'='1@list.example",
        "@list.example' OR '1'='1",
        "@none.example' UNION SELECT 'OK",
        "'; DROP TABLE recipients; --@list.example",
        "a\\' OR 1=1 --@list.example",
        "\\@list.example",
        "%@list.example",
        "%%@list.example",
        "_lice@list.example",
        "alice@list.example%",
        "@%",
        "@_one.example",
        "verify.example' OR 'a'='a",
        "%",
    ],
)
def test_hostile_keys_are_only_keys(maps, key):
    """Quotes, backslashes and LIKE wildcards in a key are data: nothing is found for them,
    no query fails, and the tables are still there afterwards."""
    assert _query(maps["relay_recipients"], key) is None
    assert _query(maps["recipient_check"], key) is None
    assert _query(maps["relay_recipients"], "alice@list.example") == "OK"


def test_case_is_folded_before_the_lookup(maps):
    """smtpd and postmap fold the key to lower case; the table stores lower case."""
    assert _query(maps["relay_recipients"], "Alice@List.Example") == "OK"
    assert _query(maps["recipient_check"], "Verify.Example") == "reject_unverified_recipient"


def test_the_existing_maps_reach_sql_on_the_settings_port(maps):
    """relay_domains and transport name the SQL port of the settings (not only 5432)."""
    assert _query(maps["relay_domains"], "list.example") == "list.example"
    assert _query(maps["relay_domains"], "gone.example") is None
    assert _query(maps["transport"], "list.example") is None  # no route row in this fixture
