"""Issue 21's proof path: `invoke lab` (CI) writes the twin lab's inventories with ``init``
(the lab's answers and the lab's extra, one function shared with inventory/_lab.py) and
deploys them through the guide's commands; the lab's tests then load those inventories and the
secrets init wrote. Here, without a lab: init's inventories give settings and host lists EQUAL
to the lab's own (every field; secrets from init's files), the tasks' command sequence (fakes
for pyinfra, the preflight, DNS), and the tests' inventory lookup."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import invoke
import pytest

from mailtower.controller import inventory as inventory_mod
from mailtower.controller.dns import pairfile
from mailtower.controller.firstpair import answers, write
from mailtower.controller.firstpair import lab as lab_mod
from mailtower.controller.lab import lxc, plan
from mailtower.settings import GocSettings, TowerSettings

ROOT = Path(__file__).resolve().parents[2]
TOWER_GROUPS = ("relay", "monitor", "sql", "scanners")


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A twin lab's state on the controller, in tmp_path (not the real lab's)."""
    monkeypatch.setattr(plan, "STATE_DIR", tmp_path / "clone" / ".lab")
    monkeypatch.setattr(lxc, "LXC_DIR", tmp_path / "lxc")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv(lab_mod.SOURCE_ENV, raising=False)
    monkeypatch.delenv("MAILTOWER_LAB_SCANNERS", raising=False)
    (tmp_path / "clone").mkdir()
    (tmp_path / "lxc" / "mt-sender").mkdir(parents=True)  # the twin lab: the sender exists
    (tmp_path / "lxc" / "mt-sender" / "config").write_text("")
    return tmp_path


def _tsig() -> Path:
    """The lab DNS server's key in BIND syntax, as tasks.lab_init gives it to init."""
    from mailtower.controller.dns.server import TsigKey

    key = json.loads(lxc.tsig_key_file().read_text())
    path = lxc.state_dir() / "dns-update.key"
    path.write_text(TsigKey(key["name"], key["secret"], key["algorithm"]).to_bind())
    return path


def _init(lab: Path) -> Path:
    from inventory._lab import init_answers

    out = lab_mod.generated_dir()
    write.run(answers.from_data(init_answers()), out, lab_mod.lab_secrets_dir(), tsig_file=_tsig())
    return out


def _hosts(path: Path) -> dict[str, list[tuple[str, dict]]]:
    """Each group's hosts with their data, the lab's container names left out (init's
    inventories name hosts by address; the tests take the names from the plan: complete)."""
    inv = inventory_mod.load(path)
    return {
        g: [(h.name, {k: v for k, v in h.data.items() if k != "lab_name"}) for h in hosts]
        for g, hosts in inv.groups.items()
        if hosts
    }


def _secret_file(name: str) -> dict[str, str]:
    return json.loads((lab_mod.lab_secrets_dir() / name / "secrets.json").read_text())


SECRET = "<secret>"


def _tower_dump(s: TowerSettings) -> dict:
    """Every field, the secrets and what lives beside them (the bundle key, the backup CA's
    directory) replaced by a mark: they are the only fields that differ by design."""
    d = s.model_dump(mode="json")
    d["secrets"] = SECRET
    d["bundles"]["public_key"] = SECRET
    d["backup"]["tls_dir"] = SECRET
    return d


def _goc_dump(g: GocSettings) -> dict:
    d = g.model_dump(mode="json")
    d["secrets"] = SECRET
    d["operators"] = {name: SECRET for name in d["operators"]}
    d["bundles"] = {k: SECRET for k in d["bundles"]}
    d["backup"]["tls_dir"] = SECRET
    return d


