"""The settings of the hosts beside the towers (GOC, DNS server, lab sender) refuse broken
inventory data with a message naming the host and the field."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyinfra.api.exceptions import DeployError

from mailtower.errors import SettingsError
from mailtower.settings import (
    EYE_TLS_CERT,
    EYE_TLS_KEY,
    DnsServer,
    GocSettings,
    LabSender,
    validate,
)

DNS = {
    "zones": ["lab", "201.10.in-addr.arpa."],
    "ns_name": "ns.lab",
    "ns_address": "10.201.0.53",
    "update_from": "10.201.0.1",
    "tsig": {"name": "mailtower-update", "algorithm": "hmac-sha256", "secret": "c2VjcmV0"},
}
SENDER = {"domain": "internet.lab", "resolver": "10.201.0.53", "submit_from": "10.201.0.1"}
GOC = {
    "towers": [{"name": "tower-a", "sql": ["10.1.0.12", "10.1.0.13"], "monitor": "10.1.0.11"}],
    "customers": [{"domain": "customer.example", "server": "192.0.2.25"}],
    "operators": {"operator": "operator-password-1"},
    "eye_tls_self_signed": ["eye.goc.example", "192.0.2.9"],
    "secrets": {
        "eye_db": "e" * 16,
        "towers": {"tower-a": {"sql_sync": "a" * 16, "goc_sync": "s" * 16, "goc_status": "t" * 16}},
    },
}
_OWN_A = GOC["secrets"]["towers"]["tower-a"]


def _key_pair() -> dict[str, str]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {"signing_key": private.decode(), "public_key": public.decode()}


def _tls_pair() -> dict[str, str]:
    """VirusEye's certificate and key as PEM text, as an operator pastes them in."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "eye.goc.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {
        "eye_tls_cert": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "eye_tls_key": key_pem.decode(),
    }


def _fields(message: str) -> list[str]:
    """The field paths a SettingsError lists, one per line ("  path: message")."""
    return [line.strip().split(": ", 1)[0] for line in message.splitlines()[1:]]


def test_valid_dns_server():
    d = validate(DnsServer, DNS, "'dns' host data")
    assert d.zones == ["lab", "201.10.in-addr.arpa"]  # the trailing dot is the zone's own
    assert str(d.ns_address) == "10.201.0.53"
    assert d.tsig.algorithm == "hmac-sha256"
    assert "c2VjcmV0" not in repr(d)  # the key's secret stays out of logs


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"zones": []}, "zones"),
        ({"zones": ["lab", "bad zone"]}, "zones.1"),
        ({"zones": ["lab", "LAB."]}, "zones"),
        ({"ns_address": "ns.lab"}, "ns_address"),
        ({"update_from": "10.201.0.300"}, "update_from"),
        ({"tsig": {**DNS["tsig"], "secret": 'not"base64'}}, "tsig.secret"),
        ({"tsig": {**DNS["tsig"], "algorithm": "hmac-md5"}}, "tsig.algorithm"),
        ({"tsig": {**DNS["tsig"], "name": 'key"; }; evil'}}, "tsig.name"),
        ({"tsig": {"name": "mailtower-update"}}, "tsig.secret"),
        ({"tsig": None}, "tsig"),
        ({"resolver": "10.201.0.53"}, "resolver"),
    ],
)
def test_broken_dns_data_names_the_field(change, field):
    with pytest.raises(SettingsError) as caught:
        validate(DnsServer, {**DNS, **change}, "'dns' host data")
    assert field in _fields(str(caught.value))
    assert str(caught.value).startswith("invalid 'dns' host data:")


def test_a_dns_server_needs_its_zones_and_key():
    with pytest.raises(SettingsError) as caught:
        validate(DnsServer, {"ns_name": "ns.lab"}, "'dns' host data")
    assert set(_fields(str(caught.value))) == {"zones", "ns_address", "update_from", "tsig"}


def test_lab_sender():
    s = validate(LabSender, SENDER, "'sender' host data")
    assert (s.queue_run_delay, s.minimal_backoff, s.maximal_backoff) == ("10s", "10s", "30s")
    with pytest.raises(SettingsError) as caught:
        validate(LabSender, {**SENDER, "resolver": "dns.lab"}, "'sender' host data")
    assert _fields(str(caught.value)) == ["resolver"]


