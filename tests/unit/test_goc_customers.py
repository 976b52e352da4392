"""``mailtower customer`` against a real PostgreSQL 15 GOC (the sync's schema): every change
in one transaction, bad input refused whole (exit 2) before anything is written."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgclusters import Cluster, make_workdir
from synclab import GOC_SYNC_PASSWORD

from mailtower.cli import main
from mailtower.goc.sync import ensure_goc

pytestmark = pytest.mark.integration

INJECTION = "x'; DROP TABLE customers;--"
ROUTE = "smtp:[192.0.2.25]:25"


@pytest.fixture(scope="module")
def goc() -> Iterator[Cluster]:
    workdir = make_workdir()
    cluster = Cluster.create("goc", workdir)
    try:
        ensure_goc(cluster.dsn(), sync_password=GOC_SYNC_PASSWORD)
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(autouse=True)
def empty(goc: Cluster) -> None:
    with goc.connect() as conn:
        conn.execute("DELETE FROM customers")  # cascades to everything else


class Run:
    def __init__(self, goc: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
        self.goc, self.capsys = goc, capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        try:
            code = main(["customer", *args, "--dsn", self.goc.dsn()])
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def run(goc: Cluster, capsys: pytest.CaptureFixture[str]) -> Run:
    return Run(goc, capsys)


def snapshot(goc: Cluster) -> list[object]:
    """Every configuration row, to show that a refused command wrote nothing."""
    with goc.connect() as conn:
        return [
            conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
            for t in ("customers", "domains", "routes", "policies", "recipients")
        ]


def test_add_show_list(run: Run, goc: Cluster) -> None:
    code, out, _ = run("add", "acme", "--domain", "Acme.Example.", "--domain", "acme.test")
    assert code == 2  # --route is required: argparse
    code, out, err = run(
        "add", "acme", "--domain", "Acme.Example.", "--domain", "acme.test", "--route", ROUTE
    )
    assert code == 0, err
    assert "added customer acme" in out
    code, out, _ = run("show", "acme", "--json")
    assert code == 0
    shown = json.loads(out)
    assert [(d["name"], d["route"], d["recipients"]) for d in shown["domains"]] == [
        ("acme.example", ROUTE, 0),
        ("acme.test", ROUTE, 0),
    ]
    assert shown["policy"]["retention_days"] == 3  # defaults filled
    assert shown["policy"]["recipient_check"] == "none"
    assert shown["policy_stored"] == {}
    code, out, _ = run("show", "acme")
    assert code == 0 and "acme.example  via smtp:[192.0.2.25]:25" in out
    code, out, _ = run("list", "--json")
    assert json.loads(out) == [{"name": "acme", "domains": 2, "recipients": 0, "policy": "default"}]
    code, out, _ = run("list")
    assert code == 0 and out.splitlines()[1].split() == ["acme", "2", "0", "default"]
    # The same again, or a domain of another customer: refused, named, nothing written.
    before = snapshot(goc)
    code, _, err = run("add", "acme", "--domain", "other.example", "--route", ROUTE)
    assert code == 1 and "exists already" in err
    code, _, err = run("add", "beta", "--domain", "acme.test", "--route", ROUTE)
    assert code == 1 and "belongs to customer 'acme'" in err
    assert snapshot(goc) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", INJECTION, "--domain", "a.example", "--route", ROUTE], "customer name"),
        (["add", "Acme", "--domain", "a.example", "--route", ROUTE], "customer name"),
        (["add", "a" * 65, "--domain", "a.example", "--route", ROUTE], "customer name"),
        (["add", "acme\n", "--domain", "a.example", "--route", ROUTE], "customer name"),
        (["add", "ok", "--domain", "a.example\n.b", "--route", ROUTE], "not a valid domain"),
        (["add", "ok", "--domain", INJECTION, "--route", ROUTE], "not a valid domain"),
        (["add", "ok", "--domain", "localhost", "--route", ROUTE], "not a valid domain"),
        (["add", "ok", "--domain", "a.example", "--route", "pipe:x"], "route"),
        (["add", "ok", "--domain", "a.example", "--route", "smtp:[a b]:25"], "route"),
        (["add", "ok", "--domain", "a.example", "--route", "smtp:[192.0.2.1]:99999"], "port"),
        (["add", "ok", "--domain", "a.example", "--route", f"smtp:[{INJECTION}]"], "route"),
        (["add", "ok", "--domain", "a.example", "--route", "smtp:[h.example]:25\n"], "route"),
        (["add", "ok", "--domain", "a.example", "--route", "smtp:h.example\n"], "route"),
        (["add", "ok", "--domain", "a.example", "--route", " smtp:[h.example]"], "route"),
        (["show", INJECTION], "customer name"),
        (["remove", INJECTION, "--yes"], "customer name"),
        (["domain", "add", "ok", INJECTION], "not a valid domain"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    run: Run, goc: Cluster, args: list[str], message: str
) -> None:
    before = snapshot(goc)
    code, out, err = run(*args)
    assert code == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1
    assert snapshot(goc) == before
    assert goc.scalar("SELECT to_regclass('public.customers')") is not None


def test_routes_are_canonical(run: Run, goc: Cluster) -> None:
    assert run("add", "a", "--domain", "a.example", "--route", "SMTP:[MX.A.Example.]:025")[0] == 2
    assert run("add", "a", "--domain", "a.example", "--route", "smtp:[MX.A.Example.]:025")[0] == 0
    assert goc.scalar("SELECT transport FROM routes") == "smtp:[mx.a.example]:25"
    assert run("add", "b", "--domain", "b.example", "--route", "lmtp:192.0.2.7")[0] == 0
    assert goc.scalar("SELECT transport FROM routes WHERE domain = 'b.example'") == "lmtp:192.0.2.7"


def test_unknown_customer_exits_1(run: Run) -> None:
    for args in (["show", "nobody"], ["policy", "nobody", "--set", "notify=none"]):
        code, _, err = run(*args)
        assert code == 1 and "no customer 'nobody'" in err


def policy_row(goc: Cluster) -> tuple[object, object]:
    with goc.connect() as conn:
        row = conn.execute("SELECT policy::text, updated_at FROM policies").fetchone()
    return (None, None) if row is None else (row[0], row[1])


def test_policy_set_reset_file(run: Run, goc: Cluster, tmp_path: Path) -> None:
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    code, out, err = run(
        "policy",
        "acme",
        "--set",
        "suspicious=deliver",
        "--set",
        "ban_extensions=.EXE, scr",
        "--set",
        "max_message_bytes=1000000",
        "--set",
        'ban_names=["Invoice*.pdf"]',
    )
    assert code == 0, err
    stored, stamp = policy_row(goc)
    assert json.loads(str(stored)) == {
        "ban_extensions": ["exe", "scr"],
        "ban_names": ["invoice*.pdf"],
        "max_message_bytes": 1000000,
        "suspicious": "deliver",
    }
    code, out, _ = run("policy", "acme", "--set", "suspicious=deliver")
    assert code == 0 and "unchanged" in out
    assert policy_row(goc)[1] == stamp  # not touched: scand does not reload for nothing
    code, out, _ = run("policy", "acme", "--reset", "ban_names", "--reset", "max_message_bytes")
    assert code == 0 and "changed" in out
    stored, later = policy_row(goc)
    assert json.loads(str(stored)) == {"ban_extensions": ["exe", "scr"], "suspicious": "deliver"}
    assert later > stamp  # type: ignore[operator]
    path = tmp_path / "p.json"
    path.write_text('{"recipient_check": "list", "retention_days": 7}')
    assert run("policy", "acme", "--file", str(path))[0] == 1  # no list uploaded yet
    assert run("policy", "acme", "--file", str(path), "--force")[0] == 0
    assert json.loads(str(policy_row(goc)[0])) == {"recipient_check": "list", "retention_days": 7}
    code, out, _ = run("policy", "acme")  # no option: print it, defaults filled
    assert code == 0 and json.loads(out)["quarantine_days"] == 30
    assert run("policy", "acme", "--file", str(path), "--set", "notify=none")[0] == 2


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--set", "bogus=1"], "bogus"),
        (["--reset", "bogus"], "bogus"),
        (["--set", "retention_days=abc"], "retention_days"),
        (["--set", "retention_days=[1]"], "retention_days"),
        (["--set", "suspicious=maybe"], "suspicious"),
        (["--set", f"max_message_bytes={10**12}"], "max_message_bytes"),
        (["--set", "ban_extensions=" + json.dumps(["exe"] * 2000)], "ban_extensions"),
        (["--set", f"admin_address={INJECTION}"], "admin_address"),
        (["--set", "notify=admin"], "admin_address"),
        (["--set", "noequals"], "KEY=VALUE"),
    ],
)
def test_bad_policy_exits_2_naming_the_field(
    run: Run, goc: Cluster, args: list[str], field: str
) -> None:
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    run("policy", "acme", "--set", "suspicious=deliver")
    before = snapshot(goc)
    code, _, err = run("policy", "acme", *args)
    assert code == 2
    assert field in err and len(err.strip().splitlines()) == 1
    assert snapshot(goc) == before


def test_huge_policy_file_is_refused(run: Run, goc: Cluster, tmp_path: Path) -> None:
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"ban_extensions": ["exe"] * 10**6}))
    code, _, err = run("policy", "acme", "--file", str(path))
    assert code == 2 and "larger than" in err
    path.write_text("[1, 2]")
    assert run("policy", "acme", "--file", str(path))[0] == 2
    assert run("policy", "acme", "--file", str(tmp_path / "missing.json"))[0] == 2
    assert policy_row(goc) == (None, None)


def test_a_stored_policy_written_around_the_command_is_not_merged(run: Run, goc: Cluster) -> None:
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    with goc.connect() as conn:
        conn.execute(
            "INSERT INTO policies (customer_id, policy) SELECT id, '{\"bogus\": 1}' FROM customers"
        )
    code, _, err = run("policy", "acme", "--set", "notify=recipient")
    assert code == 1 and "bogus" in err and "--file" in err
    code, out, _ = run("show", "acme")
    assert code == 1 and "INVALID" in out


def recipients(goc: Cluster, domain: str) -> dict[str, object]:
    with goc.connect() as conn:
        rows = conn.execute(
            "SELECT address, updated_at FROM recipients WHERE domain = %s", (domain,)
        ).fetchall()
    return {str(a): u for a, u in rows}


def test_recipients_replace_the_whole_list(run: Run, goc: Cluster, tmp_path: Path) -> None:
    run("add", "acme", "--domain", "acme.example", "--domain", "acme.test", "--route", ROUTE)
    path = tmp_path / "list.txt"
    path.write_text(
        "# the sales team\n"
        "Alice@Acme.Example\n"
        "  bob@acme.example  \r\n"
        "\n"
        "o'brien@acme.example\n"
        "alice@acme.example\n"
    )
    code, out, err = run("recipients", "acme", "--domain", "acme.example", "--file", str(path))
    assert code == 0, err
    assert "3 added, 0 removed, 3 listed, 1 duplicate line(s) ignored" in out
    assert "recipient_check is none" in out  # the list is not used yet: said so
    first = recipients(goc, "acme.example")
    assert set(first) == {"alice@acme.example", "bob@acme.example", "o'brien@acme.example"}
    path.write_text("alice@acme.example\ncarol@acme.example\n")
    code, out, _ = run("recipients", "acme", "--domain", "acme.example", "--file", str(path))
    assert "1 added, 2 removed, 2 listed" in out
    second = recipients(goc, "acme.example")
    assert set(second) == {"alice@acme.example", "carol@acme.example"}
    assert second["alice@acme.example"] == first["alice@acme.example"]  # kept, not rewritten
    # Another domain's list is its own; an empty file empties only this one.
    path.write_text("dave@acme.test\n")
    run("recipients", "acme", "--domain", "acme.test", "--file", str(path))
    path.write_text("# nobody\n")
    code, out, _ = run("recipients", "acme", "--domain", "acme.example", "--file", str(path))
    assert code == 0 and "0 added, 2 removed, 0 listed" in out
    assert set(recipients(goc, "acme.test")) == {"dave@acme.test"}
    run("policy", "acme", "--set", "recipient_check=list", "--force")
    code, out, _ = run(
        "recipients", "acme", "--domain", "acme.test", "--file", str(path), "--force"
    )
    assert "note:" not in out
    code, out, _ = run("show", "acme", "--json")
    assert {d["name"]: d["recipients"] for d in json.loads(out)["domains"]} == {
        "acme.example": 0,
        "acme.test": 0,
    }


def test_recipients_from_standard_input(
    run: Run, goc: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    stdin = io.TextIOWrapper(io.BytesIO(b"eve@acme.example\n"))
    monkeypatch.setattr("sys.stdin", stdin)
    assert run("recipients", "acme", "--domain", "acme.example", "--file", "-")[0] == 0
    assert set(recipients(goc, "acme.example")) == {"eve@acme.example"}


def test_bad_recipient_lines_are_listed_and_nothing_is_written(
    run: Run, goc: Cluster, tmp_path: Path
) -> None:
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    path = tmp_path / "list.txt"
    path.write_text("keep@acme.example\n")
    run("recipients", "acme", "--domain", "acme.example", "--file", str(path))
    before = snapshot(goc)
    lines = [
        "good@acme.example",  # 1
        "someone@other.example",  # 2: another domain
        "two words@acme.example",  # 3
        "tab\there@acme.example",  # 4
        "bell\x07@acme.example",  # 5
        "x" * 250 + "@acme.example",  # 6: too long
        f"{INJECTION}@acme.example",  # 7
        "@acme.example",  # 8: no local part
        "a@b@acme.example",  # 9
        "acme.example",  # 10
        "zero\u200bwidth@acme.example",  # 11: invisible
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe@acme.example\n")
    code, out, err = run("recipients", "acme", "--domain", "acme.example", "--file", str(path))
    assert code == 2, (out, err)
    assert "11 bad line(s), nothing written" in err
    for number in range(2, 13):
        assert f"line {number}:" in err
    assert "line 1:" not in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(goc) == before
    # A domain that is not this customer's: refused (exit 1), nothing written.
    run("add", "beta", "--domain", "beta.example", "--route", ROUTE)
    path.write_text("x@beta.example\n")
    code, _, err = run("recipients", "acme", "--domain", "beta.example", "--file", str(path))
    assert code == 1 and "not a domain of acme" in err
    assert recipients(goc, "beta.example") == {}


def test_an_endless_line_is_one_bad_line(run: Run, goc: Cluster, tmp_path: Path) -> None:
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    path = tmp_path / "list.txt"
    path.write_bytes(b"ok@acme.example\n" + b"a" * 5_000_000 + b"\nfine@acme.example\n")
    code, _, err = run("recipients", "acme", "--domain", "acme.example", "--file", str(path))
    assert code == 2 and "1 bad line(s)" in err and "line 2: longer than" in err


def test_a_hundred_thousand_recipients_in_one_upload(
    run: Run, goc: Cluster, tmp_path: Path
) -> None:
    """Correctness at scale; its speed is a benchmark's (docs/benchmarks.md), not a timed test."""
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    path = tmp_path / "big.txt"
    addresses = [f"user{i:06d}@acme.example" for i in range(100_000)]
    path.write_text("\n".join(addresses + addresses[:500]) + "\n")  # 500 duplicates
    code, out, err = run("recipients", "acme", "--domain", "acme.example", "--file", str(path))
    assert code == 0, err
    assert "100000 added, 0 removed, 100000 listed, 500 duplicate line(s) ignored" in out
    # Half replaced: still one statement each way.
    path.write_text("\n".join(f"user{i:06d}@acme.example" for i in range(50_000, 150_000)))
    code, out, _ = run("recipients", "acme", "--domain", "acme.example", "--file", str(path))
    assert code == 0 and "50000 added, 50000 removed, 100000 listed" in out
    assert goc.scalar("SELECT count(*) FROM recipients") == 100_000