def test_inits_lab_inventories_equal_the_labs_own_but_for_the_secrets(lab: Path) -> None:
    out = _init(lab)
    for tower in ("a", "b"):
        name = f"lab-{tower}"
        ours_path, theirs_path = out / f"lab_{tower}.py", ROOT / "inventory" / f"lab_{tower}.py"
        ours = inventory_mod.settings_of(inventory_mod.load(ours_path))
        theirs = inventory_mod.settings_of(inventory_mod.load(theirs_path))
        assert _tower_dump(ours) == _tower_dump(theirs), name
        theirs_hosts = _hosts(theirs_path)
        assert {g: h for g, h in theirs_hosts.items() if g != "customers"} == _hosts(ours_path)
        # the secrets are init's, from its files (never the lab's .lab/secrets.json)
        own = _secret_file(name)
        assert {n: getattr(ours.secrets, n) for n in ours.needed_secrets()} == {
            n: own[n] for n in ours.needed_secrets()
        }
        assert not set(own.values()) & set(lxc.tower_secrets(name).values())
        pub = lab_mod.lab_secrets_dir() / "goc" / "bundle-keys" / "signing.pub"
        assert ours.bundles and ours.bundles.public_key == pub.read_text()
        assert ours.backup and ours.backup.tls_dir == str(
            lab_mod.lab_secrets_dir() / name / "pgbackrest-tls"
        )
    ours_goc = inventory_mod.load(out / "lab_goc.py")
    theirs_goc = inventory_mod.load(ROOT / "inventory" / "lab_goc.py")
    g_ours = GocSettings.model_validate(ours_goc.group_data["goc"]["goc"])
    g_theirs = GocSettings.model_validate(theirs_goc.group_data["goc"]["goc"])
    assert _goc_dump(g_ours) == _goc_dump(g_theirs)
    assert _hosts(out / "lab_goc.py") == _hosts(ROOT / "inventory" / "lab_goc.py")
    assert ours_goc.group_data["goc_backup"] == ours_goc.group_data["goc"]
    goc_own = _secret_file("goc")
    assert g_ours.secrets.eye_db == goc_own["eye_db"]
    assert g_ours.operators == {"operator": goc_own["eye_operator"]}
    assert g_ours.secrets.towers["lab-b"].goc_sync == _secret_file("lab-b")["goc_sync"]
    key = lab_mod.lab_secrets_dir() / "goc" / "bundle-keys" / "signing.key"
    assert g_ours.bundles and g_ours.bundles.signing_key == key.read_text()
    # the pair: the same towers, sites, zones, name servers, DNS server and key
    ours_pair, ours_server = pairfile.load(out / "pair_lab.py")
    theirs_pair, theirs_server = pairfile.load(ROOT / "inventory" / "pair_lab.py")
    assert ours_pair == theirs_pair
    assert ours_server == theirs_server


def test_the_lab_extra_is_one_function_for_both_ways(lab: Path) -> None:
    """Every field the lab adds reaches both: the lab's own data is init's base with the same
    extra merged (a change to lab_tower_extra changes both inventories)."""
    from inventory._lab import init_answers, lab_extra, lab_goc_extra, lab_tower_data

    extra = init_answers()["extra"]
    assert extra == lab_extra() and set(extra) == {"lab-a", "lab-b", "goc"}
    data = lab_tower_data("a")
    for key, value in extra["lab-a"].items():
        if isinstance(value, dict):
            assert {k: data[key][k] for k in value} == value, key
        else:
            assert data[key] == value, key
    assert extra["goc"] == lab_goc_extra() and extra["goc"]["backup"] == {
        "archive_switch_s": 60,
        "alert_archive_stall_s": 900,
    }


def test_inits_lab_secrets_are_private_and_outside_the_clone(lab: Path) -> None:
    _init(lab)
    secrets_dir = lab_mod.lab_secrets_dir()
    assert secrets_dir.is_relative_to(lab / "state" / "mailtower")
    assert not secrets_dir.is_relative_to(plan.STATE_DIR.parent)
    for name in ("lab-a", "lab-b", "goc"):
        path = secrets_dir / name / "secrets.json"
        assert path.stat().st_mode & 0o777 == 0o600
        assert (secrets_dir / name).stat().st_mode & 0o777 == 0o700
    assert not list(lab_mod.generated_dir().rglob("secrets.json"))
    # init refuses a secrets directory in a git work tree: the lab's state dir is one
    subprocess.run(["git", "init", "-q", str(plan.STATE_DIR.parent)], check=True)
    from inventory._lab import init_answers
    from mailtower.controller.errors import InitError

    with pytest.raises(InitError, match="inside the git work tree"):
        write.run(answers.from_data(init_answers()), lab / "inv", plan.STATE_DIR / "secrets")


