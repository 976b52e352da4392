"""The scanners' policy snapshot against a real PostgreSQL with the tower's schema: the
change check sees every change whatever order transactions commit in, the load query gives
each customer's policy as stored, and a delta load gives what a full load gives."""

from __future__ import annotations

import random
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pgclusters  # tests/ is on sys.path (rootdir conftest)
import psycopg
import pytest
from needs import missing

from mailtower.customers import snapshot

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "templates/sql/etc/mailtower/sql/schema.sql.j2"
TOWER_ROLES = ("mailtower_relay", "mailtower_scanner", "mailtower_monitor")


@pytest.fixture(scope="module")
def cluster() -> Iterator[pgclusters.Cluster]:
    if not Path(pgclusters.PG_BIN / "initdb").exists():
        missing("PostgreSQL 15 (package postgresql-15)", module=True)
    workdir = pgclusters.make_workdir("mailtower-snapshot-")
    made = pgclusters.Cluster.create("snapshot", workdir)
    try:
        with made.connect() as conn:
            for role in TOWER_ROLES:
                conn.execute(f"CREATE ROLE {role} LOGIN")
            conn.execute(SCHEMA.read_text().encode())
            for name in ("alpha", "beta"):
                conn.execute("INSERT INTO customers (name) VALUES (%s)", (name,))
                conn.execute(
                    "INSERT INTO domains (name, customer_id)"
                    " SELECT %s, id FROM customers WHERE name = %s",
                    (f"{name}.example", name),
                )
                conn.execute(
                    "INSERT INTO policies (customer_id) SELECT id FROM customers WHERE name = %s",
                    (name,),
                )
        yield made
    finally:
        made.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def _set(conn: psycopg.Connection, customer: str, policy: str) -> None:
    """As the GOC's command writes a policy (replicated with the GOC's updated_at)."""
    conn.execute(
        "UPDATE policies SET policy = %s::jsonb, updated_at = now()"
        " WHERE customer_id = (SELECT id FROM customers WHERE name = %s)",
        (policy, customer),
    )


def test_a_change_committed_after_a_later_one_is_still_seen(cluster) -> None:
    """Replication applies transactions in commit order, and ``updated_at`` is a transaction's
    start: a change can arrive with an older ``updated_at`` than one already seen. Here beta's
    (updated_at an hour ahead) is loaded first, then alpha's arrives, older."""
    with cluster.connect() as conn:
        conn.execute(
            'UPDATE policies SET policy = \'{"ban_extensions": ["rar"]}\','
            " updated_at = now() + interval '1 hour'"
            " WHERE customer_id = (SELECT id FROM customers WHERE name = 'beta')"
        )
        seen = snapshot.change_check(conn)
        first = snapshot.load(conn, None, check=seen)
        assert first.policies["beta"].ban_extensions == ("rar",)
        _set(conn, "alpha", '{"ban_extensions": ["zip"]}')
        later = snapshot.change_check(conn)
        assert later != seen
        second = snapshot.load(conn, first, check=later)
        assert second.policies["alpha"].ban_extensions == ("zip",)
        assert snapshot.change_check(conn) == later  # nothing more: the same answer


def test_an_uncommitted_change_is_seen_once_committed(cluster) -> None:
    reader, writer = cluster.connect(), cluster.connect()
    writer.autocommit = False
    try:
        before = snapshot.change_check(reader)
        _set(writer, "alpha", '{"ban_extensions": ["7z"]}')
        assert snapshot.change_check(reader) == before  # not visible yet: nothing to load
        writer.commit()
        after = snapshot.change_check(reader)
        assert after != before
        assert snapshot.load(reader, None).policies["alpha"].ban_extensions == ("7z",)
    finally:
        reader.close()
        writer.close()


