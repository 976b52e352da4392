"""The authoritative server: its address, the TSIG key for updates, and direct queries.

Every query goes to the server itself over TCP with recursion off, never through the system
resolver: what is checked is what that server serves. TCP makes a server that is down fail at
once (connection refused) instead of after a UDP timeout, and never truncates an answer.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.xfr
import dns.zone

from mailtower.controller.dns.exceptions import (
    DnsError,
    NameConflict,
    NotAuthoritative,
    QueryFailed,
    ServerUnreachable,
    TransferFailed,
    TsigKeyError,
    TsigRejected,
)
from mailtower.controller.dns.records import EMPTY, IN, RecordSet, RRsetKey

ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512")
_KEY_RE = re.compile(
    r'key\s+"?(?P<name>[^"\s{]+)"?\s*\{\s*'
    r"(?=[^}]*algorithm\s+\"?(?P<algorithm>[a-z0-9-]+)\"?\s*;)"
    r'(?=[^}]*secret\s+"(?P<secret>[^"]+)"\s*;)',
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key: its name, algorithm and base64 secret (kept out of repr)."""

    name: str
    secret: str = field(repr=False)
    algorithm: str = "hmac-sha256"

    def __post_init__(self) -> None:
        if self.algorithm.lower() not in ALGORITHMS:
            raise TsigKeyError(
                f"TSIG key {self.name}: algorithm {self.algorithm!r} is not one of "
                f"{', '.join(ALGORITHMS)}"
            )
        try:
            dns.name.from_text(self.name)
            if not base64.b64decode(self.secret, validate=True):
                raise ValueError("empty")
        except (dns.exception.DNSException, binascii.Error, ValueError):
            raise TsigKeyError(
                f"TSIG key {self.name!r}: the name or the base64 secret is malformed"
            ) from None

    @classmethod
    def generate(cls, name: str, algorithm: str = "hmac-sha256") -> TsigKey:
        """A new random key (256 bits), as ``tsig-keygen`` would make it."""
        return cls(name, base64.b64encode(secrets.token_bytes(32)).decode(), algorithm)

    @classmethod
    def from_bind(cls, text: str, source: str = "key file") -> TsigKey:
        """The first ``key "name" { algorithm …; secret "…"; };`` clause of BIND text."""
        match = _KEY_RE.search(text)
        if match is None:
            raise TsigKeyError(
                f'{source}: no key "name" {{ algorithm …; secret "…"; }}; clause '
                "(make one with tsig-keygen -a hmac-sha256 NAME)"
            )
        return cls(match["name"], match["secret"], match["algorithm"].lower())

    @classmethod
    def from_file(cls, path: Path) -> TsigKey:
        try:
            text = path.read_text()
        except OSError as exc:
            raise TsigKeyError(f"{path}: cannot read the TSIG key: {exc.strerror}") from exc
        return cls.from_bind(text, str(path))

    def to_bind(self) -> str:
        """The key as a BIND configuration clause (for named.conf and ``nsupdate -k``)."""
        return (
            f'key "{self.name}" {{\n\talgorithm {self.algorithm};\n\tsecret "{self.secret}";\n}};\n'
        )

    def dnspython_key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, self.algorithm)


@dataclass(frozen=True)
class AuthServer:
    """An authoritative DNS server by address; ``key`` signs the updates sent to it."""

    address: str
    port: int = 53
    key: TsigKey | None = None
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        try:
            ip_address(self.address)
        except ValueError:
            raise DnsError(
                f"server {self.address!r}: give the server's IP address, not a name "
                "(its name would be resolved by the system resolver)"
            ) from None
        if not 0 < self.port < 65536:
            raise DnsError(f"server {self.address}: port {self.port} is not a TCP port")

    @classmethod
    def parse(cls, text: str, **kwargs: object) -> AuthServer:
        """``192.0.2.53``, ``192.0.2.53:5353``, ``[2001:db8::53]:5353`` or ``2001:db8::53``."""
        host, port = text, "53"
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest.removeprefix(":") or "53"
        elif text.count(":") == 1:
            host, port = text.split(":")
        if not port.isdigit():
            raise DnsError(f"server {text!r}: port {port!r} is not a number")
        return cls(host, int(port), **kwargs)  # type: ignore[arg-type]

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address  # IPv6
        return f"{host}:{self.port}"


def _key_name(message: dns.message.Message) -> str:
    return message.keyname.to_text(omit_final_dot=True) if message.keyname else "(none)"


