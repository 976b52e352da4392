"""A customer's policy: what its mail may carry, what happens to it, and how its recipients
are checked.

The GOC stores one policy per customer (``policies.policy``, JSON) and logical replication
carries it to every tower: the relay reads ``recipient_check`` (Postfix pgsql maps), scand
reads the rest (``mailtower.customers.snapshot``). Both validate with this model, so a policy
that passes here is one every reader can apply whole; one that does not is refused at the GOC
with the field it names, and a tower that meets one anyway (written around the GOC's command)
keeps that customer's previous policy.

Every field has a default, so ``{}`` is the default policy: the tower's bans and limits, the
seed's three days of store-and-forward, the 30 days of quarantine.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from mailtower.customers.errors import PolicyError
from mailtower.scanning.pipeline import Policy

# Types a scanner recognises by content (mailtower.scanning.skeptic's sniffer).
NATIVE_TYPES = frozenset({"pe", "elf", "macho", "lnk"})
MAX_LIST = 1000  # entries in any one list of a policy
MAX_POLICY_BYTES = 256 * 1024  # the whole policy as JSON
MIN_MESSAGE_BYTES = 1024

_EXTENSION_RE = re.compile(r"^[a-z0-9][a-z0-9_+~-]{0,31}$")
_MIME_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
# An address for notices: a plain local part and a domain (no quotes, no routes, no spaces).
_ADDRESS_RE = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$"
)


def _extension(value: str) -> str:
    value = value.strip().lstrip(".").lower()
    if not _EXTENSION_RE.match(value):
        raise ValueError("an extension is 1-32 of a-z 0-9 _ + ~ - (a leading dot is dropped)")
    return value


def _detected_type(value: str) -> str:
    value = value.strip().lower()
    if value in NATIVE_TYPES or _MIME_TYPE_RE.match(value):
        return value
    raise ValueError(
        f"a type is a MIME type (type/subtype) or one of {', '.join(sorted(NATIVE_TYPES))}"
    )


def _name_pattern(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 200:
        raise ValueError("a file name pattern is 1-200 characters")
    if any(ord(c) < 0x20 or c in "/\\\x7f" for c in value):
        raise ValueError("a file name pattern holds no control character, / or \\")
    if value.strip("*?") == "":
        raise ValueError("a file name pattern must name something (not only * and ?)")
    return value.lower()


def _address(value: str) -> str:
    if len(value) > 254 or not _ADDRESS_RE.match(value):
        raise ValueError("not a plain e-mail address (local@domain, domain in lower case)")
    return value


def _sender(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("@"):
        if len(value) > 254 or not _ADDRESS_RE.match("x" + value):
            raise ValueError("an allowed sender's domain is @ and a domain name (@example.org)")
        return value
    if len(value) > 254 or not _ADDRESS_RE.match(value):
        raise ValueError("an allowed sender is a plain address (local@domain) or @domain")
    return value


Extension = Annotated[str, AfterValidator(_extension)]
DetectedType = Annotated[str, AfterValidator(_detected_type)]
NamePattern = Annotated[str, AfterValidator(_name_pattern)]
Address = Annotated[str, AfterValidator(_address)]
Sender = Annotated[str, AfterValidator(_sender)]


class CustomerPolicy(BaseModel):
    """One customer's policy. Unknown fields are refused; values are never echoed in errors
    (they are attacker-influenced text reaching logs)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    # Bans beyond the tower's, and exceptions to the tower's.
    ban_names: tuple[NamePattern, ...] = Field(default=(), max_length=MAX_LIST)  # globs, any case
    ban_extensions: tuple[Extension, ...] = Field(default=(), max_length=MAX_LIST)
    allow_extensions: tuple[Extension, ...] = Field(default=(), max_length=MAX_LIST)
    ban_types: tuple[DetectedType, ...] = Field(default=(), max_length=MAX_LIST)
    allow_types: tuple[DetectedType, ...] = Field(default=(), max_length=MAX_LIST)
    # What happens to mail that is suspicious (heuristics) or holds an encrypted archive
    # (None: as the tower's settings say; a tower quarantines both by default).
    suspicious: Literal["quarantine", "deliver"] = "quarantine"
    encrypted_archives: Literal["quarantine", "deliver"] | None = None
    # Largest message for this customer; None: the tower's limit. Larger mail is held
    # (banned, ``policy.max-size``), never bounced.
    max_message_bytes: int | None = Field(default=None, ge=MIN_MESSAGE_BYTES, le=2**31 - 1)
    # Who is told of a quarantine (the notifications issue reads these).
    notify: Literal["none", "recipient", "admin", "both"] = "none"
    admin_address: Address | None = None
    digest_hour: int | None = Field(default=None, ge=0, le=23)  # None: a notice at once
    # Store-and-forward while the customer's server is down, and how long quarantine is kept.
    retention_days: int = Field(default=3, ge=1, le=14)
    quarantine_days: int = Field(default=30, ge=1, le=365)
    # Recipient verification at the relay: none, the uploaded list, or Postfix's address
    # verification against the customer's server.
    recipient_check: Literal["none", "list", "verify"] = "none"
    # Envelope senders (lower case) whose mail to this customer is never quarantined as banned
    # or suspicious: delivered with the verdict header instead. A virus is quarantined
    # whoever sent it. "@example.org" is every sender at exactly that domain.
    allow_senders: tuple[Sender, ...] = Field(default=(), max_length=MAX_LIST)

    def allows_sender(self, sender: str) -> bool:
        """Whether the envelope sender ``sender`` is on ``allow_senders`` (the null sender
        ``<>`` never is)."""
        if not self.allow_senders:
            return False
        address = sender.strip().strip("<>").lower()
        if "@" not in address:
            return False
        domain = "@" + address.rpartition("@")[2].rstrip(".")
        return address in self.allow_senders or domain in self.allow_senders

    def scanning_policy(self, base: Policy) -> Policy:
        """The scanning library's policy for this customer, from the tower's ``base``."""
        allow_ext, allow_types = set(self.allow_extensions), set(self.allow_types)
        native = {t for t in self.ban_types if t in NATIVE_TYPES}
        mime_types = {t for t in self.ban_types if t not in NATIVE_TYPES}
        return dataclasses.replace(
            base,
            banned_extensions=(base.banned_extensions | set(self.ban_extensions)) - allow_ext,
            banned_types=(base.banned_types | mime_types) - allow_types,
            banned_native=(base.banned_native | native) - allow_types,
            banned_names=tuple(dict.fromkeys((*base.banned_names, *self.ban_names))),
            encrypted_archives=(
                base.encrypted_archives
                if self.encrypted_archives is None
                else "pass"
                if self.encrypted_archives == "deliver"
                else "suspicious"
            ),
            max_message_bytes=self.max_message_bytes,
        )