def test_the_default_lab_secrets_dir_is_outside_this_repository(monkeypatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    path = lab_mod.lab_secrets_dir()
    assert path.parent == Path.home() / ".local" / "state" / "mailtower"
    assert not path.is_relative_to(ROOT)


# --- the lookup the lab's tasks and tests share ----------------------------------------------


def test_the_inventory_source_env_then_record_then_the_labs_own(lab, monkeypatch) -> None:
    assert lab_mod.inventory_source() == "repo"
    assert lab_mod.lab_inventory(ROOT, "lab_a.py") == ROOT / "inventory" / "lab_a.py"
    lab_mod.record_inventory_source("init")
    assert lab_mod.inventory_source() == "init"
    assert lab_mod.lab_inventory(ROOT, "lab_a.py") == plan.STATE_DIR / "inventory" / "lab_a.py"
    assert (
        lab_mod.lab_inventory(ROOT, "pair_lab.py") == plan.STATE_DIR / "inventory" / "pair_lab.py"
    )
    # the lab's internet is the lab's own either way
    assert lab_mod.lab_inventory(ROOT, "lab_internet.py") == ROOT / "inventory" / "lab_internet.py"
    monkeypatch.setenv(lab_mod.SOURCE_ENV, "repo")
    assert lab_mod.lab_inventory(ROOT, "lab_goc.py") == ROOT / "inventory" / "lab_goc.py"
    monkeypatch.setenv(lab_mod.SOURCE_ENV, "other")
    with pytest.raises(ValueError, match="MAILTOWER_LAB_INVENTORY='other'"):
        lab_mod.inventory_source()


def test_the_tests_load_inits_inventories_and_secrets_when_the_lab_was_built_so(
    lab, monkeypatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    from towerlib import Hosts, Tower

    _init(lab)
    lab_mod.record_inventory_source("init")
    tower = Tower("lab-a")
    assert tower.inventory_path == plan.STATE_DIR / "inventory" / "lab_a.py"
    assert tower.settings.secrets.sql_relay == _secret_file("lab-a")["sql_relay"]
    # what only the lab's checks read, from the plan: container names, customers' servers
    relay = tower.hosts("relay")[0]
    assert relay.data["lab_name"] == "mt-a-relay"
    assert tower.hosts("scanners")[22].data["lab_name"] == "mt-a-s23"
    customers = tower.hosts("customers")
    assert [(h.name, h.data["lab_name"]) for h in customers] == [
        ("10.201.0.101", "mt-cust1"),
        ("10.201.0.102", "mt-cust2"),
    ]
    assert customers[0].data["ssh_key"] == relay.data["ssh_key"]
    assert tower.entry("10.201.0.101").name == "10.201.0.101"
    goc = Hosts("lab-goc")
    assert goc.inventory_path == plan.STATE_DIR / "inventory" / "lab_goc.py"
    assert goc.hosts("goc")[0].data["lab_name"] == "mt-goc"
    assert "customers" not in goc.inventory.groups  # a GOC's inventory is left as it is
    assert (
        goc.inventory.group_data["goc"]["goc"]["operators"]["operator"]
        == (_secret_file("goc")["eye_operator"])
    )
    lab_mod.record_inventory_source("repo")
    own = Tower("lab-a")
    assert own.inventory_path == ROOT / "inventory" / "lab_a.py"
    assert own.settings.secrets.sql_relay == lxc.tower_secrets("lab-a")["sql_relay"]


# --- the tasks: `invoke lab` through init and the guide's commands -----------------------------


@pytest.fixture
def fake_lab(lab, monkeypatch):
    """tasks.py with pyinfra, the preflight, the stand-in upstream, DNS, the lab's hosts and
    verification faked: each records what it was asked."""
    import tasks

    steps: list[tuple[str, ...]] = []

    def shown(path) -> str:
        path = Path(path)
        for base, mark in ((plan.STATE_DIR, ".lab"), (ROOT, "")):
            if path.is_relative_to(base):
                return str(Path(mark) / path.relative_to(base))
        return str(path)

    monkeypatch.setattr(
        tasks,
        "_pyinfra",
        lambda c, inv, script, what, extra="": steps.append(
            ("pyinfra", shown(inv), script, extra.strip())
        ),
    )
    monkeypatch.setattr(
        tasks,
        "run_preflight",
        lambda tower: steps.append(("preflight", shown(tower) if "/" in tower else tower)),
    )
    monkeypatch.setattr(
        tasks, "_clamav_upstream_initial", lambda: steps.append(("clamav upstream",))
    )
    monkeypatch.setattr(
        tasks,
        "dns",
        lambda c, pair="lab", dry_run=False: steps.append(
            ("dns", shown(pair) if "/" in pair else pair)
        ),
    )
    monkeypatch.setattr(
        tasks, "up", lambda c, towers="a", scanners=None: steps.append(("up", towers))
    )
    monkeypatch.setattr(
        tasks, "verify", lambda c, tower="lab-a", k="", workers=4: steps.append(("verify", tower))
    )
    return tasks, steps


GUIDE = [
    ("pyinfra", "inventory/lab_internet.py", "deploys/lab_internet.py", ""),
    ("clamav upstream",),
    ("preflight", ".lab/inventory/lab_goc.py"),
    ("pyinfra", ".lab/inventory/lab_goc.py", "deploys/goc.py", ""),
    ("preflight", ".lab/inventory/lab_a.py"),
    ("pyinfra", ".lab/inventory/lab_a.py", "deploys/tower.py", ""),
    ("preflight", ".lab/inventory/lab_b.py"),
    ("pyinfra", ".lab/inventory/lab_b.py", "deploys/tower.py", ""),
    ("preflight", ".lab/inventory/lab_goc.py"),
    ("pyinfra", ".lab/inventory/lab_goc.py", "deploys/goc.py", ""),
    ("dns", ".lab/inventory/pair_lab.py"),
]


def test_invoke_lab_runs_init_then_the_guides_commands(fake_lab, capsys) -> None:
    tasks, steps = fake_lab
    tasks.lab(invoke.Context())
    assert steps == [("up", "a,b"), *GUIDE, ("verify", "lab")]
    out = capsys.readouterr().out
    assert "created" in out and "lab_goc.py" in out
    assert lab_mod.inventory_source() == "init"
    assert sorted(p.name for p in lab_mod.generated_dir().iterdir()) == sorted(lab_mod.GENERATED)
    # a second run: init changes nothing, the same commands
    steps.clear()
    before = {p: p.read_bytes() for p in lab_mod.lab_secrets_dir().rglob("*") if p.is_file()}
    tasks.lab(invoke.Context())
    assert steps == [("up", "a,b"), *GUIDE, ("verify", "lab")]
    assert "unchanged: every file is as these answers make it" in capsys.readouterr().out
    after = {p: p.read_bytes() for p in lab_mod.lab_secrets_dir().rglob("*") if p.is_file()}
    assert after == before


def test_a_deploy_flag_reaches_each_tower_only(fake_lab) -> None:
    tasks, steps = fake_lab
    lab_mod.record_inventory_source("init")
    tasks.deploy(invoke.Context(), tower="lab", engines=True, preflight=False)
    assert [s for s in steps if s[0] == "preflight"] == []
    assert [s[1:] for s in steps if s[0] == "pyinfra"][1:] == [
        (".lab/inventory/lab_goc.py", "deploys/goc.py", ""),
        (".lab/inventory/lab_a.py", "deploys/tower.py", "--data upgrade_engines=true"),
        (".lab/inventory/lab_b.py", "deploys/tower.py", "--data upgrade_engines=true"),
        (".lab/inventory/lab_goc.py", "deploys/goc.py", ""),
    ]


def test_the_labs_own_inventories_on_request_and_for_one_tower(fake_lab, monkeypatch) -> None:
    tasks, steps = fake_lab
    monkeypatch.setenv(lab_mod.SOURCE_ENV, "repo")
    tasks.lab(invoke.Context())
    assert steps == [
        ("up", "a,b"),
        ("preflight", "lab"),
        ("pyinfra", "inventory/lab_internet.py", "deploys/lab_internet.py", ""),
        ("clamav upstream",),
        ("pyinfra", "inventory/lab_goc.py", "deploys/goc.py", ""),
        ("pyinfra", "inventory/lab_a.py", "deploys/lab.py", ""),
        ("pyinfra", "inventory/lab_b.py", "deploys/lab.py", ""),
        ("pyinfra", "inventory/lab_goc.py", "deploys/goc.py", ""),
        ("dns", "lab"),
        ("verify", "lab"),
    ]
    assert not lab_mod.generated_dir().exists()
    monkeypatch.delenv(lab_mod.SOURCE_ENV)
    steps.clear()
    tasks.lab(invoke.Context(), tower="lab-a")  # a tower alone: the lab's own inventories
    assert lab_mod.inventory_source() == "repo"
    assert steps[2:5] == [
        ("pyinfra", "inventory/lab_goc.py", "deploys/goc.py", ""),
        ("pyinfra", "inventory/lab_a.py", "deploys/lab.py", ""),
        ("pyinfra", "inventory/lab_goc.py", "deploys/goc.py", ""),
    ]
    monkeypatch.setenv(lab_mod.SOURCE_ENV, "init")
    with pytest.raises(invoke.Exit, match="twin lab's"):
        tasks.lab(invoke.Context(), tower="lab-a")


def test_tasks_resolve_the_labs_names_and_inventory_paths(fake_lab) -> None:
    tasks, _ = fake_lab
    _init(None)  # type: ignore[arg-type]
    assert tasks.inventory_path("lab-a") == ROOT / "inventory" / "lab_a.py"
    lab_mod.record_inventory_source("init")
    assert tasks.inventory_path("lab-a") == plan.STATE_DIR / "inventory" / "lab_a.py"
    assert tasks.inventory_path("lab-internet") == ROOT / "inventory" / "lab_internet.py"
    given = str(plan.STATE_DIR / "inventory" / "lab_b.py")
    assert tasks.inventory_path(given) == Path(given)
    with pytest.raises(invoke.Exit, match="no inventory for tower 'tower-x'"):
        tasks.inventory_path("tower-x")
    assert tasks._pair_path("lab") == plan.STATE_DIR / "inventory" / "pair_lab.py"


def test_pyinfra_loads_inits_lab_inventories_into_the_same_settings(lab: Path) -> None:
    """What the deploy builds on every host (pyinfra's loader, in its own process) is what
    the lab's checks load (tests/towerlib.py: inventory.load)."""
    from test_init import deploy_settings, goc_settings

    out = _init(lab)
    for tower in ("a", "b"):
        path = out / f"lab_{tower}.py"
        assert deploy_settings(path) == inventory_mod.settings_of(inventory_mod.load(path))
    goc = inventory_mod.load(out / "lab_goc.py").group_data["goc"]["goc"]
    assert goc_settings(out / "lab_goc.py") == GocSettings.model_validate(goc)


def test_a_changed_lab_inventory_follows_the_labs_code_and_keeps_the_secrets(
    fake_lab, capsys
) -> None:
    tasks, _ = fake_lab
    tasks.lab_init(invoke.Context())
    path = lab_mod.generated_dir() / "lab_a.py"
    made = path.read_text()
    before = {p: p.read_bytes() for p in lab_mod.lab_secrets_dir().rglob("*") if p.is_file()}
    path.write_text(made.replace('"scan_workers": 1', '"scan_workers": 2'))
    capsys.readouterr()
    tasks.lab_init(invoke.Context())
    assert f"replaced   {path}" in capsys.readouterr().out
    assert path.read_text() == made
    after = {p: p.read_bytes() for p in lab_mod.lab_secrets_dir().rglob("*") if p.is_file()}
    assert after == before


def test_the_lab_going_down_forgets_init_and_removes_its_secrets(lab: Path) -> None:
    """After `invoke lab.down` a later lab loads the repository's inventories again, and no
    secret of the destroyed lab is left on the machine."""
    lab_mod.record_inventory_source("init")
    secrets = lab_mod.lab_secrets_dir() / "lab-a"
    secrets.mkdir(parents=True)
    (secrets / "secrets.json").write_text("{}")
    lab_mod.generated_dir().mkdir(parents=True)
    (lab_mod.generated_dir() / "lab_a.py").write_text("")
    assert lab_mod.inventory_source() == "init"
    removed = lab_mod.forget_init_lab()
    assert len(removed) == 3, removed
    assert lab_mod.inventory_source() == "repo"
    assert not lab_mod.lab_secrets_dir().exists()
    assert not lab_mod.generated_dir().exists()
    assert lab_mod.forget_init_lab() == []  # nothing left: a second `down` removes nothing