def test_domain_add_and_remove(run: Run, goc: Cluster, tmp_path: Path) -> None:
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    code, out, _ = run("domain", "add", "acme", "acme.test")  # its one route
    assert code == 0 and f"added acme.test via {ROUTE}" in out
    code, out, _ = run("domain", "add", "acme", "acme.org", "--route", "smtp:[192.0.2.9]:2525")
    assert code == 0
    code, _, err = run("domain", "add", "acme", "acme.net")  # now two routes: which one?
    assert code == 2 and "--route is needed" in err
    code, out, _ = run("domain", "add", "acme", "acme.org", "--route", "smtp:[192.0.2.10]:25")
    assert code == 0 and "unchanged" not in out
    assert goc.scalar("SELECT transport FROM routes WHERE domain = 'acme.org'") == (
        "smtp:[192.0.2.10]:25"
    )
    run("add", "beta", "--domain", "beta.example", "--route", ROUTE)
    code, _, err = run("domain", "add", "acme", "beta.example")
    assert code == 1 and "belongs to customer 'beta'" in err
    path = tmp_path / "list.txt"
    path.write_text("a@acme.test\nb@acme.test\n")
    run("recipients", "acme", "--domain", "acme.test", "--file", str(path))
    code, out, _ = run("domain", "remove", "acme", "acme.test")
    assert code == 0 and "2 recipient(s)" in out
    assert goc.scalar("SELECT count(*) FROM routes WHERE domain = 'acme.test'") == 0
    assert goc.scalar("SELECT count(*) FROM recipients") == 0
    code, _, err = run("domain", "remove", "acme", "beta.example")
    assert code == 1 and "not a domain of acme" in err