DEFAULT = CustomerPolicy()


def parse(data: object, *, what: str = "policy") -> CustomerPolicy:
    """``data`` (a mapping, or JSON text) as a policy; PolicyError naming each bad field."""
    if isinstance(data, str | bytes):
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyError(f"invalid {what}: larger than {MAX_POLICY_BYTES} bytes")
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise PolicyError(f"invalid {what}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PolicyError(f"invalid {what}: a JSON object is needed")
    try:
        policy = CustomerPolicy.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise PolicyError(f"invalid {what}:\n" + "\n".join(lines)) from None
    if policy.notify in ("admin", "both") and policy.admin_address is None:
        needed = f"admin_address: needed when notify is {policy.notify}"
        raise PolicyError(f"invalid {what}:\n  {needed}")
    if len(dump(policy)) > MAX_POLICY_BYTES:
        raise PolicyError(f"invalid {what}: larger than {MAX_POLICY_BYTES} bytes")
    return policy


def dump(policy: CustomerPolicy) -> str:
    """The policy as stored: JSON of the fields that differ from the default, keys sorted."""
    return json.dumps(policy.model_dump(mode="json", exclude_defaults=True), sort_keys=True)


def merge(policy: CustomerPolicy, changes: dict[str, Any]) -> CustomerPolicy:
    """``policy`` with ``changes`` applied (a field set to None returns to its default)."""
    data = policy.model_dump(mode="json", exclude_defaults=True)
    for key, value in changes.items():
        if value is None and key in CustomerPolicy.model_fields:
            data.pop(key, None)
        else:
            data[key] = value
    return parse(data)


__all__ = [
    "DEFAULT",
    "NATIVE_TYPES",
    "CustomerPolicy",
    "PolicyError",
    "dump",
    "merge",
    "parse",
]
