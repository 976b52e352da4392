"""The lab's certificate authority: a root and an intermediate made once per lab on the
controller (in ``.lab/tls/``), and one certificate per lab relay covering its MX name.

The relays present their certificate followed by the intermediate, the lab's sender trusts
the root alone (``smtp_tls_CAfile``) and verifies every relay it delivers to
(``smtp_tls_security_level = verify``): the chain each relay sends must be complete, as a
real CA's would have to be. The deploy checks them like an operator's (controller/certs.py).

Usage::

    from mailtower.controller.lab import ca
    ca.relay_tls("lab-a", "mx.tower-a.lab")  # {"chain": …, "key": …, "ca": …} (RelayTls)
    ca.root_pem()                            # what the lab's sender trusts
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailtower.controller import certs
from mailtower.controller.lab import lxc

ROOT_DAYS = 3650
INTERMEDIATE_DAYS = 1825
RELAY_DAYS = 397  # what public CAs issue at most (CA/Browser Forum)
RENEW_DAYS = 30  # a relay certificate this close to its end is issued anew on the next deploy

Key = ec.EllipticCurvePrivateKey


def issue(
    common_name: str,
    key: Key,
    issuer: tuple[x509.Certificate, Key] | None = None,
    *,
    ca: bool = False,
    names: tuple[str, ...] = (),
    not_before: datetime | None = None,
    days: int = RELAY_DAYS,
) -> x509.Certificate:
    """A certificate for ``key``: a CA (``ca``) or a TLS server certificate for ``names``,
    signed by ``issuer`` (None: self-signed)."""
    start = not_before or datetime.now(UTC) - timedelta(hours=1)  # a little slack for clocks
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer_cert, signer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert.subject if signer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if signer_cert is not None:
        ski = signer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        builder = (
            builder.add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
        )
    return builder.sign(signer_key, hashes.SHA256())


def new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def cert_pem(*chain: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a file whole (a new name, then a rename) with its mode from the start."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _dir() -> Path:
    out = lxc.state_dir() / "tls"
    out.mkdir(mode=0o700, exist_ok=True)
    return out


def _load(cert: Path, key: Path) -> tuple[x509.Certificate, Key] | None:
    if not (cert.exists() and key.exists()):
        return None
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey), key
    return x509.load_pem_x509_certificate(cert.read_bytes()), loaded


def authority() -> tuple[Path, tuple[x509.Certificate, Key]]:
    """The lab CA, made once per lab: the root's certificate file and the intermediate (the
    one that signs the relays'; the root's key signs nothing else)."""
    out = _dir()
    root_crt, root_key = out / "ca.crt", out / "ca.key"
    mid_crt, mid_key = out / "intermediate.crt", out / "intermediate.key"
    root = _load(root_crt, root_key)
    mid = _load(mid_crt, mid_key)
    if root is None:
        key = new_key()
        root = (issue("mailtower lab root CA", key, ca=True, days=ROOT_DAYS), key)
        _write(root_key, key_pem(key), 0o600)
        _write(root_crt, cert_pem(root[0]), 0o644)
        mid = None  # a new root: a new intermediate under it
    if mid is None or mid[0].issuer != root[0].subject:
        key = new_key()
        mid = (
            issue("mailtower lab intermediate CA", key, root, ca=True, days=INTERMEDIATE_DAYS),
            key,
        )
        _write(mid_key, key_pem(key), 0o600)
        _write(mid_crt, cert_pem(mid[0]), 0o644)
    return root_crt, mid


def root_pem() -> str:
    """The lab root CA's certificate (PEM): what the lab's sender trusts."""
    return authority()[0].read_text()


def relay_tls(tower: str, hostname: str) -> dict[str, str]:
    """The certificate of lab tower ``tower``'s relay for ``hostname`` (its MX name), as the
    inventory's ``tls`` setting: issued once, and again when it no longer passes the deploy's
    check or ends within RENEW_DAYS (an unchanged lab redeploys with the same files)."""
    root_crt, mid = authority()
    out = _dir() / tower
    out.mkdir(mode=0o700, exist_ok=True)
    chain, key = out / "relay.crt", out / "relay.key"
    trust = root_crt.read_bytes()
    if chain.exists() and key.exists():
        report = certs.check(chain.read_bytes(), key.read_bytes(), [hostname], trust_pem=trust)
        fresh = report.not_after and report.not_after - datetime.now(UTC) > timedelta(
            days=RENEW_DAYS
        )
        if report.ok and fresh:
            return {"chain": str(chain), "key": str(key), "ca": str(root_crt)}
    leaf_key = new_key()
    leaf = issue(hostname, leaf_key, mid, names=(hostname,))
    _write(key, key_pem(leaf_key), 0o600)
    _write(chain, cert_pem(leaf, mid[0]), 0o644)
    return {"chain": str(chain), "key": str(key), "ca": str(root_crt)}
