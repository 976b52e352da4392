"""mailtower.controller.certs: an operator's certificate chain and key, checked before a deploy
(key match, names, validity, chain order and completeness), on certificates made here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailtower.controller import certs
from mailtower.controller.errors import CertificateError, ControllerError

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
    names: tuple[str, ...] = (),
    days: tuple[int, int] = (-1, 90),
    usage: x509.ObjectIdentifier | None = ExtendedKeyUsageOID.SERVER_AUTH,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer or (_name(cn), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + timedelta(days=days[0]))
        .not_valid_after(NOW + timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    if not ca and usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*items: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in items)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pki() -> dict:
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("Lab Root", root_key, ca=True, days=(-10, 3650))
    mid = _cert("Lab Intermediate", mid_key, (root.subject, root_key), ca=True, days=(-5, 1000))
    leaf = _cert("mx.tower-a.lab", leaf_key, (mid.subject, mid_key), names=("mx.tower-a.lab",))
    return {
        "root": root,
        "root_key": root_key,
        "mid": mid,
        "mid_key": mid_key,
        "leaf": leaf,
        "leaf_key": leaf_key,
    }


def test_a_good_chain_passes(pki: dict) -> None:
    report = certs.check(
        _pem(pki["leaf"], pki["mid"]),
        _key_pem(pki["leaf_key"]),
        ["mx.tower-a.lab"],
        now=NOW,
        trust_pem=_pem(pki["root"]),
    )
    assert report.ok and report.warnings == [], report
    assert report.not_after == pki["leaf"].not_valid_after_utc


def test_the_wrong_key_is_refused(pki: dict) -> None:
    report = certs.check(
        _pem(pki["leaf"], pki["mid"]),
        _key_pem(pki["mid_key"]),
        ["mx.tower-a.lab"],
        now=NOW,
        trust_pem=_pem(pki["root"]),
    )
    assert any("key does not match" in e for e in report.errors), report.errors


def test_names_not_covered_are_named(pki: dict) -> None:
    report = certs.check(
        _pem(pki["leaf"], pki["mid"]),
        _key_pem(pki["leaf_key"]),
        ["mx.tower-b.lab"],
        now=NOW,
        trust_pem=_pem(pki["root"]),
    )
    assert report.errors == [
        "the certificate does not cover mx.tower-b.lab (its names: mx.tower-a.lab): issue one"
        " whose subjectAltName includes mx.tower-b.lab"
    ]


@pytest.mark.parametrize(
    ("pattern", "name", "covered"),
    [
        ("mx.example.net", "MX.Example.NET.", True),
        ("*.example.net", "mx.example.net", True),
        ("*.example.net", "example.net", False),
        ("*.example.net", "a.mx.example.net", False),
        ("*.net", "example.net", False),
        ("mx*.example.net", "mx1.example.net", False),
    ],
)
def test_wildcards_cover_one_label(pattern: str, name: str, covered: bool) -> None:
    assert certs.covers(pattern, name) is covered


def test_expired_not_yet_valid_and_expiring_soon(pki: dict) -> None:
    chain = _pem(pki["leaf"], pki["mid"])
    args = (chain, _key_pem(pki["leaf_key"]), ["mx.tower-a.lab"])
    trust = _pem(pki["root"])
    late = certs.check(*args, now=NOW + timedelta(days=91), trust_pem=trust)
    assert any("expired on" in e for e in late.errors), late.errors
    early = certs.check(*args, now=NOW - timedelta(days=2), trust_pem=trust)
    assert any("not valid before" in e for e in early.errors), early.errors
    soon = certs.check(*args, now=NOW + timedelta(days=80), trust_pem=trust)
    assert soon.ok and any("expires on" in w for w in soon.warnings), soon


def test_an_incomplete_or_disordered_chain_is_refused(pki: dict) -> None:
    key, names, trust = _key_pem(pki["leaf_key"]), ["mx.tower-a.lab"], _pem(pki["root"])
    missing = certs.check(_pem(pki["leaf"]), key, names, now=NOW, trust_pem=trust)
    assert any("chain is incomplete" in e for e in missing.errors), missing.errors
    disordered = certs.check(
        _pem(pki["leaf"], pki["root"], pki["mid"]), key, names, now=NOW, trust_pem=trust
    )
    assert any("not issued by certificate 2" in e for e in disordered.errors)
    # No trust store given: the chain must carry its own root.
    own_root = certs.check(_pem(pki["leaf"], pki["mid"], pki["root"]), key, names, now=NOW)
    assert own_root.ok, own_root.errors
    no_root = certs.check(_pem(pki["leaf"], pki["mid"]), key, names, now=NOW)
    assert any("does not end at a root" in e for e in no_root.errors)


def test_a_client_only_certificate_is_refused(pki: dict) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    client = _cert(
        "mx.tower-a.lab",
        key,
        (pki["mid"].subject, pki["mid_key"]),
        names=("mx.tower-a.lab",),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    report = certs.check(
        _pem(client, pki["mid"]),
        _key_pem(key),
        ["mx.tower-a.lab"],
        now=NOW,
        trust_pem=_pem(pki["root"]),
    )
    assert any("serverAuth" in e for e in report.errors), report.errors


@pytest.mark.parametrize(
    ("chain", "key"),
    [(b"", b""), (b"not a pem", b"-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")],
)
def test_garbage_is_a_clear_refusal_never_a_crash(pki: dict, chain: bytes, key: bytes) -> None:
    report = certs.check(chain or b"", key, ["mx.tower-a.lab"], now=NOW)
    assert not report.ok and "no PEM certificate" in report.errors[0]
    bad_key = certs.check(_pem(pki["leaf"], pki["mid"], pki["root"]), key, [], now=NOW)
    assert any("key cannot be read" in e for e in bad_key.errors)


def test_require_raises_with_every_reason_and_the_host(pki: dict) -> None:
    with pytest.raises(CertificateError) as caught:
        certs.require(
            _pem(pki["leaf"]),
            _key_pem(pki["mid_key"]),
            ["mx.tower-b.lab"],
            what="relay 10.201.2.10",
            now=NOW,
            trust_pem=_pem(pki["root"]),
        )
    text = str(caught.value)
    assert text.startswith("relay 10.201.2.10: the TLS certificate is refused:")
    assert "key does not match" in text and "mx.tower-b.lab" in text and "incomplete" in text
    assert isinstance(caught.value, ControllerError)
