"""The settings model refuses broken tower data with a message naming the field."""

from __future__ import annotations

import json

import pytest

from mailtower import settings
from mailtower.controller import inventory
from mailtower.errors import SettingsError

SECRETS = {k: "x" * 20 for k in ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication")}


def data(**overrides):
    base = {
        "name": "t1",
        "hostname": "mx.t1.example",
        "customers": [{"domain": "c.example", "server": "10.0.0.1"}],
        "secrets": SECRETS,
    }
    base.update(overrides)
    return base


ADDRS = {
    "relay": ["10.0.1.10"],
    "monitor": ["10.0.1.11"],
    "sql": ["10.0.1.12", "10.0.1.13"],
    "scanners": ["10.0.1.101", "10.0.1.102"],
}


def test_valid_tower():
    s = inventory.tower_settings(data(), ADDRS)
    assert s.sql_primary.exploded == "10.0.1.12"
    assert s.limits.queue_lifetime == "3d"
    assert s.customers[0].transport == "smtp:[10.0.0.1]:25"
    assert "host=10.0.1.12,10.0.1.13" in s.sql_dsn("u", "p")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"customers": [{"domain": "not a domain", "server": "10.0.0.1"}]}, "customers.0.domain"),
        ({"customers": [{"domain": "c.example", "server": "bad;server"}]}, "customers.0.server"),
        (
            {
                "customers": [
                    {"domain": "c.example", "server": "a.b"},
                    {"domain": "C.example.", "server": "a.b"},
                ]
            },
            "customers",
        ),
        ({"limits": {"queue_lifetime": "three days"}}, "limits.queue_lifetime"),
        ({"secrets": {**SECRETS, "sql_relay": "short"}}, "secrets.sql_relay"),
        ({"name": "Tower One"}, "name"),
        ({"surprise": 1}, "surprise"),
        ({"postmaster": "postmaster"}, "postmaster"),  # must be deliverable: user@domain
        ({"limits": {"client_limit_exempt": ["10.0.0.0/33"]}}, "limits.client_limit_exempt.0"),
        ({"limits": {"recipients_per_message": 0}}, "limits.recipients_per_message"),
    ],
)
def test_broken_data_names_the_field(change, field):
    with pytest.raises(SettingsError) as err:
        inventory.tower_settings(data(**change), ADDRS)
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("addrs", "message"),
    [
        ({**ADDRS, "relay": []}, "exactly one relay"),
        ({**ADDRS, "monitor": ["10.0.1.11", "10.0.1.14"]}, "exactly one monitor"),
        ({**ADDRS, "sql": ["10.0.1.12"]}, "hosts.sql"),
        ({**ADDRS, "scanners": ["10.0.1.101", "10.0.1.101"]}, "given to two hosts"),
        ({**ADDRS, "scanners": ["10.0.1.999"]}, "hosts.scanners.0"),
    ],
)
def test_broken_topology(addrs, message):
    with pytest.raises(SettingsError) as err:
        inventory.tower_settings(data(), addrs)
    assert message in str(err.value)


def test_load_round_trip(tmp_path):
    s = inventory.tower_settings(data(), ADDRS)
    path = tmp_path / "tower.json"
    path.write_text(s.model_dump_json())
    assert settings.load(path) == s


def test_load_missing_and_corrupt(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        settings.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "t"}))
    with pytest.raises(SettingsError, match="invalid tower settings"):
        settings.load(bad)


LEAKED = "Leaked-Pw-0123"  # too short for any secret (16): refused, and never echoed


def _bad_secret_file(kind):
    """(loader, content) of a settings file holding LEAKED as a password its model refuses."""
    from mailtower.goc.sync import deployed

    if kind == "tower settings":
        tower_data = json.loads(inventory.tower_settings(data(), ADDRS).model_dump_json())
        tower_data["secrets"]["sql_relay"] = LEAKED
        return settings.load, tower_data
    if kind == "sync tower.json":
        content = {"tower": "t1", "goc_conninfo": "host=goc", "sync_password": LEAKED}
        return lambda p: deployed.load(p, deployed.TowerSide), content
    goc_tower = {
        "name": "t1",
        "hosts": ["10.0.1.12"],
        "sync_password": "x" * 16,
        "goc_sync_password": LEAKED,
        "status_password": "y" * 16,
    }
    content = {"eye_password": "e" * 16, "towers": [goc_tower], "old_password": LEAKED}
    return lambda p: deployed.load(p, deployed.GocSide), content


