"""The relay's certificate as the deploy takes it (issue 19): the operator's files on the
controller, read and checked by ``certs.given`` (what roles/relay.py calls before it changes
anything), the refusal naming the relay, and the lab CA that issues the lab relays'."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from pyinfra.api.exceptions import DeployError

from mailtower.controller import certs
from mailtower.controller.errors import CertificateError
from mailtower.controller.lab import ca, plan
from mailtower.settings import RelayTls, TowerSettings

NAME = "mx.tower-a.lab"


@pytest.fixture(scope="module")
def pki() -> dict:
    root_key, mid_key, leaf_key = ca.new_key(), ca.new_key(), ca.new_key()
    root = ca.issue("Test Root", root_key, ca=True, days=3650)
    mid = ca.issue("Test Intermediate", mid_key, (root, root_key), ca=True, days=1000)
    leaf = ca.issue(NAME, leaf_key, (mid, mid_key), names=(NAME,))
    return {"root": root, "mid": (mid, mid_key), "leaf": leaf, "leaf_key": leaf_key}


def _files(tmp: Path, chain: bytes, key: bytes, trust: bytes, key_mode: int = 0o600) -> RelayTls:
    paths = {"chain": tmp / "relay.crt", "key": tmp / "relay.key", "ca": tmp / "ca.crt"}
    paths["chain"].write_bytes(chain)
    paths["key"].write_bytes(key)
    paths["key"].chmod(key_mode)
    paths["ca"].write_bytes(trust)
    return RelayTls(**{k: str(v) for k, v in paths.items()})


def _given(tls: RelayTls, name: str = NAME) -> certs.Given:
    return certs.given(tls, [name], what="10.201.1.10 (relay of tower lab-a)")


def test_a_good_chain_is_read_for_upload(tmp_path: Path, pki: dict) -> None:
    chain = ca.cert_pem(pki["leaf"], pki["mid"][0])
    tls = _files(tmp_path, chain, ca.key_pem(pki["leaf_key"]), ca.cert_pem(pki["root"]))
    given = _given(tls)
    assert given.chain_pem == chain
    assert given.key_pem == ca.key_pem(pki["leaf_key"])
    assert given.report.ok and given.report.not_after == pki["leaf"].not_valid_after_utc


def test_a_wrong_key_is_refused(tmp_path: Path, pki: dict) -> None:
    chain = ca.cert_pem(pki["leaf"], pki["mid"][0])
    tls = _files(tmp_path, chain, ca.key_pem(pki["mid"][1]), ca.cert_pem(pki["root"]))
    with pytest.raises(CertificateError, match="key does not match the certificate"):
        _given(tls)


def test_an_expired_certificate_is_refused(tmp_path: Path, pki: dict) -> None:
    key = ca.new_key()
    old = datetime.now(UTC) - timedelta(days=100)
    leaf = ca.issue(NAME, key, pki["mid"], names=(NAME,), not_before=old, days=90)
    chain = ca.cert_pem(leaf, pki["mid"][0])
    tls = _files(tmp_path, chain, ca.key_pem(key), ca.cert_pem(pki["root"]))
    with pytest.raises(CertificateError, match=r"expired on .*: renew it"):
        _given(tls)


def test_a_certificate_for_another_name_is_refused(tmp_path: Path, pki: dict) -> None:
    chain = ca.cert_pem(pki["leaf"], pki["mid"][0])
    tls = _files(tmp_path, chain, ca.key_pem(pki["leaf_key"]), ca.cert_pem(pki["root"]))
    with pytest.raises(CertificateError, match="does not cover mx.tower-b.lab"):
        _given(tls, "mx.tower-b.lab")


def test_a_chain_without_its_intermediate_is_refused(tmp_path: Path, pki: dict) -> None:
    chain = ca.cert_pem(pki["leaf"])  # the intermediate left out
    tls = _files(tmp_path, chain, ca.key_pem(pki["leaf_key"]), ca.cert_pem(pki["root"]))
    with pytest.raises(CertificateError, match="chain is incomplete"):
        _given(tls)


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604])
def test_a_key_others_may_read_is_refused(tmp_path: Path, pki: dict, mode: int) -> None:
    chain = ca.cert_pem(pki["leaf"], pki["mid"][0])
    key = ca.key_pem(pki["leaf_key"])
    tls = _files(tmp_path, chain, key, ca.cert_pem(pki["root"]), key_mode=mode)
    with pytest.raises(CertificateError, match=f"mode {mode:04o}.*chmod 600"):
        _given(tls)


def test_a_missing_file_is_named(tmp_path: Path, pki: dict) -> None:
    chain = ca.cert_pem(pki["leaf"], pki["mid"][0])
    tls = _files(tmp_path, chain, ca.key_pem(pki["leaf_key"]), ca.cert_pem(pki["root"]))
    os.unlink(tls.chain)
    with pytest.raises(CertificateError, match=f"chain {tls.chain} cannot be read"):
        _given(tls)


def test_tls_paths_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute path on the controller"):
        RelayTls(chain="relay.crt", key="/k")


# -- the relay role: refusal as a DeployError naming the host, before any change ------------


@pytest.fixture
def relay_role(monkeypatch):
    """roles.relay with a stand-in for pyinfra's host and the tower's settings."""
    from roles import relay

    def use(s: TowerSettings):
        monkeypatch.setattr(relay, "host", SimpleNamespace(name="10.201.1.10"))
        monkeypatch.setattr(relay, "settings", lambda: s)
        return relay

    return use


def _tower(tls: RelayTls | None) -> TowerSettings:
    return TowerSettings.model_validate(
        {
            "name": "lab-a",
            "hostname": NAME,
            "hosts": {
                "relay": "10.201.1.10",
                "monitor": "10.201.1.11",
                "sql": ["10.201.1.12", "10.201.1.13"],
                "scanners": ["10.201.1.101"],
            },
            "secrets": {
                k: "s3cret-password-0123456789"
                for k in ("sql_relay", "sql_scanner", "sql_monitor", "sql_replication")
            },
            "tls": tls.model_dump() if tls else None,
        }
    )


def test_the_role_refuses_with_host_reason_and_fix(tmp_path: Path, pki: dict, relay_role) -> None:
    chain = ca.cert_pem(pki["leaf"])
    tls = _files(tmp_path, chain, ca.key_pem(pki["mid"][1]), ca.cert_pem(pki["root"]))
    relay = relay_role(_tower(tls))
    with pytest.raises(DeployError) as refused:
        relay.given_certificate()
    text = str(refused.value)
    assert text.startswith("10.201.1.10 (relay of tower lab-a, MX name mx.tower-a.lab)")
    assert "key does not match" in text and "give the key" in text
    assert "add the missing intermediate" in text
    assert "before the deploy changed anything" in text


def test_the_role_takes_a_good_certificate(tmp_path: Path, pki: dict, relay_role) -> None:
    chain = ca.cert_pem(pki["leaf"], pki["mid"][0])
    tls = _files(tmp_path, chain, ca.key_pem(pki["leaf_key"]), ca.cert_pem(pki["root"]))
    given = relay_role(_tower(tls)).given_certificate()
    assert given is not None and given.chain_pem == chain


def test_without_tls_the_role_warns_and_keeps_self_signed(relay_role, caplog) -> None:
    relay = relay_role(_tower(None))
    with caplog.at_level("WARNING", logger="pyinfra"):
        assert relay.given_certificate() is None
    assert "no TLS certificate given" in caplog.text and "10.201.1.10" in caplog.text


# -- the lab CA ------------------------------------------------------------------------------


@pytest.fixture
def lab_state(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(plan, "STATE_DIR", tmp_path / ".lab")
    return tmp_path / ".lab"


def test_lab_relay_certificates_pass_the_deploys_check(lab_state: Path) -> None:
    tls = RelayTls(**ca.relay_tls("lab-a", NAME))
    given = _given(tls)
    chain = x509.load_pem_x509_certificates(given.chain_pem)
    assert len(chain) == 2, "leaf and intermediate: the sender trusts only the root"
    assert Path(tls.ca or "").read_text() == ca.root_pem()
    assert os.stat(tls.key).st_mode & 0o777 == 0o600
    assert os.stat(lab_state / "tls" / "ca.key").st_mode & 0o777 == 0o600
    other = RelayTls(**ca.relay_tls("lab-b", "mx.tower-b.lab"))
    with pytest.raises(CertificateError, match="does not cover mx.tower-a.lab"):
        _given(other)


def test_lab_certificates_are_made_once(lab_state: Path) -> None:
    first = ca.relay_tls("lab-a", NAME)
    before = {k: Path(v).read_bytes() for k, v in first.items()}
    again = ca.relay_tls("lab-a", NAME)
    assert {k: Path(v).read_bytes() for k, v in again.items()} == before


def test_a_lab_certificate_for_another_name_is_issued_anew(lab_state: Path) -> None:
    first = Path(ca.relay_tls("lab-a", NAME)["chain"]).read_bytes()
    renamed = ca.relay_tls("lab-a", "mx2.tower-a.lab")
    assert Path(renamed["chain"]).read_bytes() != first
    _given(RelayTls(**renamed), "mx2.tower-a.lab")


def test_the_lab_inventory_gives_each_relay_its_certificate(lab_state: Path) -> None:
    from inventory._lab import internet_data, lab_tower_data
    from mailtower.settings import LabSender

    for tower in ("a", "b"):
        data = lab_tower_data(tower)
        tls = RelayTls.model_validate(data["tls"])
        _given(tls, data["hostname"])  # what the relay deploy will check
    sender = LabSender.model_validate(internet_data()["sender"])
    assert sender.tls_ca == ca.root_pem()