def exchange(server: AuthServer, message: dns.message.Message, what: str) -> dns.message.Message:
    """Send ``message`` by TCP and return the answer; ``what`` names it in errors."""
    try:
        return dns.query.tcp(message, server.address, timeout=server.timeout_s, port=server.port)
    except dns.exception.Timeout as exc:
        raise ServerUnreachable(
            f"{server}: no answer to {what} within {server.timeout_s:g}s; is the server up?"
        ) from exc
    except (OSError, EOFError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ServerUnreachable(f"{server}: {what}: {reason}; is the server up?") from exc
    except dns.tsig.PeerError as exc:
        error = type(exc).__name__.removeprefix("Peer")  # BadKey, BadSignature, BadTime
        raise TsigRejected(
            f"{server} rejected the TSIG signature of {what} ({error}, rcode NOTAUTH): "
            f"check that key {_key_name(message)} and its secret match the server's"
            + (" and that both clocks are right" if error == "BadTime" else "")
        ) from exc
    except (dns.tsig.BadSignature, dns.tsig.BadTime) as exc:
        raise TsigRejected(
            f"{server}: the answer to {what} is not signed with key {_key_name(message)}: {exc}"
        ) from exc
    except dns.exception.DNSException as exc:
        raise QueryFailed(f"{server}: malformed answer to {what}: {exc}") from exc


def query(
    server: AuthServer, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> dns.message.Message:
    """One non-recursive query to the server."""
    request = dns.message.make_query(name, rdtype, IN)
    request.flags &= ~dns.flags.RD
    return exchange(server, request, f"the query {name} {dns.rdatatype.to_text(rdtype)}")


def check_serves_zone(server: AuthServer, zone: dns.name.Name) -> None:
    """Raise NotAuthoritative unless the server serves ``zone`` as a zone of its own."""
    answer = query(server, zone, dns.rdatatype.SOA)
    rcode = answer.rcode()
    has_soa = any(r.name == zone and r.rdtype == dns.rdatatype.SOA for r in answer.answer)
    if rcode != dns.rcode.NOERROR or not answer.flags & dns.flags.AA or not has_soa:
        why = dns.rcode.to_text(rcode) if rcode != dns.rcode.NOERROR else "no SOA at its apex"
        raise NotAuthoritative(
            f"{server} does not serve zone {zone} ({why}); add the zone to the server first"
        )


def served(server: AuthServer, key: RRsetKey) -> RecordSet:
    """The record set the server serves for ``key`` (empty if the name or type is absent)."""
    answer = query(server, key.name, key.rdtype)
    rcode = answer.rcode()
    if rcode == dns.rcode.REFUSED:
        raise NotAuthoritative(
            f"{server} refused the query {key} (REFUSED): it does not serve zone {key.zone}"
        )
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise QueryFailed(f"{server} answered the query {key} with {dns.rcode.to_text(rcode)}")
    if not answer.flags & dns.flags.AA:
        raise NotAuthoritative(f"{server} is not authoritative for {key} (zone {key.zone})")
    for rrset in answer.answer:
        if rrset.name == key.name and rrset.rdtype == dns.rdatatype.CNAME:
            raise NameConflict(
                f"{key.name} in zone {key.zone} is a CNAME ({rrset[0]}); remove it so the "
                f"{dns.rdatatype.to_text(key.rdtype)} records can be published"
            )
        if rrset.name == key.name and rrset.rdtype == key.rdtype:
            return RecordSet.of(rrset.ttl, rrset)
    return EMPTY


def transfer(server: AuthServer, zone: dns.name.Name) -> dns.zone.Zone:
    """The whole of ``zone`` by AXFR (signed with the server's key if it has one)."""
    contents = dns.zone.Zone(zone, IN, relativize=False)
    key = server.key.dnspython_key() if server.key else None
    request, _ = dns.xfr.make_query(contents, serial=None, keyring=key)
    what = f"the transfer of zone {zone}"
    try:
        dns.query.inbound_xfr(
            server.address,
            contents,
            request,
            port=server.port,
            timeout=server.timeout_s,
            lifetime=server.timeout_s * 6,
        )
    except dns.xfr.TransferError as exc:
        who = f"key {server.key.name}" if server.key else "unsigned requests"
        raise TransferFailed(
            f"{server} refused {what} ({dns.rcode.to_text(exc.rcode)}): allow {who} to "
            "transfer it (allow-transfer), or plan without pruning"
        ) from exc
    except dns.exception.Timeout as exc:
        raise ServerUnreachable(f"{server}: {what} did not finish in time") from exc
    except (OSError, EOFError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ServerUnreachable(f"{server}: {what}: {reason}; is the server up?") from exc
    except dns.tsig.PeerError as exc:
        raise TsigRejected(
            f"{server} rejected the TSIG signature of {what} ({type(exc).__name__})"
        ) from exc
    except dns.exception.DNSException as exc:
        raise TransferFailed(f"{server}: {what} failed: {exc}") from exc
    return contents
