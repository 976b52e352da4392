"""``mailtower init`` (issue 21): what it writes loads through pyinfra into the settings the
deploy builds, equals the lab's own inventories for the lab's answers, changes nothing the
second time, never replaces a secret, and refuses bad answers with the field named."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailtower.cli import build_parser
from mailtower.controller.dns import pairfile
from mailtower.controller.errors import InitError
from mailtower.controller.firstpair import answers, write
from mailtower.controller.firstpair.cli import gather
from mailtower.controller.firstpair.lab import lab_answers
from mailtower.controller.inventory import TOWER_GROUPS, tower_settings
from mailtower.controller.lab import lxc, plan
from mailtower.settings import GocSettings, TowerSettings, validate


def real_answers(**change: object) -> dict:
    towers = []
    for i, (name, net) in enumerate((("tower-a", "192.0.2"), ("tower-b", "198.51.100"))):
        towers.append(
            {
                "name": name,
                "site": ["paris", "amsterdam"][i],
                "mx": f"mx.{name}.example.net",
                "relay": f"{net}.10",
                "monitor": f"{net}.11",
                "sql": f"{net}.12,{net}.13",
                "scanners": f"{net}.101-123",
            }
        )
    data: dict = {
        "pair": "p1",
        "towers": towers,
        "goc": "203.0.113.10",
        "goc_backup": "203.0.113.11",
        "customers": [{"domain": "example.com", "server": "mail.example.com"}],
        "dns_server": "203.0.113.53",
        "dns_name": "ns1.example.net",
        "operator_networks": ["203.0.113.0/28"],
    }
    for key, value in change.items():
        target, _, field = key.partition("__")
        if field:
            data["towers"][int(target[-1])][field] = value
        else:
            data[key] = value
    return data


# pyinfra's CLI loader monkey-patches threading with gevent on import: in its own process,
# never in a test worker (xdist's worker then dies: "This operation would block forever").
_LOAD = """
import json, sys
from pyinfra.api import Config, Inventory, State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory_from_files
with ctx_state.use(State(Inventory(([], {})), Config())):
    inv = make_inventory_from_files(sys.argv[1])
hosts = [{"name": h.name, "groups": list(h.groups), "data": h.data.dict()} for h in inv]
print(json.dumps(hosts, default=str))
"""


@dataclass
class LoadedHost:
    name: str
    groups: list[str]
    data: dict


@dataclass
class LoadedInventory:
    hosts: list[LoadedHost]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.hosts)

    def get_group(self, group: str) -> list[LoadedHost]:
        return [h for h in self.hosts if group in h.groups]


def pyinfra_inventory(path: Path) -> LoadedInventory:
    """The inventory as `pyinfra <path> deploys/…` builds it (names, groups, data)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return LoadedInventory([LoadedHost(**h) for h in json.loads(out.stdout)])


def deploy_settings(path: Path) -> TowerSettings:
    """The settings roles._common.settings() builds on every host of the tower."""
    inv = pyinfra_inventory(path)
    addresses = {g: [h.name for h in inv.get_group(g)] for g in TOWER_GROUPS}
    built = [tower_settings(h.data.get("mailtower"), addresses) for h in inv]
    assert all(s == built[0] for s in built)
    return built[0]


def goc_settings(path: Path) -> GocSettings:
    """What roles/goc.py validates on the GOC (host_settings(GocSettings, "goc", …))."""
    inv = pyinfra_inventory(path)
    (goc,) = inv.get_group("goc")
    (backup,) = inv.get_group("goc_backup")
    assert backup.data.get("goc") == goc.data.get("goc")
    return validate(GocSettings, goc.data.get("goc"), "'goc' host data")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "repo" / "inventory", tmp_path / "home" / ".config" / "mailtower" / "p1"