def test_remove_needs_yes_and_takes_everything(run: Run, goc: Cluster, tmp_path: Path) -> None:
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    run("add", "beta", "--domain", "beta.example", "--route", ROUTE)
    run("policy", "acme", "--set", "notify=recipient")
    path = tmp_path / "list.txt"
    path.write_text("a@acme.example\n")
    run("recipients", "acme", "--domain", "acme.example", "--file", str(path))
    code, _, err = run("remove", "acme")
    assert code == 2 and "--yes" in err
    code, out, _ = run("remove", "acme", "--yes")
    assert code == 0 and "1 domain(s), 1 recipient(s)" in out
    for table in ("policies", "recipients"):
        assert goc.scalar(f"SELECT count(*) FROM {table}") == 0
    assert goc.scalar("SELECT count(*) FROM domains") == 1  # beta's
    assert run("remove", "acme", "--yes")[0] == 1


def test_database_errors_name_where(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["customer", "list", "--dsn", "host=127.0.0.1 port=1 dbname=goc user=x"])
    err = capsys.readouterr().err
    assert code == 1
    assert "database error at 127.0.0.1:1, database goc" in err
    assert len(err.strip().splitlines()) == 1
    code = main(["customer", "list", "--config", str(tmp_path / "goc.json")])
    err = capsys.readouterr().err
    assert code == 1 and "goc.json: not found" in err and "--dsn" in err


