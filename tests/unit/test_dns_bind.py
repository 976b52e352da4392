"""MX publication against a real BIND 9 (``named``) on the loopback, and ``named-checkzone``."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.update
import pytest
from dns_pairs import LAYOUTS, Named, make_pair, pair_data, with_tower
from scand_fakes import free_port

from mailtower import cli
from mailtower.controller.dns.diff import plan
from mailtower.controller.dns.exceptions import (
    NameConflict,
    NotAuthoritative,
    ServerUnreachable,
    TransferFailed,
    TsigKeyError,
    TsigRejected,
    UpdateRefused,
    ZoneChanged,
)
from mailtower.controller.dns.model import TowerPair, load_pair
from mailtower.controller.dns.server import AuthServer, TsigKey, query
from mailtower.controller.dns.update import apply, publish
from mailtower.controller.dns.verify import check_published
from mailtower.controller.dns.zonefile import write_zone_files

pytestmark = pytest.mark.integration


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def named(tmp_path: Path) -> Iterator[Named]:
    """A named serving the zone-per-domain pair's zones, empty (SOA and NS only)."""
    server = Named(tmp_path, make_pair()).start()
    yield server
    server.stop()


def _serial(server: AuthServer, zone: str) -> int:
    answer = query(server, dns.name.from_text(zone), dns.rdatatype.SOA)
    return int(answer.answer[0][0].serial)


def _everything(named: Named) -> dict[str, str]:
    """What named serves for every name and type of the pair, as text (to compare states)."""
    server = named.server()
    names = ["customer1.lab.", "customer2.lab.", "mx.tower-a.lab.", "mx.tower-b.lab."]
    state = {}
    for name in names:
        for rdtype in (dns.rdatatype.MX, dns.rdatatype.A, dns.rdatatype.AAAA):
            answer = query(server, dns.name.from_text(name), rdtype)
            records = (line for rrset in answer.answer for line in rrset.to_text().splitlines())
            state[f"{name} {rdtype!r}"] = "\n".join(sorted(records))
    return state