def files_of(*roots: Path) -> dict[str, tuple[bytes, int]]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.exists() else []:
            if p.is_file():
                out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def test_what_init_writes_loads_into_the_deploys_settings(dirs) -> None:
    inv_dir, sec_dir = dirs
    a = answers.from_data(real_answers())
    write.run(a, inv_dir, sec_dir)
    s = deploy_settings(inv_dir / "tower_a.py")
    assert s.name == "tower-a" and s.hostname == "mx.tower-a.example.net"
    assert str(s.hosts.relay) == "192.0.2.10" and [str(i) for i in s.hosts.sql] == [
        "192.0.2.12",
        "192.0.2.13",
    ]
    assert len(s.hosts.scanners) == 23 and str(s.goc.address) == "203.0.113.10"
    assert s.secrets.held_by == "tower" and s.bundles and s.clamav and s.backup
    # every secret the settings need, from the tower's own file
    own = json.loads((sec_dir / "tower-a" / "secrets.json").read_text())
    assert {n: getattr(s.secrets, n) for n in s.needed_secrets()} == {
        n: own[n] for n in s.needed_secrets()
    }
    g = goc_settings(inv_dir / "p1_goc.py")
    assert [t.name for t in g.towers] == ["tower-a", "tower-b"]
    assert g.secrets.towers["tower-a"].goc_sync == own["goc_sync"]
    assert g.bundles and g.bundles.public_key == s.bundles.public_key
    assert str(g.backup.repo_host) == "203.0.113.11"
    pair, server = pairfile.load(inv_dir / "pair_p1.py")
    assert [t.relay_name for t in pair.towers] == [
        "mx.tower-a.example.net.",
        "mx.tower-b.example.net.",
    ]
    assert [t.site for t in pair.towers] == ["paris", "amsterdam"]
    assert pair.domains == ["example.com."] and server.address == "203.0.113.53"
    assert server.key is not None  # the update key init made


def test_secrets_are_private_strong_and_the_signing_key_stays_at_the_goc(dirs) -> None:
    inv_dir, sec_dir = dirs
    write.run(answers.from_data(real_answers()), inv_dir, sec_dir)
    assert sec_dir.stat().st_mode & 0o777 == 0o700
    values: list[str] = []
    for name in ("tower-a", "tower-b", "goc"):
        assert (sec_dir / name).stat().st_mode & 0o777 == 0o700
        path = sec_dir / name / "secrets.json"
        assert path.stat().st_mode & 0o777 == 0o600
        values += json.loads(path.read_text()).values()
    assert len(values) == len(set(values)) == 2 * len(write.TOWER_SECRETS) + len(write.GOC_SECRETS)
    assert min(len(v) for v in values) >= 24
    key = sec_dir / "goc" / "bundle-keys" / "signing.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert [p for p in sec_dir.rglob("signing.key")] == [key]
    assert "PRIVATE KEY" not in "".join(
        p.read_text() for p in [*sec_dir.glob("tower-*/*"), *inv_dir.glob("*.py")] if p.is_file()
    )
    assert (sec_dir / "dns-update.key").stat().st_mode & 0o777 == 0o600
    assert not any(sec_dir in p.parents for p in inv_dir.rglob("*"))


def test_a_second_run_with_the_same_answers_changes_nothing(dirs) -> None:
    inv_dir, sec_dir = dirs
    a = answers.from_data(real_answers())
    assert write.run(a, inv_dir, sec_dir).changed
    before = files_of(inv_dir, sec_dir)
    again = write.run(answers.from_data(real_answers()), inv_dir, sec_dir)
    assert not again.changed and {s.action for s in again.steps} == {"unchanged"}
    assert files_of(inv_dir, sec_dir) == before


def test_other_answers_are_refused_and_force_keeps_every_secret(dirs) -> None:
    inv_dir, sec_dir = dirs
    write.run(answers.from_data(real_answers()), inv_dir, sec_dir)
    before = files_of(inv_dir, sec_dir)
    other = answers.from_data(real_answers(towers0__scanners="192.0.2.101-122"))
    with pytest.raises(InitError, match=r"tower_a\.py: exists with other contents.*--force"):
        write.run(other, inv_dir, sec_dir)
    assert files_of(inv_dir, sec_dir) == before  # nothing written
    done = write.run(other, inv_dir, sec_dir, force=True)
    assert {str(s.path.name): s.action for s in done.steps if s.write} == {"tower_a.py": "replaced"}
    after = files_of(inv_dir, sec_dir)
    assert {k: v for k, v in after.items() if "inventory" not in k} == {
        k: v for k, v in before.items() if "inventory" not in k
    }
    assert len(deploy_settings(inv_dir / "tower_a.py").hosts.scanners) == 22


