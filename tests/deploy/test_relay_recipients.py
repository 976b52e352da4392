"""Recipient checks at the relay (issue 17): the rendered main.cf lists recipients from SQL,
verifies the domains of recipient_check = verify with the customer's server, and slows down
dictionary attacks; real postconf reads the result. The maps' SQL is proved against a real
PostgreSQL in tests/unit/test_relay_pgsql_maps.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import sample_settings
from needs import missing

from mailtower.settings import TowerSettings, duration_s

POSTCONF = "/usr/sbin/postconf"
MAPS = ("relay_domains", "transport", "relay_recipients", "recipient_check")


def _conf(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+) = ?(.*)$", text, re.M))


def _items(value: str) -> list[str]:
    return [v for v in re.split(r"[\s,]+", value) if v]


def _main(render, s: TowerSettings) -> dict[str, str]:
    return _conf(render("relay/etc/postfix/main.cf", s, tls_pem="/t"))


def test_recipients_come_from_sql_through_proxymap(render, settings):
    conf = _main(render, settings)
    assert conf["relay_recipient_maps"] == "proxy:pgsql:/etc/postfix/pgsql/relay_recipients.cf"
    restrictions = _items(conf["smtpd_recipient_restrictions"])
    check = restrictions.index("proxy:pgsql:/etc/postfix/pgsql/recipient_check.cf")
    assert restrictions[check - 1] == "check_recipient_access"
    # After the checks that need no probe, and the last before permit.
    assert restrictions[check + 1 :] == ["permit"]
    assert restrictions.index("pcre:/etc/postfix/address_syntax.pcre") < check


def test_recipient_maps_are_rendered_private_to_postfix():
    """The pgsql maps hold the relay's SQL password: root and the postfix group only."""
    source = (Path(__file__).resolve().parents[2] / "roles/relay.py").read_text()
    for name in MAPS:
        line = f'template("relay/etc/postfix/pgsql/{name}.cf", mode="640", group="postfix")'
        assert line in source, name


def test_map_files_name_each_sql_host_with_the_settings_port(render):
    s = sample_settings(ports={"postgres": 6543})
    for name in MAPS:
        cf = _conf(render(f"relay/etc/postfix/pgsql/{name}.cf", s))
        assert cf["hosts"] == "192.0.2.12:6543 192.0.2.13:6543", name
        assert cf["user"] == "mailtower_relay"


def test_verification_settings(render, settings):
    conf = _main(render, settings)
    limits = settings.limits
    assert conf["address_verify_map"] == "btree:$data_directory/verify_cache"
    assert conf["unverified_recipient_reject_code"] == "550"
    assert conf["unverified_recipient_defer_code"] == "450"
    assert conf["unverified_recipient_tempfail_action"] == "defer_if_permit"
    assert conf["address_verify_negative_cache"] == "yes"
    assert conf["address_verify_positive_expire_time"] == limits.verify_positive_expire
    assert conf["address_verify_positive_refresh_time"] == limits.verify_positive_refresh
    assert conf["address_verify_negative_expire_time"] == limits.verify_negative_expire
    assert conf["address_verify_negative_refresh_time"] == limits.verify_negative_refresh
    # A known address outlives an outage of its server as long as the queue keeps its mail.
    assert duration_s(limits.verify_positive_expire) > duration_s(limits.queue_lifetime)
    # The refusal does not quote the customer server's reply (its name, its address).
    assert conf["unverified_recipient_reject_reason"]
    # Probes take the customers' SQL routes (Postfix's defaults, not overridden here).
    for name in ("address_verify_transport_maps", "address_verify_relay_transport"):
        assert name not in conf


def test_dictionary_attack_limits_follow_settings(render):
    s = sample_settings(
        limits={
            "client_soft_error_limit": 3,
            "client_hard_error_limit": 12,
            "client_error_sleep": "2s",
        }
    )
    conf = _main(render, s)
    assert conf["smtpd_soft_error_limit"] == "3"
    assert conf["smtpd_hard_error_limit"] == "${stress?{1}:{12}}"
    assert conf["smtpd_error_sleep_time"] == "2s"
    assert int(conf["smtpd_client_recipient_rate_limit"]) == s.limits.client_recipient_rate


@pytest.mark.parametrize(
    ("limits", "error"),
    [
        ({"client_soft_error_limit": 21, "client_hard_error_limit": 20}, "cut off"),
        ({"verify_positive_expire": "2d", "queue_lifetime": "3d"}, "queue gives up"),
        ({"verify_positive_refresh": "31d"}, "shorter than"),
        ({"verify_negative_refresh": "4d"}, "must not exceed"),
    ],
)
def test_limits_that_defeat_themselves_are_refused(limits, error):
    with pytest.raises(ValueError, match=error):
        sample_settings(limits=limits)


@pytest.fixture
def postfix_dir(render, settings, tmp_path):
    """main.cf, master.cf and the pgsql maps in one directory, main.cf naming them there."""
    if not Path(POSTCONF).exists():
        missing("postconf (package postfix)")
    (tmp_path / "pgsql").mkdir()
    for name in MAPS:
        (tmp_path / "pgsql" / f"{name}.cf").write_text(
            render(f"relay/etc/postfix/pgsql/{name}.cf", settings)
        )
    main = render("relay/etc/postfix/main.cf", settings, tls_pem="/t")
    (tmp_path / "main.cf").write_text(main.replace("/etc/postfix/", f"{tmp_path}/"))
    (tmp_path / "master.cf").write_text(render("relay/etc/postfix/master.cf", settings))
    return tmp_path


def _postconf(directory: Path, *args: str) -> str:
    proc = subprocess.run(
        [POSTCONF, "-c", str(directory), *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    # Warnings name unknown parameters (main.cf or a pgsql map) and unreadable tables.
    assert proc.stderr == "", proc.stderr
    return proc.stdout


def test_postconf_reads_the_relay_config_without_a_warning(postfix_dir):
    out = _conf(_postconf(postfix_dir, "-n", "-x"))
    assert out["smtpd_hard_error_limit"] == "20"  # ${stress?…} as Postfix expands it
    assert out["address_verify_map"] == "btree:/var/lib/postfix/verify_cache"
    # Postfix's own answer to an unlisted address of a relay domain: 550 at RCPT.
    defaults = _conf(_postconf(postfix_dir, "-x", "unknown_relay_recipient_reject_code"))
    assert defaults["unknown_relay_recipient_reject_code"] == "550"
    assert _conf(_postconf(postfix_dir, "-x", "smtpd_reject_unlisted_recipient")) == {
        "smtpd_reject_unlisted_recipient": "yes"
    }
    # No address extensions: smtpd looks up user@domain, then @domain, nothing else.
    assert _conf(_postconf(postfix_dir, "-x", "recipient_delimiter")) == {"recipient_delimiter": ""}


def test_every_proxy_table_is_one_proxymap_may_open(postfix_dir):
    """proxymap refuses a table not in proxy_read_maps; Postfix's default list names the
    parameters, and each proxy: table of main.cf must be among them once expanded."""
    main = (postfix_dir / "main.cf").read_text()
    tables = set(re.findall(r"proxy:(pgsql:\S+\.cf)", main))
    assert len(tables) == len(MAPS)
    allowed = set(_items(_postconf(postfix_dir, "-x", "-h", "proxy_read_maps")))
    assert {f"proxy:{t}" for t in tables} <= allowed


def test_verify_service_exists(render, settings):
    """reject_unverified_recipient asks the verify service; master.cf must run one."""
    master = render("relay/etc/postfix/master.cf", settings)
    assert re.search(r"^verify\s+unix\s.*\sverify$", master, re.M)