@pytest.mark.parametrize("with_records", [True, False], ids=["full", "empty"])
def test_zone_files_pass_named_checkzone(tmp_path: Path, layout: str, with_records: bool) -> None:
    pair = make_pair(
        zones=[*LAYOUTS[layout], "dns.lab"],
        nameservers=[{"name": "ns.dns.lab", "ipv4": ["10.201.0.53"]}],
    )
    for zone, path in write_zone_files(pair, tmp_path, with_records=with_records).items():
        # Every check BIND has, made fatal; out-of-zone MX targets are only ever a warning.
        result = subprocess.run(
            ["named-checkzone", "-i", "full", "-k", "fail", "-n", "fail", "-m", "fail"]
            + ["-M", "fail", "-S", "fail", "-r", "fail", zone, str(path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{zone}:\n{result.stdout}{result.stderr}"
        assert result.stdout.rstrip().endswith("OK")


def test_a_broken_zone_file_fails_named_checkzone(tmp_path: Path) -> None:
    """The check above can fail: a CNAME next to other data is refused."""
    path = write_zone_files(make_pair(), tmp_path)["customer1.lab."]
    path.write_text(path.read_text() + "@ 300 IN CNAME elsewhere.lab.\n")
    result = subprocess.run(["named-checkzone", "customer1.lab.", str(path)], capture_output=True)
    assert result.returncode != 0


def test_named_loading_the_full_zone_files_serves_the_pair(tmp_path: Path, layout: str) -> None:
    pair = make_pair(zones=LAYOUTS[layout])
    named = Named(tmp_path, pair, with_records=True).start()
    try:
        assert plan(pair, named.server()).empty
        assert check_published(pair, named.server()) == []
    finally:
        named.stop()


def test_plan_apply_check_replan(tmp_path: Path, layout: str) -> None:
    pair = make_pair(zones=LAYOUTS[layout])
    named = Named(tmp_path, pair).start()
    try:
        server = named.server()
        first = publish(pair, server, dry_run=True)
        assert not first.empty and not any(c.deleted for c in first.changes)
        assert sum(len(c.added) for c in first.changes) == 10  # 2×2 MX, 3 A/AAAA, 3 PTR
        assert publish(pair, server, dry_run=True) == first  # the dry run sent nothing
        problems = check_published(pair, server)
        assert "customer1.lab.: no MX records" in problems
        zone = pair.zone_of("customer1.lab.")
        assert zone is not None
        serial = _serial(server, zone)

        assert publish(pair, server) == first
        assert check_published(pair, server) == []
        assert plan(pair, server).empty  # idempotent: nothing left to do
        assert publish(pair, server).empty
        assert _serial(server, zone) > serial  # BIND bumped it; nobody did by hand
    finally:
        named.stop()


def test_changed_preferences_change_exactly_the_backup_mx(named: Named) -> None:
    server = named.server()
    publish(make_pair(), server)
    backup = make_pair(preference="primary-backup", primary="a")
    change_plan = plan(backup, server)
    assert [line for c in change_plan.changes for line in c.lines()] == [
        "- customer1.lab. 300 IN MX 10 mx.tower-b.lab.",
        "+ customer1.lab. 300 IN MX 20 mx.tower-b.lab.",
        "- customer2.lab. 300 IN MX 10 mx.tower-b.lab.",
        "+ customer2.lab. 300 IN MX 20 mx.tower-b.lab.",
    ]
    apply(change_plan, server)
    assert check_published(backup, server) == []
    assert check_published(make_pair(), server) == [
        "customer1.lab.: MX mx.tower-b.lab. (tower b) has preference 20, expected 10",
        "customer2.lab.: MX mx.tower-b.lab. (tower b) has preference 20, expected 10",
    ]
    assert plan(backup, server).empty


def test_moved_relay_address_and_dropped_domain_are_pruned(tmp_path: Path) -> None:
    old = make_pair(zones=LAYOUTS["one-parent-zone"])
    named = Named(tmp_path, old).start()
    try:
        named_conf = tmp_path / "named.conf"
        assert "allow-transfer { none; }" in named_conf.read_text()
        server = named.server()
        publish(old, server)
        moved = with_tower(
            pair_data(zones=LAYOUTS["one-parent-zone"], domains=["customer1.lab"]),
            1,
            ipv4=["10.201.2.20"],
        )
        new = load_pair(moved)
        lines = [line for c in plan(new, server).changes for line in c.lines()]
        assert lines == [
            "+ 20.2.201.10.in-addr.arpa. 300 IN PTR mx.tower-b.lab.",
            "- mx.tower-b.lab. 300 IN A 10.201.2.10",
            "+ mx.tower-b.lab. 300 IN A 10.201.2.20",
        ]
        with pytest.raises(TransferFailed, match="REFUSED"):
            plan(new, server, prune=True)  # this server allows no AXFR
    finally:
        named.stop()


def test_pruning_with_axfr_deletes_what_the_pair_left_behind(tmp_path: Path) -> None:
    old = make_pair(zones=LAYOUTS["one-parent-zone"])
    named = Named(tmp_path, old, allow_transfer=True).start()
    try:
        server = named.server()
        publish(old, server)
        new = load_pair(
            with_tower(
                pair_data(zones=LAYOUTS["one-parent-zone"], domains=["customer1.lab"]),
                1,
                ipv4=["10.201.2.20"],
            )
        )
        lines = [line for c in plan(new, server, prune=True).changes for line in c.lines()]
        assert lines == [
            "- 10.2.201.10.in-addr.arpa. 300 IN PTR mx.tower-b.lab.",
            "+ 20.2.201.10.in-addr.arpa. 300 IN PTR mx.tower-b.lab.",
            "- customer2.lab. 300 IN MX 10 mx.tower-a.lab.",
            "- customer2.lab. 300 IN MX 10 mx.tower-b.lab.",
            "- mx.tower-b.lab. 300 IN A 10.201.2.10",
            "+ mx.tower-b.lab. 300 IN A 10.201.2.20",
        ]
        publish(new, server, prune=True)
        assert check_published(new, server) == []
        assert plan(new, server, prune=True).empty
        assert check_published(old, server)  # the old pair is gone
    finally:
        named.stop()


@pytest.mark.parametrize(
    ("make_key", "error"),
    [
        (lambda named: TsigKey(named.key.name, TsigKey.generate("x").secret), "BadSignature"),
        (lambda named: TsigKey.generate("unknown-key"), "BadKey"),
    ],
    ids=["wrong-secret", "unknown-key"],
)
def test_a_wrong_tsig_key_is_rejected_and_nothing_changes(named: Named, make_key, error) -> None:
    before = _everything(named)
    server = named.server(make_key(named))
    change_plan = plan(make_pair(), server)
    with pytest.raises(TsigRejected) as err:
        apply(change_plan, server)
    message = str(err.value)
    assert error in message and "NOTAUTH" in message
    assert f"127.0.0.1:{named.port}" in message and "zone " in message
    assert _everything(named) == before
    assert plan(make_pair(), named.server()) == change_plan


def test_a_key_not_allowed_to_update_is_refused(named: Named) -> None:
    before = _everything(named)
    server = named.server(named.other_key)
    with pytest.raises(UpdateRefused, match=r"refused the update of zone .* \(REFUSED\)"):
        publish(make_pair(), server)
    assert _everything(named) == before


def test_no_key_no_update(named: Named) -> None:
    server = AuthServer("127.0.0.1", named.port)
    assert not plan(make_pair(), server).empty  # planning needs no key
    with pytest.raises(TsigKeyError, match="need a TSIG key"):
        publish(make_pair(), server)


def test_a_stale_plan_is_refused_and_changes_nothing(named: Named) -> None:
    server = named.server()
    stale = plan(make_pair(), server)
    publish(make_pair(preference="primary-backup", primary="b"), server)
    before = _everything(named)
    with pytest.raises(ZoneChanged, match="plan again"):
        apply(stale, server)
    assert _everything(named) == before


def test_a_cname_at_an_owned_name_is_a_conflict(named: Named) -> None:
    update = dns.update.UpdateMessage("tower-b.lab.")
    update.add("mx.tower-b.lab.", 300, "CNAME", "elsewhere.lab.")
    update.use_tsig(named.key.dnspython_key())
    assert dns.query.tcp(update, "127.0.0.1", timeout=5, port=named.port).rcode() == 0
    assert "mx.tower-b.lab. 300 IN CNAME elsewhere.lab." in _everything(named).values()
    with pytest.raises(NameConflict, match="mx.tower-b.lab. in zone tower-b.lab. is a CNAME"):
        plan(make_pair(), named.server())
    assert "mx.tower-b.lab.: mx.tower-b.lab. in zone tower-b.lab. is a CNAME" in " ".join(
        check_published(make_pair(), named.server())
    )


def test_a_zone_the_server_does_not_serve(named: Named) -> None:
    pair = make_pair(zones=[*make_pair().zones, "customer3.lab"], domains=["customer3.lab"])
    with pytest.raises(NotAuthoritative, match="does not serve zone customer3.lab. .REFUSED"):
        plan(pair, named.server())
    problems = check_published(pair, named.server())
    assert any(p.startswith("customer3.lab.: ") and "REFUSED" in p for p in problems)


def test_a_server_that_is_down(named: Named) -> None:
    down = AuthServer("127.0.0.1", free_port(), key=named.key, timeout_s=2)
    for call in (plan, check_published, publish):
        with pytest.raises(ServerUnreachable, match=f"127.0.0.1:{down.port}: .*is the server up"):
            call(make_pair(), down)
    named.stop()  # and one that goes away
    with pytest.raises(ServerUnreachable):
        plan(make_pair(), named.server())


def _pair_file(tmp_path: Path, pair: TowerPair) -> Path:
    path = tmp_path / "pair.json"
    path.write_text(json.dumps(pair.model_dump(mode="json")))
    return path


def test_cli_plan_apply_check(named: Named, tmp_path: Path, capsys) -> None:
    pair_file = _pair_file(tmp_path, make_pair())
    key_file = tmp_path / f"{named.key.name}.key"
    server = ["--server", f"127.0.0.1:{named.port}"]

    assert cli.main(["dns", "plan", str(pair_file), *server]) == 0
    out = capsys.readouterr().out
    assert "+ customer1.lab. 300 IN MX 10 mx.tower-a.lab." in out
    assert cli.main(["dns", "apply", "--dry-run", str(pair_file), *server]) == 0
    assert cli.main(["dns", "check", str(pair_file), *server]) == 1
    capsys.readouterr()

    assert cli.main(["dns", "apply", str(pair_file), *server]) == 1  # no key
    assert "need a TSIG key" in capsys.readouterr().err
    assert cli.main(["dns", "apply", str(pair_file), *server, "--key", str(key_file)]) == 0
    assert "applied" in capsys.readouterr().out
    assert cli.main(["dns", "check", str(pair_file), *server, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    assert cli.main(["dns", "plan", str(pair_file), *server, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["changes"] == []


def test_cli_refuses_a_bad_pair_before_sending(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "pair.json"
    bad.write_text(json.dumps(pair_data(domains=["customer1.lab", "customer1.lab"])))
    # Nothing listens on this port: a bad pair must fail before any connection.
    assert cli.main(["dns", "plan", str(bad), "--server", f"127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "customer domain customer1.lab. is listed twice" in err and str(bad) in err