@pytest.mark.parametrize("kind", ["tower settings", "sync tower.json", "sync goc.json"])
def test_a_refused_password_is_never_in_the_error_text(tmp_path, kind):
    """Errors reach deploy output and logs: they name the field, never its value."""
    loader, content = _bad_secret_file(kind)
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(content))
    with pytest.raises(Exception, match="invalid") as err:
        loader(path)
    assert LEAKED not in str(err.value)
    assert "password" in str(err.value) or "sql_relay" in str(err.value)


def test_connection_strings_keep_any_password_whole():
    """libpq reads back exactly the password given, whatever it holds."""
    from psycopg.conninfo import conninfo_to_dict

    goc_secrets = {k: "x" * 16 for k in ("sql_sync", "goc_sync", "goc_status")}
    tower = data(goc={"address": "10.0.9.10"}, secrets={**SECRETS, **goc_secrets})
    s = inventory.tower_settings(tower, ADDRS)
    for password in ("plain-token_123", "with space", "quote'and\\backslash", "a=b c='d'"):
        dsn = conninfo_to_dict(s.sql_dsn("mailtower_monitor", password, writable=True))
        assert dsn["password"] == password and dsn["host"] == "10.0.1.12,10.0.1.13"
        assert dsn["target_session_attrs"] == "read-write"
        # a vanished server is noticed in seconds, not after TCP's retransmissions
        assert dsn["tcp_user_timeout"] == "10000" and dsn["keepalives"] == "1"
        goc = conninfo_to_dict(s.goc_conninfo("mt_status", password))
        assert (goc["password"], goc["host"], goc["dbname"]) == (password, "10.0.9.10", "goc")


def test_relay_limits_round_trip_and_derive_the_filters():
    s = inventory.tower_settings(
        data(
            postmaster="mail-ops@c.example",
            limits={"client_limit_exempt": ["10.201.0.1/32"], "message_size_bytes": 3000},
        ),
        ADDRS,
    )
    again = settings.TowerSettings.model_validate(json.loads(s.model_dump_json()))
    assert again == s
    assert str(again.limits.client_limit_exempt[0]) == "10.201.0.1/32"
    limits = s.limits
    # The filter takes strictly more than the relay: its limits are derived, never written.
    assert limits.filter_message_bytes > limits.message_size_bytes + limits.relay_header_bytes
    assert limits.reinject_message_bytes > limits.filter_message_bytes
    assert limits.filter_line_length == limits.filter_line_bytes + 3
    assert limits.filter_command_bytes > 4 * limits.address_path_max


GOC_SECRETS = {k: "g" * 20 for k in ("sql_sync", "goc_sync", "goc_status")}
# Every secret a value of its own, so a leak of one is seen by its value.
EVERY = {name: f"{name}-value-0123456789" for name in settings.SECRET_NAMES}