def test_a_renamed_customer_and_a_deactivated_domain_are_changes(cluster) -> None:
    with cluster.connect() as conn:
        before = snapshot.change_check(conn)
        conn.execute("UPDATE customers SET name = 'gamma' WHERE name = 'beta'")
        renamed = snapshot.change_check(conn)
        assert renamed != before
        assert snapshot.load(conn, None).domains["beta.example"] == "gamma"
        conn.execute("UPDATE domains SET active = false WHERE name = 'beta.example'")
        deactivated = snapshot.change_check(conn)
        assert deactivated != renamed
        assert "beta.example" not in snapshot.load(conn, None).domains
        conn.execute("TRUNCATE policies")  # no row trigger: the file node tells
        assert snapshot.change_check(conn) != deactivated


def test_a_change_applied_as_the_replication_worker_applies_it_is_seen(cluster) -> None:
    """The GOC's changes arrive through an apply worker (session_replication_role = replica),
    where only ALWAYS triggers fire."""
    with cluster.connect() as conn:
        before = snapshot.change_check(conn)
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE customers SET name = name || '' WHERE name = 'alpha'")
        conn.execute("RESET session_replication_role")
        assert snapshot.change_check(conn) != before


# -- the delta load: what a change costs, and that it gives what a full load gives


@pytest.fixture
def db(cluster) -> Iterator[psycopg.Connection]:
    """A database of its own with the tower's schema (superuser, autocommit)."""
    name = f"delta_{uuid.uuid4().hex[:10]}"
    with cluster.connect("postgres") as admin:
        admin.execute(f"CREATE DATABASE {name}")
    conn = cluster.connect(name)
    try:
        conn.execute(SCHEMA.read_text().encode())
        yield conn
    finally:
        conn.close()
        with cluster.connect("postgres") as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