def test_valid_goc():
    g = validate(GocSettings, {**GOC, "bundles": _key_pair()}, "'goc' host data")
    assert [t.name for t in g.towers] == ["tower-a"]
    assert g.secrets.towers["tower-a"].sql_sync == "a" * 16
    assert "a" * 16 not in repr(g)  # passwords stay out of logs
    assert g.bundles is not None and g.bundles.port == 8026
    assert g.eye_tls() == (EYE_TLS_CERT, EYE_TLS_KEY)  # made by the deploy


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"secrets": {**GOC["secrets"], "eye_db": "short"}}, "secrets.eye_db"),
        (
            {"secrets": {**GOC["secrets"], "towers": {"tower-a": {**_OWN_A, "goc_sync": "short"}}}},
            "secrets.towers.tower-a.goc_sync",
        ),
        (
            {"secrets": {**GOC["secrets"], "towers": {"tower-a": {"sql_sync": "a" * 16}}}},
            "secrets.towers.tower-a.goc_status",
        ),
        ({"secrets": {k: v for k, v in GOC["secrets"].items() if k != "eye_db"}}, "secrets.eye_db"),
        ({"secrets": {**GOC["secrets"], "stauts": "t" * 16}}, "secrets.stauts"),
        ({"operators": {"bad:name": "operator-password-1"}}, "operators.bad:name.[key]"),
        ({"operators": {"operator": "short"}}, "operators.operator"),
        ({"towers": [{**GOC["towers"][0], "sql": ["10.1.0.12", "sql2"]}]}, "towers.0.sql.1"),
        ({"towers": [{**GOC["towers"][0], "name": "Tower A"}]}, "towers.0.name"),
        ({"towers": GOC["towers"] * 2}, "towers"),
        ({"customers": [{"domain": "not a domain", "server": "192.0.2.25"}]}, "customers.0.domain"),
        ({"bundle_readers": ["everyone"]}, "bundle_readers.0"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_broken_goc_data_names_the_field(change, field):
    with pytest.raises(SettingsError) as caught:
        validate(GocSettings, {**GOC, **change}, "'goc' host data")
    assert field in _fields(str(caught.value))


def test_each_tower_needs_its_own_passwords():
    data = {**GOC, "secrets": {**GOC["secrets"], "towers": {}}}
    with pytest.raises(SettingsError, match=r"secrets\.towers\.tower-a: \{sql_sync, goc_sync"):
        validate(GocSettings, data, "'goc' host data")


def _two_towers(b: dict[str, str]) -> dict:
    """The test GOC with a second tower whose own passwords are ``b``."""
    tower_b = {"name": "tower-b", "sql": ["10.2.0.12"], "monitor": "10.2.0.11"}
    secrets = {**GOC["secrets"], "towers": {"tower-a": _OWN_A, "tower-b": b}}
    return {**GOC, "towers": [*GOC["towers"], tower_b], "secrets": secrets}


def test_no_two_towers_share_a_password():
    b = {k: f"b-{k}-0123456789" for k in _OWN_A}
    g = validate(GocSettings, _two_towers(b), "'goc' host data")
    assert g.secrets.towers["tower-b"].goc_status == b["goc_status"]
    for key in _OWN_A:
        for taken in (_OWN_A["sql_sync"], _OWN_A["goc_status"], GOC["secrets"]["eye_db"]):
            with pytest.raises(SettingsError) as caught:
                validate(GocSettings, _two_towers({**b, key: taken}), "'goc' host data")
            assert _fields(str(caught.value)) == ["secrets.towers"]
            assert f"tower-b.{key}: tower-b and " in str(caught.value)
            assert "share a password" in str(caught.value)
            assert taken not in str(caught.value)


@pytest.mark.parametrize(
    ("secrets", "named"),
    [
        ({"sync": "s" * 16, "status": "t" * 16}, "secrets.sync and secrets.status:"),
        ({"status": "t" * 16}, "secrets.status:"),
        ({"towers": {"tower-a": "a" * 16}}, "tower-a: a tower's own {sql_sync, goc_sync"),
    ],
    ids=["sync+status", "status", "one-password-per-tower"],
)
def test_the_old_shared_secrets_are_refused_with_the_way_out(secrets, named):
    data = {**GOC, "secrets": {**GOC["secrets"], **secrets}}
    with pytest.raises(SettingsError) as caught:
        validate(GocSettings, data, "'goc' host data")
    message = str(caught.value)
    assert named in message
    assert "docs/runbook.md, 'Secrets'" in message
    assert "a" * 16 not in message and "s" * 16 not in message


def test_goc_bundle_keys_must_be_one_pair():
    one, other = _key_pair(), _key_pair()
    mixed = {"signing_key": one["signing_key"], "public_key": other["public_key"]}
    with pytest.raises(SettingsError) as caught:
        validate(GocSettings, {**GOC, "bundles": mixed}, "'goc' host data")
    assert _fields(str(caught.value)) == ["bundles"]
    assert "public_key is not the public half of signing_key" in str(caught.value)
    assert one["signing_key"] not in str(caught.value)


def _goc_tls(**tls: object) -> dict:
    """The test GOC with only these VirusEye TLS settings."""
    return {**{k: v for k, v in GOC.items() if k != "eye_tls_self_signed"}, **tls}


@pytest.mark.parametrize(
    ("tls", "served"),
    [
        (
            {"eye_tls_cert": "/etc/ssl/eye.pem", "eye_tls_key": "/etc/ssl/eye.key"},
            ("/etc/ssl/eye.pem", "/etc/ssl/eye.key"),
        ),
        (_tls_pair(), (EYE_TLS_CERT, EYE_TLS_KEY)),  # the deploy writes the PEM text there
        ({"eye_tls_self_signed": ["eye.goc.example"]}, (EYE_TLS_CERT, EYE_TLS_KEY)),
        ({"eye_origin": "https://eye.goc.example"}, None),  # eye_listen stays on loopback
    ],
    ids=["paths", "pem", "self-signed", "proxy"],
)
def test_goc_viruseye_takes_one_certificate_source_alone(tls, served):
    g = validate(GocSettings, _goc_tls(**tls), "'goc' host data")
    assert g.eye_tls() == served
    assert (g.eye_tls_pem() is not None) == tls.get("eye_tls_cert", "").startswith("-----")
    for other in ({"eye_origin": "https://eye.example"}, {"eye_tls_self_signed": ["e.example"]}):
        if other.keys() != tls.keys():
            with pytest.raises(SettingsError, match="exactly one of eye_tls_cert"):
                validate(GocSettings, _goc_tls(**tls, **other), "'goc' host data")


def test_goc_viruseye_needs_a_certificate_source():
    with pytest.raises(SettingsError, match="HTTPS only: give exactly one of eye_tls_cert"):
        validate(GocSettings, _goc_tls(), "'goc' host data")


def test_goc_viruseye_pem_pair_is_checked_at_the_key():
    one, other = _tls_pair(), _tls_pair()
    with pytest.raises(SettingsError) as caught:
        data = _goc_tls(eye_tls_cert=one["eye_tls_cert"], eye_tls_key=other["eye_tls_key"])
        validate(GocSettings, data, "'goc' host data")
    assert _fields(str(caught.value)) == ["eye_tls_key"]
    assert "is not the key of eye_tls_cert" in str(caught.value)
    assert other["eye_tls_key"] not in str(caught.value)
    g = validate(GocSettings, _goc_tls(**one), "'goc' host data")
    assert one["eye_tls_key"] not in repr(g)  # the key stays out of logs


def test_lab_inventory_data_is_valid(monkeypatch, tmp_path):
    from inventory._lab import goc_data, internet_data
    from mailtower.controller.lab import plan

    monkeypatch.setattr(plan, "STATE_DIR", tmp_path / "lab")  # not the real lab's keys
    data = internet_data()
    d = DnsServer.model_validate(data["dns"])
    assert d.ns_name == f"ns.{plan.LAB_ZONE}" and plan.LAB_ZONE in d.zones
    LabSender.model_validate(data["sender"])
    g = GocSettings.model_validate(goc_data())
    assert {t.name for t in g.towers} <= set(g.secrets.towers)
    assert len(g.towers) == 2  # each its own passwords: GocSettings refuses any shared
    # VirusEye over HTTPS with a certificate the deploy makes for the GOC's address and name.
    goc = plan.goc_host()
    assert g.eye_tls_self_signed == [str(goc.address), goc.name]


@pytest.mark.parametrize(
    ("role", "key", "data", "field"),
    [
        ("dns", "dns", {**DNS, "ns_address": "nowhere"}, "ns_address"),
        ("lab_sender", "sender", {**SENDER, "submit_from": None}, "submit_from"),
        ("goc", "goc", {**GOC, "secrets": {"towers": {}}}, "secrets.eye_db"),
    ],
)
def test_a_role_refuses_its_host_data_naming_the_host_and_field(
    monkeypatch, role, key, data, field
):
    import importlib

    from roles import _common

    module = importlib.import_module(f"roles.{role}")
    monkeypatch.setattr(_common, "host", SimpleNamespace(name="mt-host", data={key: data}))
    with pytest.raises(DeployError) as caught:
        module.settings()
    message = str(caught.value)
    assert message.startswith(f"mt-host: invalid '{key}' host data:")
    assert field in _fields(message)


@pytest.mark.parametrize(
    "tls",
    [{}, {"eye_tls_cert": "/etc/ssl/eye.pem", "eye_tls_key": "/etc/ssl/eye.key"}],
    ids=["none", "two"],
)
def test_the_goc_role_refuses_no_or_two_certificate_sources(monkeypatch, tls):
    from roles import _common, goc

    data = {**GOC, **tls} if tls else _goc_tls()
    monkeypatch.setattr(_common, "host", SimpleNamespace(name="mt-goc", data={"goc": data}))
    with pytest.raises(DeployError) as caught:
        goc.settings()
    message = str(caught.value)
    assert message.startswith("mt-goc: invalid 'goc' host data:")
    for field in ("eye_tls_cert", "eye_tls_key", "eye_tls_self_signed", "eye_origin"):
        assert field in message


def test_a_role_without_its_host_data_says_where_to_look(monkeypatch):
    from roles import _common, dns

    monkeypatch.setattr(_common, "host", SimpleNamespace(name="mt-dns", data={}))
    with pytest.raises(DeployError, match=r"mt-dns: host data has no 'dns' settings \(see inv"):
        dns.settings()