def _full():
    """A tower with a GOC and rule bundles: every secret is in play."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    tower = data(
        goc={"address": "10.0.9.10"},
        secrets=EVERY,
        rules_dir="/var/lib/mailtower/rules",
        bundles={"public_key": pem},
    )
    return inventory.tower_settings(tower, ADDRS)


@pytest.mark.parametrize(
    ("role", "share"),
    [
        ("relay", {"sql_relay"}),
        ("scanners", {"sql_scanner", "canary"}),
        ("monitor", {"sql_monitor", "goc_status", "canary"}),
    ],
)
def test_each_role_gets_only_its_share_of_the_secrets(role, share):
    """tower.json on a host holds what its daemons read and nothing else (issue 15: every
    secret of the tower on every host, readable by scand)."""
    copy = _full().for_role(role)
    held = {n for n in settings.SECRET_NAMES if getattr(copy.secrets, n)}
    assert held == share
    assert copy.secrets.held_by == role
    text = copy.model_dump_json()
    for name in set(settings.SECRET_NAMES) - share:
        assert EVERY[name] not in text, f"{role}'s tower.json carries {name}"
    # What the host loads validates as that role's share.
    reloaded = settings.TowerSettings.model_validate_json(text)
    assert reloaded.secrets == copy.secrets


def test_a_share_holding_another_roles_secret_is_refused():
    share = _full().for_role("scanners").model_dump()
    share["secrets"]["sql_relay"] = "r" * 20
    with pytest.raises(
        ValueError, match=r"scanners' share of the secrets must not hold \['sql_relay'\]"
    ):
        settings.TowerSettings.model_validate(share)


def test_a_share_missing_its_own_secret_is_refused():
    share = _full().for_role("monitor").model_dump()
    share["secrets"]["goc_status"] = None
    with pytest.raises(ValueError, match="monitor' share of needs secrets.goc_status"):
        settings.TowerSettings.model_validate(share)


def test_the_whole_set_names_each_missing_secret():
    with pytest.raises(SettingsError, match="secrets.sql_monitor"):
        inventory.tower_settings(data(secrets={**SECRETS, "sql_monitor": None}), ADDRS)
    with pytest.raises(SettingsError, match="a tower synced with a GOC needs secrets.goc_status"):
        no_status = {**SECRETS, **GOC_SECRETS, "goc_status": None}
        inventory.tower_settings(data(goc={"address": "10.0.9.10"}, secrets=no_status), ADDRS)


def test_secret_names_what_a_host_lacks():
    scanner = _full().for_role("scanners")
    assert scanner.secret("sql_scanner") == EVERY["sql_scanner"]
    with pytest.raises(
        SettingsError, match=r"secrets.sql_monitor is not in these settings \(held by: scanners\)"
    ):
        scanner.secret("sql_monitor")
    with pytest.raises(SettingsError, match="no secret share for role 'sql'"):
        _full().for_role("sql")


def test_the_gocs_clamav_check_keeps_clamavs_mirror_rules() -> None:
    from mailtower.settings import ClamavUpstream

    assert ClamavUpstream().check_interval == "1h"
    with pytest.raises(ValueError, match="at most once an hour"):
        ClamavUpstream(check_interval="5m")
    with pytest.raises(ValueError, match="needs a unit"):
        ClamavUpstream(check_interval="3600")
    # a mirror of one's own (the lab's stand-in) may be asked as often as its owner likes
    assert ClamavUpstream(url="http://10.201.0.53", check_interval="2m").check_interval == "2m"


@pytest.mark.parametrize("value", ["../../etc/cron.d/x", "/tmp/x.ndb", "a/b.ndb", ".hidden"])
def test_a_feeds_file_name_option_is_a_plain_name(value: str) -> None:
    from mailtower.settings import ClamavFeed

    with pytest.raises(ValueError, match="not a plain file name"):
        ClamavFeed(name="sanesecurity", options={"filename_junk": value})
    assert ClamavFeed(name="sanesecurity", options={"filename_junk": "junk.ndb"})


def test_the_policy_full_reload_defaults_behind_the_polls() -> None:
    s = inventory.tower_settings(data(), ADDRS)
    assert (s.policy_poll_s, s.policy_full_reload_s) == (1.0, 300.0)
    s = inventory.tower_settings(data(policy_poll_s=5, policy_full_reload_s=10.5), ADDRS)
    assert s.policy_full_reload_s == 10.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"policy_full_reload_s": 1}, "policy_full_reload_s (1) must be more than twice"),
        ({"policy_poll_s": 150}, "policy_full_reload_s (300) must be more than twice"),
        ({"policy_poll_s": 5, "policy_full_reload_s": 10}, "policy_poll_s (5)"),
        ({"policy_poll_s": 10, "policy_full_reload_s": 5}, "policy_poll_s (10)"),
        ({"policy_full_reload_s": 0}, "policy_full_reload_s"),
        ({"policy_full_reload_s": "soon"}, "policy_full_reload_s"),
    ],
)
def test_a_policy_full_reload_not_behind_the_polls_is_refused(change, message) -> None:
    with pytest.raises(SettingsError) as err:
        inventory.tower_settings(data(**change), ADDRS)
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["mx'; touch /tmp/x; '", "mx", "MX.T1.example", "mx..t1.example"])
def test_the_relays_hostname_must_be_a_dns_host_name(name):
    with pytest.raises(SettingsError, match="hostname.*not a DNS host name"):
        inventory.tower_settings(data(hostname=name), ADDRS)