class Recorder:
    """A connection that records what the snapshot asks (query, rows returned) and can run a
    hook before or after a query (another session committing in between)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.asked: list[tuple[str, int]] = []
        self.before: dict[str, Callable[[], object]] = {}
        self.after: dict[str, Callable[[], object]] = {}

    def cursor(self) -> Recorder:
        return self

    def __enter__(self) -> Recorder:
        self._cur = self.conn.cursor()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cur.close()

    def execute(self, query: str, params: Any = None) -> None:
        if query in self.before:
            self.before.pop(query)()
        self._cur.execute(query, params)
        self._query = query

    def _done(self, rows: int) -> None:
        self.asked.append((self._query, rows))
        if self._query in self.after:
            self.after.pop(self._query)()

    def fetchone(self) -> Any:
        row = self._cur.fetchone()
        self._done(1)
        return row

    def fetchall(self) -> list[Any]:
        rows = self._cur.fetchall()
        self._done(len(rows))
        return rows

    def modes(self) -> list[str]:
        names = {snapshot.LOAD_QUERY: "full", snapshot.DELTA_QUERY: "delta"}
        return [names[q] for q, _ in self.asked if q in names]


def _customer(conn: psycopg.Connection, name: str, domains: list[str], policy: str | None) -> None:
    cid = conn.execute("INSERT INTO customers (name) VALUES (%s) RETURNING id", (name,)).fetchone()
    assert cid is not None
    for domain in domains:
        conn.execute("INSERT INTO domains (name, customer_id) VALUES (%s, %s)", (domain, cid[0]))
    if policy is not None:
        conn.execute(
            "INSERT INTO policies (customer_id, policy) VALUES (%s, %s::jsonb)", (cid[0], policy)
        )


def _same_as_a_full_load(conn: Any, snap: snapshot.Snapshot, previous: snapshot.Snapshot) -> None:
    full = snapshot.load(conn, previous)
    assert dict(snap.domains) == dict(full.domains)
    assert dict(snap.policies) == dict(full.policies)
    assert snap.invalid == full.invalid
    assert snap.same_content(full)


def test_a_policy_change_reads_that_customer_only(db) -> None:
    for i in range(50):
        _customer(
            db, f"c{i}", [f"c{i}.example", f"c{i}-2.example"], '{"max_message_bytes": 5000000}'
        )
    rec = Recorder(db)
    first, mode = snapshot.refresh(rec, None)
    assert mode == "full" and len(first.policies) == 50
    assert snapshot.refresh(rec, first) == (first, "none")
    _set(db, "c7", '{"ban_extensions": ["rar"]}')
    rec.asked.clear()
    second, mode = snapshot.refresh(rec, first)
    assert mode == "delta"
    assert rec.asked == [(snapshot.CHANGE_QUERY, 1), (snapshot.DELTA_QUERY, 2)]  # c7's 2 rows
    assert second.policies["c7"].ban_extensions == ("rar",)
    assert second.generation == first.generation + 1
    _same_as_a_full_load(db, second, first)
    # A new customer, a domain added, deactivated, moved: deltas too.
    _customer(db, "new", ["new.example"], None)
    db.execute(
        "INSERT INTO domains (name, customer_id) SELECT 'c8-3.example', id FROM customers"
        " WHERE name = 'c8'"
    )
    third, mode = snapshot.refresh(rec, second)
    assert mode == "delta" and third.lookup("x@new.example")[0] == "new"
    assert third.domains["c8-3.example"] == "c8"
    db.execute("UPDATE domains SET active = false WHERE name = 'c9.example'")
    db.execute(
        "UPDATE domains SET customer_id = (SELECT id FROM customers WHERE name = 'c11')"
        " WHERE customer_id = (SELECT id FROM customers WHERE name = 'c10')"
    )
    fourth, mode = snapshot.refresh(rec, third)
    assert mode == "delta"
    assert "c9.example" not in fourth.domains and "c10" not in fourth.policies
    assert fourth.domains["c10.example"] == "c11"
    _same_as_a_full_load(db, fourth, third)


@pytest.mark.parametrize(
    ("what", "statement"),
    [
        ("a customer deleted", "DELETE FROM customers WHERE name = 'c1'"),
        ("a domain deleted", "DELETE FROM domains WHERE name = 'c1.example'"),
        ("a policy deleted", "DELETE FROM policies WHERE customer_id = 2"),
        ("a customer renamed", "UPDATE customers SET name = 'c1b' WHERE name = 'c1'"),
        ("a domain renamed", "UPDATE domains SET name = 'c1b.example' WHERE name = 'c1.example'"),
        ("a policy moved", "UPDATE policies SET customer_id = 3 WHERE customer_id = 2"),
        ("a truncate", "TRUNCATE policies"),
        ("the generation gone back", "UPDATE config_generation SET n = n - 2"),
    ],
)
def test_what_a_delta_cannot_see_makes_a_full_load(db, what: str, statement: str) -> None:
    for i in range(4):
        _customer(
            db, f"c{i}", [f"c{i}.example"], '{"max_message_bytes": 5000000}' if i < 2 else None
        )
    db.execute("UPDATE policies SET policy = policy")  # n well above what going back takes
    first, _ = snapshot.refresh(db, None)
    db.execute(statement)
    second, mode = snapshot.refresh(db, first)
    assert mode == "full", what
    _same_as_a_full_load(db, second, first)
    # As the apply worker writes (ALWAYS triggers): the same.
    db.execute("SET session_replication_role = replica")
    db.execute("UPDATE customers SET name = 'c3r' WHERE name = 'c3'")
    db.execute("RESET session_replication_role")
    third, mode = snapshot.refresh(db, second)
    assert mode == "full" and third.domains["c3.example"] == "c3r"


def test_another_server_start_makes_a_full_load(cluster, db) -> None:
    """A restarted or promoted server may not continue the history the snapshot was made of
    (an asynchronous standby had not received the last transactions): n alone cannot tell."""
    _customer(db, "c0", ["c0.example"], None)
    first, _ = snapshot.refresh(db, None)
    name = db.info.dbname
    db.close()
    cluster.stop()
    cluster.start()
    with cluster.connect(name) as conn:
        assert snapshot.refresh(conn, first)[1] == "full"


def test_a_transaction_committed_between_the_check_and_the_delta_is_not_lost(db) -> None:
    for i in range(3):
        _customer(db, f"c{i}", [f"c{i}.example"], "{}")
    first, _ = snapshot.refresh(db, None)
    early = psycopg.connect(db.info.dsn, autocommit=False)
    late = psycopg.connect(db.info.dsn, autocommit=False)
    try:
        _set(db, "c0", '{"ban_extensions": ["zip"]}')  # the delta's reason
        rec = Recorder(db)
        # c1's change commits after the check and before the delta; c2's right after it.
        rec.before[snapshot.DELTA_QUERY] = lambda: (
            _set(early, "c1", '{"ban_extensions": ["rar"]}'),
            early.commit(),
        )
        rec.after[snapshot.DELTA_QUERY] = lambda: (
            _set(late, "c2", '{"ban_extensions": ["7z"]}'),
            late.commit(),
        )
        second, mode = snapshot.refresh(rec, first)
        assert mode == "delta"
        assert second.policies["c1"].ban_extensions == ("rar",)  # in this delta already
        third, mode = snapshot.refresh(rec, second)
        assert mode == "delta"  # the check recorded was read before c1's: read again
        assert [third.policies[f"c{i}"].ban_extensions for i in range(3)] == [
            ("zip",),
            ("rar",),
            ("7z",),
        ]
        _same_as_a_full_load(db, third, second)
        assert snapshot.refresh(rec, third)[1] == "none"
    finally:
        early.close()
        late.close()


def test_generations_are_handed_out_in_commit_order(db) -> None:
    """A writer waits for the one before it (the row lock on config_generation), so a number
    taken later always belongs to a transaction that commits later."""
    for name in ("a", "b"):
        _customer(db, name, [f"{name}.example"], "{}")
    first = psycopg.connect(db.info.dsn, autocommit=False)
    second = psycopg.connect(db.info.dsn, autocommit=False)
    try:
        _set(first, "a", "{}")
        done = threading.Event()

        def write_b() -> None:
            _set(second, "b", "{}")
            second.commit()
            done.set()

        thread = threading.Thread(target=write_b)
        thread.start()
        assert not done.wait(0.5)  # waits for the first writer
        first.commit()
        thread.join(10)
        assert done.is_set()
        gens = dict(
            db.execute(
                "SELECT c.name, p.mt_gen FROM policies p JOIN customers c ON c.id = p.customer_id"
            ).fetchall()
        )
        assert gens["b"] > gens["a"]
    finally:
        first.close()
        second.close()


OLD_TOWER = """
CREATE TABLE customers (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE domains (name text PRIMARY KEY CHECK (name = lower(name)),
    customer_id bigint NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    active boolean NOT NULL DEFAULT true, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE policies (customer_id bigint PRIMARY KEY REFERENCES customers(id) ON DELETE CASCADE,
    policy jsonb NOT NULL DEFAULT '{}'::jsonb, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE config_generation (id boolean PRIMARY KEY DEFAULT true CHECK (id),
    n bigint NOT NULL DEFAULT 0);
INSERT INTO config_generation VALUES (true, 41);
CREATE FUNCTION mt_config_changed() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog AS $$ BEGIN
    UPDATE public.config_generation SET n = n + 1; RETURN NULL; END $$;
CREATE TRIGGER customers_config_changed AFTER INSERT OR UPDATE OR DELETE ON customers
    FOR EACH ROW EXECUTE FUNCTION mt_config_changed();
CREATE TRIGGER domains_config_changed AFTER INSERT OR UPDATE OR DELETE ON domains
    FOR EACH ROW EXECUTE FUNCTION mt_config_changed();
CREATE TRIGGER policies_config_changed AFTER INSERT OR UPDATE OR DELETE ON policies
    FOR EACH ROW EXECUTE FUNCTION mt_config_changed();
INSERT INTO customers (name) VALUES ('old');
INSERT INTO domains (name, customer_id) VALUES ('old.example', 1);
"""


def test_a_tower_of_the_previous_schema_is_migrated_by_applying_it_again(cluster) -> None:
    name = f"old_{uuid.uuid4().hex[:10]}"
    with cluster.connect("postgres") as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        with cluster.connect(name) as conn:
            conn.execute(OLD_TOWER)
            old_check = f"{conn.execute('SELECT n FROM config_generation').fetchone()[0]}/1/2/3"
            previous = snapshot.Snapshot(domains={"old.example": "old"}, check=old_check)
            for _ in range(2):  # idempotent
                conn.execute(SCHEMA.read_text().encode())
            triggers = conn.execute(
                "SELECT tgname, tgtype & 2 = 2, tgenabled, tgfoid::regproc::text FROM pg_trigger"
                " WHERE tgname LIKE '%config_changed' ORDER BY 1"
            ).fetchall()
            assert triggers == [
                (f"{t}_config_changed", True, "A", "mt_config_stamp")
                for t in ("customers", "domains", "policies")
            ]
            assert conn.execute("SELECT to_regproc('mt_config_changed')").fetchone() == (None,)
            assert conn.execute("SELECT n, removals FROM config_generation").fetchone() == (43, 0)
            # The file of an older scanner: its check is of another form, a full load.
            assert snapshot.refresh(conn, previous)[1] == "full"
            conn.execute("SET session_replication_role = replica")
            conn.execute("UPDATE domains SET active = true")
            assert conn.execute("SELECT mt_gen FROM domains").fetchone() == (44,)
    finally:
        with cluster.connect("postgres") as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


VALID = (
    "{}",
    '{"ban_extensions": ["zip"]}',
    '{"ban_extensions": ["rar"], "suspicious": "deliver"}',
    '{"max_message_bytes": 2000000}',
)
INVALID = ('{"max_message_bytes": 5}', '{"no_such_field": 1}', '{"ban_extensions": ["a/b"]}')


class Changes:
    """Random writes to the three tables, as the GOC's replication or an operator makes
    them. ``replica``: as the apply worker writes (session_replication_role = replica: only
    ALWAYS triggers fire, foreign keys cascade nothing, the publisher sends each row)."""

    def __init__(self, conn: psycopg.Connection, rng: random.Random, replica: bool) -> None:
        self.conn, self.rng, self.replica = conn, rng, replica
        self.made = 0

    def _new(self, prefix: str) -> str:
        self.made += 1
        return f"{prefix}{self.made}"

    def _policy(self) -> str:
        return self.rng.choice(INVALID if self.rng.random() < 0.2 else VALID)

    def _pick(self, query: str) -> Any:
        rows = self.conn.execute(query).fetchall()
        return self.rng.choice(rows) if rows else None

    def customer(self) -> Any:
        return self._pick("SELECT id, name FROM customers ORDER BY id")

    def domain(self) -> Any:
        return self._pick("SELECT name, customer_id FROM domains ORDER BY name")

    def run(self, op: str) -> None:
        x = self.conn.execute
        if op == "add_customer":
            name = self._new("k")
            domains = [f"{name}-{j}.example" for j in range(self.rng.randint(0, 3))]
            _customer(self.conn, name, domains, self._policy() if self.rng.random() < 0.7 else None)
            return
        if op == "truncate":
            x("TRUNCATE customers, domains, routes, policies, recipients")
            return
        customer, domain = self.customer(), self.domain()
        if customer is None:
            return
        cid = customer[0]
        if op in ("set_policy", "invalid_policy"):
            text = self.rng.choice(INVALID if op == "invalid_policy" else VALID)
            x(
                "INSERT INTO policies (customer_id, policy) VALUES (%s, %s::jsonb)"
                " ON CONFLICT (customer_id) DO UPDATE SET policy = EXCLUDED.policy",
                (cid, text),
            )
        elif op == "drop_policy":
            x("DELETE FROM policies WHERE customer_id = %s", (cid,))
        elif op == "move_policy":
            x(
                "UPDATE policies SET customer_id = %s WHERE customer_id = ("
                " SELECT customer_id FROM policies WHERE customer_id <> %s ORDER BY 1 LIMIT 1)"
                " AND NOT EXISTS (SELECT 1 FROM policies WHERE customer_id = %s)",
                (cid, cid, cid),
            )
        elif op == "delete_customer":
            if self.replica:  # the publisher's cascade arrives as rows of its own
                x("DELETE FROM policies WHERE customer_id = %s", (cid,))
                x("DELETE FROM domains WHERE customer_id = %s", (cid,))
            x("DELETE FROM customers WHERE id = %s", (cid,))
        elif op == "rename_customer":
            x("UPDATE customers SET name = %s WHERE id = %s", (self._new("r"), cid))
        elif op == "touch_customer":
            x("UPDATE customers SET created_at = now() WHERE id = %s", (cid,))
        elif op == "add_domain":
            x(
                "INSERT INTO domains (name, customer_id, active) VALUES (%s, %s, %s)",
                (f"{self._new('d')}.example", cid, self.rng.random() < 0.8),
            )
        elif domain is None:
            return
        elif op == "toggle_domain":
            x("UPDATE domains SET active = NOT active WHERE name = %s", (domain[0],))
        elif op == "move_domain":
            x("UPDATE domains SET customer_id = %s WHERE name = %s", (cid, domain[0]))
        elif op == "delete_domain":
            x("DELETE FROM domains WHERE name = %s", (domain[0],))
        elif op == "rename_domain":
            x(
                "UPDATE domains SET name = %s WHERE name = %s",
                (f"{self._new('n')}.example", domain[0]),
            )
        else:
            raise AssertionError(op)


# (operation, weight): mostly what a delta follows, enough of what it cannot.
OPERATIONS = {
    "add_customer": 10,
    "set_policy": 14,
    "invalid_policy": 4,
    "drop_policy": 2,
    "move_policy": 1,
    "delete_customer": 2,
    "rename_customer": 2,
    "touch_customer": 3,
    "add_domain": 5,
    "toggle_domain": 6,
    "move_domain": 6,
    "delete_domain": 2,
    "rename_domain": 1,
    "truncate": 0.3,
    "nothing": 3,
}


@pytest.mark.parametrize("session", ["origin", "replica"])
def test_deltas_give_what_a_full_load_gives_whatever_the_changes(db, session: str) -> None:
    """A seeded random sequence of changes; after each (one operation, or several in one
    transaction) the poller's way (a delta unless ``plan`` says full) must give exactly what a
    full load of the same database gives (both keep an invalid policy's previous one)."""
    rng = random.Random(f"snapshot-delta-{session}")
    if session == "replica":
        db.execute("SET session_replication_role = replica")
    changes = Changes(db, rng, replica=session == "replica")
    for _ in range(20):
        changes.run("add_customer")
    previous, _ = snapshot.refresh(db, None)
    modes = {"none": 0, "delta": 0, "full": 0}
    names, weights = list(OPERATIONS), list(OPERATIONS.values())
    ran: set[str] = set()
    most, invalid_seen = 0, 0
    for step in range(300):
        ops = rng.choices(names, weights, k=rng.choice((1, 1, 1, 2, 4)))
        ran.update(ops)
        if "nothing" not in ops:
            with db.transaction():
                for op in ops:
                    changes.run(op)
        current, mode = snapshot.refresh(db, previous)
        modes[mode] += 1
        full = snapshot.load(db, previous)
        assert current.same_content(full), (step, ops, mode)
        assert dict(current.domains) == dict(full.domains), (step, ops, mode)
        most = max(most, len(current.domains))
        invalid_seen += bool(current.invalid)
        previous = current
    # The delta path was taken, and each kind of change was met (not all full, not all delta).
    assert modes["delta"] >= 150 and modes["full"] >= 20 and modes["none"] >= 5, modes
    assert ran == set(OPERATIONS) and most > 30 and invalid_seen > 50, (ran, most, invalid_seen)