def test_list_mode_needs_a_list_for_every_domain(run: Run, goc: Cluster, tmp_path: Path) -> None:
    """Every RCPT of a list-mode domain with no list gets a permanent 550: refused unless
    --force, and an empty upload for a list-mode customer likewise."""
    run("add", "acme", "--domain", "acme.example", "--route", ROUTE)
    run("domain", "add", "acme", "acme.net")
    code, _, err = run("policy", "acme", "--set", "recipient_check=list")
    assert code == 1 and "acme.example, acme.net" in err and "--force" in err
    path = tmp_path / "list.txt"
    path.write_text("alice@acme.example\n")
    assert run("recipients", "acme", "--domain", "acme.example", "--file", str(path))[0] == 0
    code, _, err = run("policy", "acme", "--set", "recipient_check=list")
    assert code == 1 and "acme.net" in err and "acme.example," not in err
    assert run("policy", "acme", "--set", "recipient_check=list", "--force")[0] == 0
    path.write_text("")
    code, _, err = run("recipients", "acme", "--domain", "acme.example", "--file", str(path))
    assert code == 1 and "empty list" in err
    assert goc.scalar("SELECT count(*) FROM recipients") == 1  # nothing written
    args = ("recipients", "acme", "--domain", "acme.example", "--file", str(path), "--force")
    assert run(*args)[0] == 0
    assert goc.scalar("SELECT count(*) FROM recipients") == 0
