"""The errors of MX generation and publication: one root, one subclass per failure.

Every message names what failed (the tower, domain, zone or server) and, where there is one,
what to do about it.
"""

from __future__ import annotations

from mailtower.controller.errors import ControllerError


class DnsError(ControllerError):
    """MX records could not be generated, compared or published."""


class InvalidPair(DnsError):
    """The tower pair's description is invalid; nothing was sent."""


class TsigKeyError(DnsError):
    """The TSIG key is missing, unreadable or malformed."""


class ServerUnreachable(DnsError):
    """The authoritative server did not answer (connection refused, reset or timed out)."""


class NotAuthoritative(DnsError):
    """The server does not serve a zone of the pair authoritatively."""


class QueryFailed(DnsError):
    """A query to the authoritative server was answered with an error rcode."""


class TransferFailed(DnsError):
    """A zone transfer (AXFR, used to find stale records) was refused or failed."""


class NameConflict(DnsError):
    """A name the pair publishes already holds a CNAME, so no other record can live there."""


class UpdateError(DnsError):
    """A dynamic update was not applied; the zone is as it was before that update."""


class TsigRejected(UpdateError):
    """The server rejected the update's TSIG signature (unknown key, wrong secret, clock)."""


class UpdateRefused(UpdateError):
    """The server refused the update (the key is not allowed to update the zone)."""


class ZoneChanged(UpdateError):
    """The zone changed between the plan and the update (a prerequisite failed)."""


class UpdateFailed(UpdateError):
    """The server answered the update with another error rcode."""