def test_a_missing_secret_is_added_only_with_force_and_the_others_kept(dirs) -> None:
    inv_dir, sec_dir = dirs
    write.run(answers.from_data(real_answers()), inv_dir, sec_dir)
    path = sec_dir / "tower-b" / "secrets.json"
    old = json.loads(path.read_text())
    del old["canary"]
    path.write_text(json.dumps(old))
    with pytest.raises(InitError, match="lacks canary"):
        write.run(answers.from_data(real_answers()), inv_dir, sec_dir)
    done = write.run(answers.from_data(real_answers()), inv_dir, sec_dir, force=True)
    assert [s.action for s in done.steps if s.path == path] == ["kept 7, added 1"]
    new = json.loads(path.read_text())
    assert {k: new[k] for k in old} == old and len(new["canary"]) >= 32
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"towers0__monitor": "192.0.2.x"}, "towers.0.monitor"),
        ({"towers1__sql": "198.51.100.12,10.1.1.300"}, "towers.1.sql"),
        ({"towers1__relay": "192.0.2.10"}, "towers.1.relay: address 192.0.2.10"),
        ({"goc_backup": "203.0.113.10"}, "goc_backup: address 203.0.113.10"),
        ({"customers": [{"domain": "exa_mple.com", "server": "10.0.0.1"}]}, "customers.0.domain"),
        ({"customers": [{"domain": "example", "server": "10.0.0.1"}]}, "customers.0.domain"),
        ({"towers0__scanners": "192.0.2.101"}, "towers.0.scanners"),
        ({"towers0__scanners": "192.0.2.101-90"}, "towers.0.scanners"),
        ({"towers1__mx": "mx tower"}, "towers.1.mx"),
        ({"towers1__site": "paris"}, "towers.1.site"),
    ],
)
def test_bad_answers_are_refused_naming_the_field_and_nothing_is_written(
    dirs, change, field
) -> None:
    inv_dir, sec_dir = dirs
    with pytest.raises(InitError, match=field.replace(".", r"\.")) as refused:
        write.run(answers.from_data(real_answers(**change)), inv_dir, sec_dir)
    assert "nothing was written" in str(refused.value)
    assert not inv_dir.exists() and not sec_dir.exists()


def test_address_ranges_and_lists() -> None:
    assert answers.parse_addresses("10.0.1.8-10, 10.0.1.20") == [
        "10.0.1.8",
        "10.0.1.9",
        "10.0.1.10",
        "10.0.1.20",
    ]
    assert answers.parse_addresses("10.0.1.254-10.0.2.1")[-1] == "10.0.2.1"
    with pytest.raises(ValueError, match="not a range"):
        answers.parse_addresses("10.0.1.8-x")


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["init", *argv])


def test_without_a_terminal_each_missing_option_is_named() -> None:
    with pytest.raises(InitError, match=r"missing --goc, .*--b-scanners, --customer") as exc:
        gather(_args("--pair", "p1"), None)
    assert "--pair" not in str(exc.value)


def test_on_a_terminal_only_the_missing_answers_are_asked(tmp_path: Path) -> None:
    given = real_answers()
    asked: list[str] = []
    replies = {"GOC address": "203.0.113.10", "tower B: relay address": "198.51.100.10"}

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return replies[prompt]

    del given["goc"]
    given["towers"][1]["relay"] = None
    (tmp_path / "a.json").write_text(json.dumps(given))
    data = gather(_args("--answers", str(tmp_path / "a.json")), ask)
    assert sorted(asked) == sorted(replies)
    assert answers.from_data(data) == answers.from_data(real_answers())


def test_the_cli_writes_and_then_reports_unchanged(dirs, tmp_path, capsys, monkeypatch) -> None:
    from mailtower.cli import main

    inv_dir, sec_dir = dirs
    (tmp_path / "a.json").write_text(json.dumps(real_answers()))
    argv = ["init", "--answers", str(tmp_path / "a.json"), "--inventory-dir", str(inv_dir)]
    argv += ["--secrets-dir", str(sec_dir)]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: nothing is asked
    assert main(argv) == 0
    assert main(argv) == 0
    assert "unchanged: every file is as these answers make it" in capsys.readouterr().out
    assert main([*argv, "--a-relay", "192.0.2.11"]) == 1
    assert "towers.0.monitor: address 192.0.2.11" in capsys.readouterr().err


