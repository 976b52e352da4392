"""Checks of an operator's TLS certificate chain and key, before a deploy puts them on a host.

The day-2 operations issue asks the deploy to refuse a relay certificate with the reason: the
key does not match, the names do not cover the relay's MX name, it has expired (or is not yet
valid), or the chain is incomplete. ``check`` reads the PEM the operator gives and says each
problem with its fix; a certificate that expires within ``warn_days`` is a warning, not a
refusal (the alert two weeks before expiry is the monitor's, once wired).

``given`` is what the relay's deploy calls (roles/relay.py) on the inventory's ``tls``
setting (``mailtower.settings.RelayTls``): it reads the files on the controller, refuses a key
file others may read, and runs ``require``. The alert two weeks before expiry is the
monitor's (``TLSCertificateExpiresSoon``, on the relay exporter's
``mailtower_tls_certificate_not_after_seconds``).

Usage::

    from mailtower.controller import certs
    given = certs.given(settings.tls, [settings.hostname], what="relay 192.0.2.10")
    given.chain_pem, given.key_pem, given.report.warnings
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from mailtower.controller.errors import CertificateError
from mailtower.settings import RelayTls

# Where the controller finds the public CAs when the inventory names none (ca-certificates).
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class Report:
    """What ``check`` found: refusals (``errors``) and ``warnings``; the leaf's expiry."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    not_after: datetime | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def _names_of(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The leaf's DNS names and IP addresses (subjectAltName; never the CN, as browsers and
    RFC 6125 say)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    dns = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return dns, ips


def covers(pattern: str, name: str) -> bool:
    """Whether SAN entry ``pattern`` covers host ``name``: exact, or a wildcard for exactly one
    left-most label (``*.example.net`` covers ``mx.example.net``, not ``example.net`` nor
    ``a.mx.example.net``)."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if not pattern.startswith("*."):
        return pattern == name
    suffix = pattern[1:]  # ".example.net"
    head, _, rest = name.partition(".")
    return bool(head) and "*" not in suffix and "." + rest == suffix and suffix.count(".") >= 2


def _covered(cert: x509.Certificate, name: str) -> bool:
    dns, ips = _names_of(cert)
    try:
        return str(ipaddress.ip_address(name)) in ips
    except ValueError:
        return any(covers(p, name) for p in dns)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def check(
    chain_pem: bytes,
    key_pem: bytes,
    names: list[str],
    *,
    now: datetime | None = None,
    trust_pem: bytes | None = None,
    warn_days: int = 14,
) -> Report:
    """Check a certificate chain (leaf first, then intermediates) and its private key for a
    server answering to ``names``. ``trust_pem``: the CA certificates the chain must end at
    (the system's bundle, or a lab CA); None: the chain's last certificate must be a
    self-signed root given in the chain itself."""
    now = now or datetime.now(UTC)
    errors: list[str] = []
    warnings: list[str] = []
    chain = _load_chain(chain_pem)
    if not chain:
        return Report(["the certificate file holds no PEM certificate: give the chain, leaf first"])
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        errors.append(f"the key cannot be read ({exc}): give the unencrypted PEM private key")
    else:
        want = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        have = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if want != have:
            errors.append(
                "the key does not match the certificate (the first in the chain): give the key"
                " this certificate was issued for"
            )
    for name in names:
        if not _covered(leaf, name):
            dns, ips = _names_of(leaf)
            have_names = ", ".join(dns + ips) or "none"
            errors.append(
                f"the certificate does not cover {name} (its names: {have_names}): issue one"
                f" whose subjectAltName includes {name}"
            )
    not_after = leaf.not_valid_after_utc
    if leaf.not_valid_before_utc > now:
        errors.append(f"the certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d}")
    if not_after <= now:
        errors.append(f"the certificate expired on {not_after:%Y-%m-%d}: renew it")
    elif not_after - now <= timedelta(days=warn_days):
        warnings.append(f"the certificate expires on {not_after:%Y-%m-%d}: renew it soon")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        errors.append("the certificate is not for TLS servers (no serverAuth key usage)")
    errors += _chain_problems(chain, trust_pem, now)
    return Report(errors, warnings, not_after)


def _chain_problems(
    chain: list[x509.Certificate], trust_pem: bytes | None, now: datetime
) -> list[str]:
    problems = []
    for i, (cert, issuer) in enumerate(zip(chain, chain[1:], strict=False)):
        if not _issued_by(cert, issuer):
            problems.append(
                f"certificate {i + 1} of the chain is not issued by certificate {i + 2}: give"
                " the chain in order, leaf first, each followed by its issuer"
            )
    for i, cert in enumerate(chain[1:], start=2):
        if cert.not_valid_after_utc <= now:
            problems.append(f"certificate {i} of the chain (an issuer) has expired")
    last = chain[-1]
    if trust_pem is None:
        if len(chain) == 1 or not _issued_by(last, last):
            problems.append(
                "the chain does not end at a root it holds, and no trusted CAs were given:"
                " add the intermediates (and give the CA bundle to check against)"
            )
        return problems
    roots = _load_chain(trust_pem)
    if not any(_issued_by(last, root) or last == root for root in roots):
        problems.append(
            "the chain is incomplete: its last certificate is issued by"
            f" {last.issuer.rfc4514_string()}, which is neither in the chain nor a trusted CA:"
            " add the missing intermediate certificates after the leaf"
        )
    return problems


def require(
    chain_pem: bytes,
    key_pem: bytes,
    names: list[str],
    *,
    what: str,
    now: datetime | None = None,
    trust_pem: bytes | None = None,
) -> Report:
    """``check``, raising CertificateError naming ``what`` (e.g. the relay's host) and every
    reason when the deploy must refuse."""
    report = check(chain_pem, key_pem, names, now=now, trust_pem=trust_pem)
    if report.errors:
        lines = "\n".join(f"  - {e}" for e in report.errors)
        raise CertificateError(f"{what}: the TLS certificate is refused:\n{lines}")
    return report


@dataclass(frozen=True)
class Given:
    """An operator's chain and key as read on the controller, and what ``check`` found."""

    chain_pem: bytes
    key_pem: bytes
    report: Report


def _read(path: str, what: str, role: str, fix: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CertificateError(
            f"{what}: the TLS {role} {path} cannot be read on the controller"
            f" ({exc.strerror}): {fix}"
        ) from exc


def given(tls: RelayTls, names: list[str], *, what: str, now: datetime | None = None) -> Given:
    """Read and check the chain, key and CAs the inventory's ``tls`` names (files on the
    controller); CertificateError naming ``what`` and every reason when the deploy must
    refuse. The key file must not be readable by group or others (0600 or 0400)."""
    fix = "check the tls setting of the tower's inventory (docs/runbook.md: Certificates)"
    chain_pem = _read(tls.chain, what, "certificate chain", fix)
    key_pem = _read(tls.key, what, "key", fix)
    mode = stat.S_IMODE(os.stat(tls.key).st_mode)
    if mode & 0o077:
        raise CertificateError(
            f"{what}: the TLS key {tls.key} is mode {mode:04o} on the controller, readable by"
            f" others: chmod 600 {tls.key} (keep it with the tower's secrets file)"
        )
    ca = tls.ca or SYSTEM_CA_BUNDLE
    trust_pem = _read(ca, what, "CA bundle", "install ca-certificates or give tls.ca")
    report = require(chain_pem, key_pem, names, what=what, now=now, trust_pem=trust_pem)
    return Given(chain_pem, key_pem, report)