def test_the_secrets_default_outside_the_repository(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert write.default_secrets_dir("p1") == tmp_path / "cfg" / "mailtower" / "p1"


# --- the lab's answers: what CI will deploy from (issue 21's proof) -----------------------------


@pytest.fixture
def lab_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(plan, "STATE_DIR", tmp_path / ".lab")
    monkeypatch.setattr(lxc, "LXC_DIR", tmp_path / "lxc")
    (tmp_path / "lxc" / "mt-sender").mkdir(parents=True)  # the twin lab: the sender exists
    (tmp_path / "lxc" / "mt-sender" / "config").write_text("")
    return tmp_path


def test_init_for_the_labs_answers_gives_the_labs_hosts_ports_and_customers(lab_state) -> None:
    from inventory._lab import goc_data, lab_groups, lab_pair, lab_tower_data

    inv_dir, sec_dir = lab_state / "inventory", lab_state / "secrets"
    a = answers.from_data(lab_answers())
    write.run(a, inv_dir, sec_dir, tsig_file=None)
    for tower in ("a", "b"):
        groups = lab_groups(tower)
        addresses = {g: [name for name, _ in groups[g]] for g in TOWER_GROUPS}
        lab = tower_settings(lab_tower_data(tower), addresses)
        ours = deploy_settings(inv_dir / f"lab_{tower}.py")
        for field in (
            "name",
            "hostname",
            "hosts",
            "ports",
            "customers",
            "goc",
            "operator_networks",
        ):
            assert getattr(ours, field) == getattr(lab, field), field
        inv = pyinfra_inventory(inv_dir / f"lab_{tower}.py")
        host = next(iter(inv))
        assert host.data.get("preflight_sizing") == "lab"
        assert host.data.get("ssh_key") == str(plan.STATE_DIR / "ssh" / "id_ed25519")
    lab_goc = GocSettings.model_validate(goc_data())
    ours_goc = goc_settings(inv_dir / "lab_goc.py")
    assert ours_goc.towers == lab_goc.towers and ours_goc.customers == lab_goc.customers
    assert ours_goc.backup and lab_goc.backup
    assert ours_goc.backup.repo_host == lab_goc.backup.repo_host
    pair, server = pairfile.load(inv_dir / "pair_lab.py")
    lab = lab_pair()
    assert pair.zones == [z + "." for z in lab["publication"]["zones"]]
    assert [t.site for t in pair.towers] == lab["sites"] and server.address == lab["server"]


def test_extra_data_goes_over_what_init_makes_and_loads_like_any(dirs) -> None:
    inv_dir, sec_dir = dirs
    extra = {
        "tower-b": {
            "postmaster": "ops@example.net",
            "alerts": {"to": ["ops@example.net"], "fallback": {"host": "mx.example.net"}},
            "clamav": None,  # no official databases on this tower
        },
        "goc": {
            "eye_listen": "127.0.0.1:8025",
            "eye_tls_self_signed": [],
            "eye_origin": "https://eye.example.net",
        },
    }
    write.run(answers.from_data(real_answers(extra=extra)), inv_dir, sec_dir)
    s = deploy_settings(inv_dir / "tower_b.py")
    assert s.postmaster == "ops@example.net" and s.alerts and s.alerts.fallback
    assert s.clamav is None and s.bundles is not None
    assert goc_settings(inv_dir / "p1_goc.py").eye_origin == "https://eye.example.net"
    with pytest.raises(InitError, match=r"extra: \['tower-c'\]"):
        answers.from_data(real_answers(extra={"tower-c": {}}))


# --- refusals the review found (names, paths, keys, races) ------------------------------------


def test_a_secrets_file_appearing_after_the_plan_is_never_replaced(dirs) -> None:
    inv_dir, sec_dir = dirs
    a = answers.from_data(real_answers())
    planned = write.plan(a, inv_dir, sec_dir)
    target = sec_dir / "tower-a" / "secrets.json"
    assert any(s.path == target and s.action == "created" for s in planned.steps)
    target.parent.mkdir(parents=True)
    target.write_text('{"sql_relay": "theirs"}\n')
    with pytest.raises(InitError, match="appeared after init planned to create it"):
        write.apply(planned, sec_dir)
    assert target.read_text() == '{"sql_relay": "theirs"}\n'
    assert [p.name for p in target.parent.iterdir()] == ["secrets.json"]  # no temp file left


def test_force_replaces_a_public_key_of_another_pair(dirs) -> None:
    inv_dir, sec_dir = dirs
    old = sec_dir / "tower-a" / write.TOWER_PUBLIC_KEY
    old.parent.mkdir(parents=True)
    old.write_text("another pair's key\n")
    a = answers.from_data(real_answers())
    with pytest.raises(InitError, match="a public key of another pair"):
        write.run(a, inv_dir, sec_dir)
    write.run(a, inv_dir, sec_dir, force=True)
    assert old.read_text() == (sec_dir / "goc" / "bundle-keys" / "signing.pub").read_text()


def test_the_tsig_file_is_expanded_absolute_and_checked(dirs, tmp_path, monkeypatch) -> None:
    from mailtower.controller.dns.server import TsigKey

    inv_dir, sec_dir = dirs
    monkeypatch.setenv("HOME", str(tmp_path))
    a = answers.from_data(real_answers())
    (tmp_path / "bad.key").write_text("not a key\n")
    with pytest.raises(InitError, match=rf"--tsig-file {tmp_path}/bad.key: not a TSIG key file"):
        write.run(a, inv_dir, sec_dir, tsig_file=Path("~/bad.key"))
    (tmp_path / "dns.key").write_text(TsigKey("p1-update", "c2VjcmV0", "hmac-sha256").to_bind())
    write.run(a, inv_dir, sec_dir, tsig_file=Path("~/dns.key"))
    text = (inv_dir / "pair_p1.py").read_text()
    assert f'"tsig_file": "{tmp_path}/dns.key"' in text


def test_answers_with_one_tower_ask_for_the_other(tmp_path) -> None:
    given = real_answers()
    del given["towers"][1]
    (tmp_path / "a.json").write_text(json.dumps(given))
    with pytest.raises(InitError, match=r"missing --b-name, --b-site"):
        gather(_args("--answers", str(tmp_path / "a.json")), None)
    given["towers"] = [{}, {}, {}]
    (tmp_path / "a.json").write_text(json.dumps(given))
    with pytest.raises(InitError, match="at most two objects"):
        gather(_args("--answers", str(tmp_path / "a.json")), None)


def test_half_a_bundle_key_pair_is_refused_not_a_traceback(dirs) -> None:
    inv_dir, sec_dir = dirs
    a = answers.from_data(real_answers())
    write.run(a, inv_dir, sec_dir)
    (sec_dir / "goc" / "bundle-keys" / "signing.pub").unlink()
    with pytest.raises(InitError, match="one half of the bundle key pair is missing"):
        write.run(a, inv_dir, sec_dir)


@pytest.mark.parametrize("name", ["goc", "pair-p1"])
def test_a_tower_named_like_the_gocs_secrets_or_the_pair_file_is_refused(dirs, name) -> None:
    inv_dir, sec_dir = dirs
    with pytest.raises(InitError, match=rf"towers\.0\.name: '{name}' is taken"):
        write.run(answers.from_data(real_answers(towers0__name=name)), inv_dir, sec_dir)
    assert not inv_dir.exists() and not sec_dir.exists()


def test_plan_refuses_two_files_at_one_path(dirs) -> None:
    inv_dir, sec_dir = dirs
    a = answers.from_data(real_answers())
    # past the answers' own check: plan() still refuses
    a = a.model_copy(
        update={"towers": [a.towers[0].model_copy(update={"name": "goc"}), a.towers[1]]}
    )
    with pytest.raises(InitError, match=r"goc/secrets\.json: two of the files init writes"):
        write.plan(a, inv_dir, sec_dir)
    assert not sec_dir.exists()


def test_secrets_inside_the_inventory_dir_or_a_git_work_tree_are_refused(tmp_path) -> None:
    import os
    import subprocess

    a = answers.from_data(real_answers())
    inv_dir = tmp_path / "inventory"
    with pytest.raises(InitError, match="is inside the inventory dir"):
        write.run(a, inv_dir, inv_dir / "secrets")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE")}
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env)
    with pytest.raises(InitError, match=rf"inside the git work tree {repo}"):
        write.run(a, tmp_path / "elsewhere", repo / "not" / "yet" / "there")
    assert not (repo / "not").exists() and not (tmp_path / "elsewhere").exists()
    write.run(a, inv_dir, tmp_path / "secrets")  # neither: written
