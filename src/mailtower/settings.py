"""The one typed settings model of a tower (docs/design.md invariant 3).

Every port, address, limit and engine list lives here. The deploy renders it into every
config file (Postfix, HAProxy, clamd, PostgreSQL, Prometheus) and writes it as JSON to
``/etc/mailtower/tower.json``, which the daemons load with this same model.

The hosts beside the towers have theirs at the end: the GOC (``GocSettings``), the
authoritative DNS server (``DnsServer``) and the lab's sender (``LabSender``); their roles
validate their host data with ``validate`` before changing anything.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mailtower.errors import SettingsError

SETTINGS_PATH = Path("/etc/mailtower/tower.json")

# RFC 1123 host name labels; a customer domain needs at least two labels.
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})+$")
# Postfix time values: a number with an optional unit (s, m, h, d, w).
_DURATION_RE = re.compile(r"^([0-9]+)([smhdw]?)$")

Duration = Annotated[str, Field(pattern=_DURATION_RE.pattern)]
_DURATION_UNITS = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_s(value: str) -> int:
    """Seconds of a Duration (``3d``, ``20s``; a bare number is days, as Postfix reads it)."""
    match = _DURATION_RE.match(value.strip())
    if not match:
        raise ValueError(f"not a duration: {value!r} (a number, then s, m, h, d or w)")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


# Windows runs these (or hands them to an interpreter) on a double click. Defaults in the spirit
# of amavisd-new's banned_filename_re; a tower adds its own (mailtower scan --ban-ext …).
DEFAULT_BANNED_EXTENSIONS = frozenset(
    {"exe", "scr", "pif", "com", "bat", "cmd", "vbs", "vbe", "js", "jse", "wsf", "wsh"}
    | {"hta", "cpl", "lnk", "jar", "ps1", "msi"}
)
# Whole-message engines scand knows (mailtower.scanning.engines.from_settings builds them).
ENGINES = ("clamd", "icap")
ICAP_DEFAULT_PORT = 1344  # RFC 3507's registered port (given here for error messages)
_ICAP_EXAMPLE_URL = "icap://127.0.0.1:1344/avscan"


def _default_banned_extensions() -> list[str]:
    return sorted(DEFAULT_BANNED_EXTENSIONS)


@dataclass(frozen=True)
class IcapUrl:
    """Where an ICAP service is: ``icap://host:port/service[?arguments]``."""

    host: str
    port: int
    service: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"icap://{host}:{self.port}/{self.service}"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_icap_url(url: str) -> IcapUrl:
    """Parse ``icap://host:port/service[?arguments]``; raise ValueError saying how to write it."""
    example = f"write it as icap://host:{ICAP_DEFAULT_PORT}/service (e.g. {_ICAP_EXAMPLE_URL})"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"ICAP URL {url!r} is malformed ({exc}); {example}") from None
    if parts.scheme != "icap":
        raise ValueError(f"ICAP URL {url!r} must start with icap://; {example}")
    if not parts.hostname:
        raise ValueError(f"ICAP URL {url!r} names no host; {example}")
    if port is None or port == 0:
        raise ValueError(f"ICAP URL {url!r} names no port; {example}")
    service = parts.path.lstrip("/")
    if not service:
        raise ValueError(f"ICAP URL {url!r} names no service path; {example}")
    if parts.fragment or parts.username or parts.password:
        raise ValueError(f"ICAP URL {url!r} has parts ICAP has no use for; {example}")
    if parts.query:  # service arguments, e.g. c-icap's virus_scan?mode=simple
        service += f"?{parts.query}"
    return IcapUrl(parts.hostname, port, service)


class StrictModel(BaseModel):
    """The base of every settings model: unknown fields refused, values frozen, and a bad
    value never echoed in an error's text (it may be a password: errors reach deploy output
    and logs; the message names the field)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class Ports(StrictModel):
    """TCP ports of the tower's services."""

    smtp: int = 25  # the relay's public SMTP listener
    filter: int = 10024  # relay-local HAProxy front end, and scand on every scanner
    reinject: int = 10025  # relay listener for scanned mail, open to the scanners only
    scanner_http: int = 10026  # scand health + metrics
    monitor_http: int = 9101  # monitor metrics + pool state
    relay_exporter: int = 9102  # relay queue metrics
    haproxy_runtime: int = 9999  # HAProxy runtime API on the relay, open to the monitor only
    haproxy_stats: int = 9998  # HAProxy Prometheus metrics on the relay
    postgres: int = 5432
    mirror_http: int = 8080  # the monitor's signature mirror
    prometheus: int = 9090
    alertmanager: int = 9093  # the monitor's Alertmanager (Prometheus and operators' amtool)
    node_exporter: int = 9100  # every tower host's host metrics, open to the monitor only


class Limits(StrictModel):
    """Limits and timers; durations use Postfix syntax (e.g. ``30s``, ``3d``)."""

    # Postfix's message_size_limit; scand takes filter_message_bytes (this with the relay's own).
    message_size_bytes: int = 50 * 1024 * 1024
    queue_lifetime: Duration = "3d"  # deferred mail is kept this long (docs/design.md)
    bounce_queue_lifetime: Duration = "3d"
    queue_run_delay: Duration = "30s"  # how often the deferred queue is scanned
    minimal_backoff: Duration = "30s"  # first retry of a deferred message
    maximal_backoff: Duration = "15m"
    filter_connections: int = 46  # Postfix processes feeding the scanner pool (2 per scanner)
    # Messages one scand scans at once, over all its workers (more wait for a slot). 4 on a
    # 2-core scanner with 2 workers (2 scan threads each) against 8 (4 each), same benchmark
    # harness, 3 pairs of runs: 87-94 against 87-88 messages/s, send p99 415-486 against
    # 500-590 ms — fewer threads per worker share its one GIL with a large message.
    scan_concurrency: int = 4
    # scand's worker processes, sharing its SMTP socket under a supervisor (Python runs one
    # thread at a time per process, so one process uses one core); 0: one per CPU of the
    # scanner; 1: a single process without a supervisor (the smallest memory footprint).
    scan_workers: int = Field(default=0, ge=0)
    engine_timeout_s: float = 30.0  # one engine call; over it the message is tempfailed
    reinject_timeout_s: float = 60.0
    haproxy_connect_timeout_ms: int = 1000  # a dead scanner costs at most this, then redispatch
    health_interval_s: float = 1.0  # monitor probe period
    health_timeout_s: float = 1.0
    fail_after: int = 2  # consecutive failed probes before a scanner is put in maintenance
    recover_after: int = 2  # consecutive good probes before it is enabled again
    queue_alert_messages: int = 500  # alert when the relay queue grows past this
    # The relay's TLS certificate ends within this many days: alert (time to renew, re-deploy).
    tls_expiry_alert_days: int = Field(default=14, ge=1, le=90)
    replication_lag_alert_s: int = 30
    queue_min_free_bytes: int = 256 * 1024 * 1024  # below this free space the relay answers 452
    # A message that keeps failing for a reason of its own (the relay refuses it for good,
    # re-injection or scand fails on it, its scan times out while the engines are healthy) is
    # quarantined as "unprocessable" once the relay has held it this long, instead of being
    # scanned again on every retry for the whole queue lifetime. Its age comes from the
    # relay's own Received header (scand.relay_trace); with Postfix's backoff (30 s doubling
    # to 15 m) one hour is about 10 scans (docs/benchmarks.md).
    unprocessable_after_s: float = Field(default=3600.0, gt=0)

    # What the relay takes at SMTP time, and so what the filter (scand) must take: the relay
    # refuses at RCPT, MAIL or DATA anything the filter could not take, so the scan hop never
    # has a reason to refuse (docs/runbook.md "The relay's limits").
    recipients_per_message: int = Field(default=1000, ge=1)  # smtpd_recipient_limit; one scan each
    address_local_part_max: int = Field(default=64, ge=1)  # RFC 5321 4.5.3.1.1, characters
    address_path_max: int = Field(default=256, ge=8)  # RFC 5321 4.5.3.1.3: "<address>" in full
    # The scan transport folds header and body lines longer than this (smtp_line_length_limit,
    # CRLF excluded; RFC 5322's 998), so scand never sees a longer one.
    filter_line_bytes: int = Field(default=998, ge=80)
    # Room for what the relay adds to a message before the filter: its Received header (which
    # carries the client's HELO name, itself up to a 2,048-byte command line) and TLS details.
    relay_header_bytes: int = Field(default=8192, ge=1024)
    # Per client address and minute (Postfix anvil); 0: no limit. Addresses in
    # client_limit_exempt (and the relay itself) are not counted: a tower's own verification
    # host sends a thousand messages in a minute.
    client_connection_rate: int = Field(default=60, ge=0)
    client_message_rate: int = Field(default=120, ge=0)
    client_recipient_rate: int = Field(default=1200, ge=0)
    client_connection_count: int = Field(default=20, ge=0)  # at once
    client_limit_exempt: list[IPv4Network] = []
    # One SMTP request from a client (a command, or all of DATA) must arrive within this…
    client_request_timeout: Duration = "60s"
    # …and DATA earns more time only at this rate (bytes/s), so a trickle ends in about a minute.
    client_min_data_rate: int = Field(default=500, ge=1)
    # Dictionary attacks (guessing recipients): every refused RCPT is a client error. Past
    # the soft limit each further error answer waits client_error_sleep; at the hard limit the
    # connection is closed. Both count per connection and restart after a delivered message,
    # so a list server with a few stale addresses is slowed at most, never cut off.
    client_soft_error_limit: int = Field(default=5, ge=1)
    client_hard_error_limit: int = Field(default=20, ge=1)
    client_error_sleep: Duration = "1s"
    # Recipient verification (a customer's recipient_check = verify): how long the relay
    # trusts its customer server's answer to a probe. A known address stays accepted for
    # verify_positive_expire after its last good probe, also while that server is down (the
    # mail waits in the queue); it is probed again in the background after
    # verify_positive_refresh. An unknown address is refused for verify_negative_expire, and
    # probed again after verify_negative_refresh (a mailbox the customer just made).
    verify_positive_expire: Duration = "31d"
    verify_positive_refresh: Duration = "7d"
    verify_negative_expire: Duration = "3d"
    verify_negative_refresh: Duration = "1h"

    @model_validator(mode="after")
    def _error_limits_ordered(self) -> Limits:
        if self.client_soft_error_limit > self.client_hard_error_limit:
            raise ValueError(
                f"limits.client_soft_error_limit ({self.client_soft_error_limit}) exceeds "
                f"limits.client_hard_error_limit ({self.client_hard_error_limit}): the client "
                "would be cut off before it is ever slowed down"
            )
        return self

    @model_validator(mode="after")
    def _verify_cache_outlives_an_outage(self) -> Limits:
        # A known recipient must stay accepted while its server is down for as long as the
        # tower keeps mail for it, and a refresh must come before the entry expires.
        expire = duration_s(self.verify_positive_expire)
        if expire <= duration_s(self.queue_lifetime):
            raise ValueError(
                f"limits.verify_positive_expire ({self.verify_positive_expire}) must exceed "
                f"limits.queue_lifetime ({self.queue_lifetime}): known recipients of a "
                "customer whose server is down would be refused before the queue gives up"
            )
        if duration_s(self.verify_positive_refresh) >= expire:
            raise ValueError(
                f"limits.verify_positive_refresh ({self.verify_positive_refresh}) must be "
                f"shorter than limits.verify_positive_expire ({self.verify_positive_expire})"
            )
        if duration_s(self.verify_negative_refresh) > duration_s(self.verify_negative_expire):
            raise ValueError(
                f"limits.verify_negative_refresh ({self.verify_negative_refresh}) must not "
                f"exceed limits.verify_negative_expire ({self.verify_negative_expire})"
            )
        return self

    @property
    def filter_line_length(self) -> int:
        """scand's DATA line limit: a folded line, the dot Postfix stuffs before a line that
        starts with one, and CRLF."""
        return self.filter_line_bytes + 1 + 2

    @property
    def filter_command_bytes(self) -> int:
        """scand's command line limit: the longest MAIL or RCPT the relay can send it. A path
        the relay took is at most address_path_max characters, UTF-8 takes up to 4 bytes each
        and quoting a local part at most doubles it; 128 for the verb and MAIL's parameters."""
        return 4 * (self.address_path_max + self.address_local_part_max + 2) + 128

    @property
    def filter_message_bytes(self) -> int:
        """scand's data size limit: a message the relay took (message_size_bytes of content)
        with the relay's headers, as the scan transport sends it. Dot-stuffing adds at most one
        byte to a 3-byte line (".\r\n"), folding 3 bytes per filter_line_bytes: 4/3 bounds
        both."""
        return (self.message_size_bytes + self.relay_header_bytes) * 4 // 3 + 1

    @property
    def reinject_message_bytes(self) -> int:
        """The re-injection listener's size limit: what scand took, with its verdict header."""
        return self.filter_message_bytes + self.relay_header_bytes


class Customer(StrictModel):
    """A customer domain and the mail server the tower delivers it to."""

    domain: str
    server: str  # host name or IPv4 address of the customer's mail server
    port: int = 25

    @field_validator("domain")
    @classmethod
    def _valid_domain(cls, value: str) -> str:
        value = value.strip().rstrip(".").lower()
        if not _DOMAIN_RE.match(value):
            raise ValueError(f"{value!r} is not a valid domain name (e.g. example.com)")
        return value

    @field_validator("server")
    @classmethod
    def _valid_server(cls, value: str) -> str:
        value = value.strip().rstrip(".").lower()
        try:
            IPv4Address(value)
        except ValueError:
            if not _DOMAIN_RE.match(value):
                raise ValueError(f"{value!r} is neither an IPv4 address nor a host name") from None
        return value

    @property
    def transport(self) -> str:
        """The Postfix transport of this customer: MX lookup suppressed, fixed port."""
        return f"smtp:[{self.server}]:{self.port}"


class TowerHosts(StrictModel):
    """Addresses of the tower's hosts, taken from the inventory."""

    relay: IPv4Address
    monitor: IPv4Address
    sql: list[IPv4Address] = Field(min_length=2, max_length=2)  # primary first, then standby
    scanners: list[IPv4Address] = Field(min_length=1)
    # RAM of each scanner, MiB (None: the deploy reads it from the host): sizes clamd's reloads
    scanner_ram_mib: int | None = Field(None, ge=64)

    @model_validator(mode="after")
    def _unique(self) -> TowerHosts:
        every = [self.relay, self.monitor, *self.sql, *self.scanners]
        seen: set[IPv4Address] = set()
        for ip in every:
            if ip in seen:
                raise ValueError(f"address {ip} is given to two hosts of the tower")
            seen.add(ip)
        return self


Holder = Literal["tower", "relay", "scanners", "monitor"]


class Secrets(StrictModel):
    """Passwords of the tower's SQL roles and its canary secret (kept out of the repository).

    The inventory holds the whole set (``held_by="tower"``); each host gets only its role's
    share (``TowerSettings.for_role``): scand, which parses hostile mail, can read the
    scanner's SQL password and the canary secret, and nothing else."""

    # Whose copy this is: the whole set ("tower", the deploy's), or one role's share.
    held_by: Holder = "tower"
    sql_relay: str | None = Field(None, min_length=16)  # relay: domains, routes, policies
    sql_scanner: str | None = Field(None, min_length=16)  # scanners: write verdict events
    sql_monitor: str | None = Field(None, min_length=16)  # monitor: reads replication state
    sql_replication: str | None = Field(None, min_length=16)  # standby: streaming replication
    # With a GOC (TowerSettings.goc) only:
    sql_sync: str | None = Field(None, min_length=16)  # mt_sync here: the GOC's subscription
    # This tower's own roles at the GOC (no other tower has their passwords):
    goc_sync: str | None = Field(None, min_length=16)  # mt_sync_<tower>: our config subscription
    goc_status: str | None = Field(None, min_length=16)  # mt_status_<tower>: the monitor
    # With rule bundles or ClamAV databases (TowerSettings.bundles, .clamav) only: marks the
    # monitor's canary messages to a scanner (scanned and answered, never delivered) and its
    # update requests to scand; anyone without it gets normal mail.
    canary: str | None = Field(None, min_length=16)


SECRET_NAMES = tuple(n for n in Secrets.model_fields if n != "held_by")
# What each host role's daemons read; the relay's Postfix gets its SQL password in its own
# map files (mode 0640, group postfix), not in tower.json.
ROLE_SECRETS: dict[str, tuple[str, ...]] = {
    "relay": ("sql_relay",),  # the orderer reads each customer's retention
    "scanners": ("sql_scanner", "canary"),
    "monitor": ("sql_monitor", "goc_status", "canary"),
}


class Goc(StrictModel):
    """The global operations centre the tower syncs with (docs/design.md "Across towers")."""

    address: IPv4Address  # where the tower's SQL primary and monitor reach the GOC's PostgreSQL
    port: int = 5432
    database: str = "goc"
    status_interval_s: float = 5.0  # how often the monitor reports the tower's state
    bundle_port: int = 8026  # the GOC's published rule bundles (HTTP; signed, so not secret)


class Bundles(StrictModel):
    """Signed rule bundles (mailtower.bundles): the GOC publishes, the monitor pulls, verifies
    and mirrors them, then rolls each one across the scanner pool (mailtower.monitor.rollout)."""

    public_key: str  # PEM of the GOC's signing.pub; a tower never holds the signing key
    # Where the GOC publishes (latest.json + rules-N.tar.gz); None: http://<goc>:<bundle_port>
    source: str | None = None
    poll_interval_s: float = Field(10.0, gt=0)  # how often the monitor asks the source
    batch: int = Field(4, ge=1)  # at most this many scanners drained for an update at once…
    spare: int = Field(1, ge=0)  # …and always this many more in service than the load needs
    drain_timeout_s: float = Field(60.0, gt=0)  # in-flight messages get this long to finish
    apply_timeout_s: float = Field(120.0, gt=0)  # install + reload on one scanner
    lag_alert_after: Duration = "15m"  # a scanner behind the mirror this long raises an alert

    @field_validator("public_key")
    @classmethod
    def _pem(cls, value: str) -> str:
        if "BEGIN PUBLIC KEY" not in value:
            raise ValueError("bundles.public_key must be the PEM text of the GOC's signing.pub")
        return value


class Upgrade(StrictModel):
    """The rolling upgrade of scand: a new mailtower wheel or new settings, installed by the
    deploy on running scanners, restarted by the monitor a few at a time in drained windows
    (mailtower.monitor.rollout.stack; needs ``secrets.canary``, else the deploy restarts the
    scanners one at a time itself)."""

    batch: int = Field(default=3, ge=1)  # at most this many scanners out for a restart at once…
    # …and always this many more in service than the load needs (plan.room): with 23 scanners,
    # 3 out leaves 20; a batch the pool cannot spare waits or shrinks, never empties the pool
    spare: int = Field(default=1, ge=0)
    drain_timeout_s: float = Field(default=60.0, gt=0)  # in-flight messages get this long to finish
    # scand back, healthy, with the new code (and clamd/c-icap, restarted before it when their
    # configuration or packages changed: their databases loaded; scand.engines)
    restart_timeout_s: float = Field(default=120.0, gt=0)
    poll_interval_s: float = Field(
        default=5.0, gt=0
    )  # how often the monitor looks for scanners behind
    wait_timeout_s: float = Field(default=3600.0, gt=0)  # how long the deploy waits for the roll
    # mailtower-relay-upgrade: deliveries to the filter in progress get this long to finish
    # before Postfix restarts on new packages (else nothing is restarted)
    relay_drain_s: int = Field(default=120, gt=0)


_DB_NAME = r"^[a-z][a-z0-9_-]{0,40}$"  # a ClamAV database name: main, daily, bytecode, test…


class ClamavMirror(StrictModel):
    """Official ClamAV databases on a tower: the monitor mirrors the GOC's verified copies and
    rolls them across the scanners in windows (docs/design.md, issue 16)."""

    databases: list[Annotated[str, Field(pattern=_DB_NAME)]] = Field(
        ["main", "daily", "bytecode"], min_length=1
    )  # what the scanners load
    poll_interval_s: float = Field(60.0, gt=0)  # how often the monitor asks the GOC
    max_age: Duration = "1d"  # the mirror older than this (since the GOC's last good check): alert
    lag_alert_after: Duration = "2h"  # a scanner behind the mirror this long: alert
    # clamd's RSS with the official main + daily + bytecode loaded: 1,632 MiB measured on an
    # official-size database (docs/benchmarks.md, tests/bench/clamd_reload.py), with headroom
    engine_mib: int = Field(1700, ge=1)
    # clamd's growth while scanning, scand's peak and c-icap beside the engine (benchmarks.md)
    working_set_mib: int = Field(640, ge=0)
    concurrent_reload: Literal["auto", "yes", "no"] = "auto"

    @property
    def max_age_s(self) -> int:
        """``max_age`` in seconds (the monitor's alert compares the mirror's age with it)."""
        return duration_s(self.max_age)


class Backup(StrictModel):
    """Continuous backups with pgBackRest (docs/runbook.md "Backups and restore"): every WAL
    segment archived as it is written, full and differential backups on timers, all kept on a
    repository host that is not the database host; pgBackRest's own TLS server carries them
    (client certificates, each host admitted for this stanza only)."""

    # The repository host; None: the tower's monitor (a GOC must name one). A tower accepts
    # only its monitor (the one role that sets a repository up).
    repo_host: IPv4Address | None = None
    # On the controller: the backup CA (ca.crt, ca.key) and one <address>.crt/.key per host,
    # made when missing (mailtower.controller.backup.ensure_pki); keep it with the secrets.
    tls_dir: str = Field(min_length=1)
    port: int = Field(8432, ge=1, le=65535)  # `pgbackrest server` on every host of the stanza
    repo_path: str = "/var/lib/pgbackrest"  # on the repository host, owned by user pgbackrest
    retention_full: int = Field(2, ge=1, le=100)  # full backups kept (and the WAL they need)
    retention_diff: int = Field(6, ge=1, le=100)  # differential backups kept
    # systemd OnCalendar of the repository host's timers: a full a week, a diff other days.
    full_calendar: str = "Sun *-*-* 02:30:00"
    diff_calendar: str = "Mon..Sat *-*-* 02:30:00"
    compress_type: Literal["gz", "lz4", "zst", "bz2", "none"] = "zst"
    # The archive_command gives up after this and PostgreSQL retries the segment (WAL is kept
    # meanwhile, on the database host's disk).
    archive_timeout_s: int = Field(60, ge=10, le=3600)
    # PostgreSQL's archive_timeout: a segment with any write in it is archived after this at
    # the latest (what a lost host loses at most), and a database that writes (the towers'
    # events, the monitors' tower_status rows) archives at least this often. 0: only full
    # segments (16 MiB) are archived.
    archive_switch_s: int = Field(300, ge=0, le=3600)
    # The alerts on the repository host's metrics (templates/monitor/etc/prometheus/rules/
    # backup.yml): BackupTooOld past either age, WalArchivingStalled when nothing was archived
    # for archive_stall_s (more than archive_switch_s, which bounds a writing database's gap).
    alert_full_age_h: int = Field(8 * 24, ge=1, le=90 * 24)
    alert_backup_age_h: int = Field(26, ge=1, le=90 * 24)
    alert_archive_stall_s: int = Field(1800, ge=60, le=7 * 86400)

    @model_validator(mode="after")
    def _stall_after_switch(self) -> Backup:
        if self.archive_switch_s and self.alert_archive_stall_s <= 2 * self.archive_switch_s:
            raise ValueError(
                "alert_archive_stall_s must exceed twice archive_switch_s (a writing database"
                " archives at least every archive_switch_s)"
            )
        return self


# --- The monitor's quarantine manager (mailtower.monitor.quarantine, docs/quarantine.md) ---
_NOTICE_FROM = r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$"


class QuarantineSettings(StrictModel):
    """The tower side of the quarantine, run by the monitor: the portal's requests, expiry,
    the space metrics and the notices."""

    poll_interval_s: float = Field(default=5.0, gt=0, le=300)  # the GOC's pending requests
    housekeeping_interval_s: float = Field(default=60.0, gt=0, le=3600)  # expiry and space metrics
    # Notices come from this address (From: header; the envelope sender is null, so a notice
    # that cannot be delivered makes no bounce). None: no notices are sent.
    notice_from: str | None = Field(default=None, pattern=_NOTICE_FROM, max_length=254)
    # The portal's base URL, put in every notice (e.g. https://portal.example.net); None: none.
    portal_url: str | None = Field(
        default=None, pattern=r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/\S*)?$"
    )
    # Notices per minute at most (one pass a minute; at most one per address per pass): below
    # the relay's per-client message rate (limits.client_message_rate), which counts them.
    notices_per_minute: int = Field(default=60, ge=1, le=1000)


class RelayTls(StrictModel):
    """The relay's STARTTLS certificate as the operator gives it (docs/runbook.md
    "Certificates"): files on the controller, checked by the deploy before it changes anything
    (mailtower.controller.certs) and uploaded to the relay. Without it the relay keeps a
    self-signed certificate it made itself, and the deploy warns."""

    chain: str  # PEM: the relay's certificate first, then each intermediate (not the root)
    key: str  # PEM private key, unencrypted, mode 0600 (kept with the secrets, not in git)
    # The CA certificates the chain must end at (PEM bundle on the controller). None: the
    # controller's system bundle (a public CA); the lab gives its own CA.
    ca: str | None = None

    @field_validator("chain", "key", "ca")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not PurePosixPath(value).is_absolute():
            raise ValueError(f"{value!r} must be an absolute path on the controller")
        return value


# --- Alerts: Alertmanager on the monitor, mail to the operators (docs/runbook.md, "Alerts") ---
_MAILBOX = r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$"
Mailbox = Annotated[str, Field(pattern=_MAILBOX, max_length=254)]
# Prometheus and Alertmanager durations: always with a unit (a bare number is no duration there).
AlertDuration = Annotated[str, Field(pattern=r"^[0-9]+[smhdw]$")]


class Smarthost(StrictModel):
    """An SMTP server Alertmanager hands its mail to."""

    host: str = Field(pattern=r"^[A-Za-z0-9.-]+$")  # a name or an IPv4 address
    port: int = Field(25, ge=1, le=65535)
    # STARTTLS, with the server's certificate checked against the system's CAs for ``host``.
    # False: plain SMTP (Alertmanager then never tries STARTTLS).
    require_tls: bool = False


class AlertSettings(StrictModel):
    """Where the monitor's alerts go: the operators' mailboxes, by two ways (both every time)."""

    # Who reads them: deliverable mailboxes (each mail goes to all of them at once).
    to: list[Mailbox] = Field(min_length=1, max_length=20)
    # The mails' From (and envelope sender); None: alertmanager@<the relay's hostname>.
    sender: Mailbox | None = None
    # The way that does not depend on this tower: the twin tower's relay, or the operators' own
    # SMTP server. Every alert goes through the tower's own relay and through this one
    # (Alertmanager has no failover between receivers: two routes, the first with continue).
    # None: the tower's relay only (a tower down then tells no one).
    fallback: Smarthost | None = None
    group_by: list[Annotated[str, Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")]] = [
        "alertname",
        "instance",
    ]
    group_wait: AlertDuration = "30s"  # a new group's first mail waits this long for its siblings
    group_interval: AlertDuration = "5m"  # a changed group (new alert, resolved) mails again after
    repeat_interval: AlertDuration = "4h"  # an unchanged firing group mails again after
    scrape_interval: AlertDuration = "15s"  # Prometheus: how often every target is read…
    evaluation_interval: AlertDuration = "15s"  # …and the rules evaluated
    # Every rule's ``for:`` is at most this (the lab's checks wait seconds, not minutes);
    # None: each rule's own.
    for_max: AlertDuration | None = None
    # Host health (node exporter on every host): free space below this share of a filesystem…
    disk_free_percent: float = Field(10.0, gt=0, lt=100)
    memory_free_percent: float = Field(10.0, gt=0, lt=100)  # …MemAvailable below this…
    load_per_cpu: float = Field(2.0, gt=0)  # …15-minute load per CPU above this…
    clock_offset_s: float = Field(0.05, gt=0)  # …the clock off by more than this


class GocBackupMetrics(StrictModel):
    """Where a tower's monitor scrapes the GOC's backup repository host's node exporter."""

    address: IPv4Address  # the GOC's backup.repo_host
    port: int = Field(9100, ge=1, le=65535)  # its GocSettings.backup_exporter_port


class TowerSettings(StrictModel):
    """Everything a tower is: its hosts, ports, limits, engines and customers."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    hostname: str  # the relay's public name (MX target, TLS certificate, banner)
    hosts: TowerHosts
    ports: Ports = Ports()
    limits: Limits = Limits()
    # whole-message engines every message passes, in order (known: ENGINES)
    engines: list[Literal["clamd", "icap"]] = ["clamd"]
    # scand's policy (the in-process YARA, reputation and Skeptic stages always run too):
    # attachment extensions banned anywhere in a message (the whole list, no dots)…
    banned_extensions: list[str] = Field(default_factory=_default_banned_extensions)
    # …and archives that cannot be opened for a password: "suspicious" (stopped) or "pass".
    encrypted_archives: Literal["suspicious", "pass"] = "suspicious"
    customers: list[Customer] = []
    # Where the tower's operators are (their workstations, the deploy controller, a bastion):
    # SSH on every tower host, and the monitor's Prometheus and pool API, answer only these
    # networks (and the monitor itself); the mirror answers the scanners only. Empty: SSH is
    # not restricted (a tower should list them; the lab lists its controller).
    operator_networks: list[IPv4Network] = []
    secrets: Secrets
    # Who reads the relay's postmaster mail (RFC 5321 makes it accept "postmaster" from anyone)
    # and Postfix's notices to it: a deliverable address, e.g. at a customer domain or the
    # operators' own. None: such mail is discarded (and logged) instead of sitting in the queue.
    postmaster: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    sql_database: str = "mailtower"
    clamd_socket: str = "/run/clamav/clamd.ctl"
    clamav_db_dir: str = "/var/lib/clamav"  # clamd's (and c-icap's) DatabaseDirectory
    # the "icap" engine's service, e.g. icap://127.0.0.1:1344/avscan (c-icap's virus_scan
    # in simple mode: it answers only once the whole message is scanned)
    icap_url: str | None = None
    spool_dir: str = "/var/spool/mailtower"  # event spool (and a directory quarantine)
    # Where scand quarantines (docs/quarantine.md): "sql", a row of the tower's verdict_events
    # on its SQL pair, committed before the relay's 250 (a deployed tower); "directory",
    # <spool_dir>/quarantine on the scanner's own disk (a standalone scand, the benchmarks).
    quarantine_store: Literal["sql", "directory"] = "sql"
    # Every customer's policy as scand's workers read it (mailtower.customers.snapshot),
    # written by scand from the tower's SQL, checked for changes every policy_poll_s (a change
    # reads the customers it touched); about every policy_full_reload_s (each scanner at its
    # own random point between half and one and a half of it) scand reads all of them again,
    # the safety net (the file is rewritten only if that finds a difference).
    policy_snapshot: str = "/var/lib/mailtower/policies.json"
    policy_poll_s: float = Field(default=1.0, gt=0, le=300)
    policy_full_reload_s: float = Field(default=300.0, gt=0, le=86400)
    # scand's rule data: a rules root where `mailtower bundle install` puts signed bundles
    # (e.g. /var/lib/mailtower/rules); until one is installed there, and when None, the rules
    # shipped in the package are used.
    rules_dir: str | None = None
    # The GOC: customers, domains, routes and policies come from it by logical replication,
    # verdict events go up to it. None: a tower on its own, its customers from ``customers``.
    goc: Goc | None = None
    # Rule updates from the GOC (needs ``goc`` or ``bundles.source``, ``rules_dir`` and
    # ``secrets.canary``); None: the scanners keep the rules they were deployed with.
    bundles: Bundles | None = None
    # Official ClamAV databases from the GOC's mirror (needs ``goc`` and ``secrets.canary``);
    # None: the scanners load only mailtower's own signatures and the rule bundles'.
    clamav: ClamavMirror | None = None
    # The monitor's quarantine manager (requests from the GOC's portal, expiry, notices).
    quarantine: QuarantineSettings = QuarantineSettings()
    # The relay's certificate chain and key (None: a self-signed one made on the relay).
    tls: RelayTls | None = None
    # pgBackRest backups of the SQL pair (stanza: the tower's name); None: none (a tower should
    # set one: docs/runbook.md "Backups and restore").
    backup: Backup | None = None
    # The GOC's backup repository host's node exporter (its GocSettings.backup_exporter_port),
    # scraped by this tower's monitor (job goc_backup) so the backup alerts cover stanza goc
    # too, with this tower's backup limits; one tower of the GOC sets it. None: not here.
    goc_backup_metrics: GocBackupMetrics | None = None
    # Alertmanager on the monitor mails every alert to the operators; None: alerts are only
    # seen in Prometheus (the deploy warns nobody).
    alerts: AlertSettings | None = None
    # Rolling upgrades of scand across the pool (docs/runbook.md, "Upgrades").
    upgrade: Upgrade = Upgrade()

    @model_validator(mode="after")
    def _notices_under_the_relay_rate(self) -> TowerSettings:
        rate = self.limits.client_message_rate
        if self.quarantine.notice_from and rate and self.quarantine.notices_per_minute >= rate:
            raise ValueError(
                f"quarantine.notices_per_minute ({self.quarantine.notices_per_minute}) must be "
                f"below limits.client_message_rate ({rate}): the relay counts the monitor's "
                "notices and would refuse the rest"
            )
        return self

    @model_validator(mode="after")
    def _alert_fallback_elsewhere(self) -> TowerSettings:
        fallback = self.alerts.fallback if self.alerts else None
        if fallback and fallback.host in (str(self.hosts.relay), self.hostname):
            raise ValueError(
                "alerts.fallback is this tower's own relay: give a smarthost that does not "
                "depend on the tower (the twin tower's relay, or the operators' SMTP server)"
            )
        return self

    @model_validator(mode="after")
    def _clamav_needs(self) -> TowerSettings:
        if self.clamav is not None and self.goc is None:
            raise ValueError("a tower taking the official ClamAV databases needs goc")
        return self

    @model_validator(mode="after")
    def _bundle_needs(self) -> TowerSettings:
        if self.bundles is None:
            return self
        missing = []
        if self.bundles.source is None and self.goc is None:
            missing.append("goc (or bundles.source)")
        if self.rules_dir is None:
            missing.append("rules_dir")
        if missing:
            raise ValueError(f"a tower taking rule bundles needs {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _full_reload_after_polls(self) -> TowerSettings:
        # Each scanner rereads everything after half to one and a half of the setting.
        if self.policy_full_reload_s / 2 <= self.policy_poll_s:
            raise ValueError(
                f"policy_full_reload_s ({self.policy_full_reload_s:g}) must be more than twice "
                f"policy_poll_s ({self.policy_poll_s:g}): the full reload, after half to one "
                "and a half of it, is the safety net behind the polls' delta loads"
            )
        return self

    @field_validator("policy_snapshot")
    @classmethod
    def _snapshot_path(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not path.is_absolute() or value.endswith("/") or path.name in ("", ".", ".."):
            raise ValueError(
                f"policy_snapshot {value!r} must be an absolute file path, "
                "e.g. /var/lib/mailtower/policies.json"
            )
        return value

    @property
    def policy_snapshot_dir(self) -> str:
        """The directory scand writes the policy snapshot in (renames need it writable)."""
        return str(PurePosixPath(self.policy_snapshot).parent)

    @property
    def bundle_source(self) -> str | None:
        """Where the monitor pulls bundles from (None: this tower takes none)."""
        if self.bundles is None:
            return None
        if self.bundles.source is not None:
            return self.bundles.source.rstrip("/")
        assert self.goc is not None  # _bundle_needs
        return f"http://{self.goc.address}:{self.goc.bundle_port}"

    def needed_secrets(self, holder: str = "tower") -> tuple[str, ...]:
        """The secrets ``holder`` (the whole tower, or one role) must have, with this tower's
        GOC and rule bundles."""
        every = ["sql_relay", "sql_scanner", "sql_monitor", "sql_replication"]
        if self.goc is not None:
            every += ["sql_sync", "goc_sync", "goc_status"]
        if self.bundles is not None or self.clamav is not None:
            every.append("canary")  # the monitor's windows: its requests and canaries
        if holder == "tower":
            return tuple(every)
        return tuple(n for n in ROLE_SECRETS[holder] if n in every)

    @model_validator(mode="after")
    def _secrets_held(self) -> TowerSettings:
        holder = self.secrets.held_by
        needed = self.needed_secrets(holder)
        missing = [f"secrets.{n}" for n in needed if getattr(self.secrets, n) is None]
        if missing:
            what = "this tower" if holder == "tower" else f"the {holder}' share of"
            if (
                holder == "tower"
                and self.goc is not None
                and any(
                    n in missing
                    for n in ("secrets.sql_sync", "secrets.goc_sync", "secrets.goc_status")
                )
            ):
                what = "a tower synced with a GOC"
            raise ValueError(f"{what} needs {', '.join(missing)}")
        if holder != "tower":
            extra = [
                n
                for n in SECRET_NAMES
                if n not in ROLE_SECRETS[holder] and getattr(self.secrets, n)
            ]
            if extra:
                raise ValueError(f"the {holder}' share of the secrets must not hold {extra}")
        return self

    def for_role(self, role: str) -> TowerSettings:
        """These settings with only ``role``'s share of the secrets (what its host gets)."""
        if role not in ROLE_SECRETS:
            raise SettingsError(f"no secret share for role {role!r} (known: {list(ROLE_SECRETS)})")
        share = {n: getattr(self.secrets, n) for n in self.needed_secrets(role)}
        return self.model_copy(update={"secrets": Secrets(held_by=role, **share)})  # type: ignore[arg-type]

    def alert_for(self, duration: str) -> str:
        """An alert rule's ``for:``: ``duration``, or ``alerts.for_max`` when that is shorter."""
        cap = self.alerts.for_max if self.alerts else None
        return cap if cap and duration_s(cap) < duration_s(duration) else duration

    def secret(self, name: str) -> str:
        """The secret ``name``; SettingsError if this copy of the settings does not hold it."""
        value = getattr(self.secrets, name, None)
        if not value:
            raise SettingsError(
                f"tower {self.name}: secrets.{name} is not in these settings "
                f"(held by: {self.secrets.held_by})"
            )
        return value

    @field_validator("customers")
    @classmethod
    def _no_duplicates(cls, value: list[Customer]) -> list[Customer]:
        seen: set[str] = set()
        for customer in value:
            if customer.domain in seen:
                raise ValueError(f"customer domain {customer.domain} is listed twice")
            seen.add(customer.domain)
        return value

    @model_validator(mode="after")
    def _engines_need(self) -> TowerSettings:
        if len(set(self.engines)) != len(self.engines):
            raise ValueError(f"engines lists an engine twice: {self.engines}")
        if "icap" in self.engines and self.icap_url is None:
            raise ValueError(
                "engines lists 'icap' but icap_url is not set; set icap_url (e.g. "
                f"{_ICAP_EXAMPLE_URL}) or remove 'icap'"
            )
        return self

    @field_validator("hostname")
    @classmethod
    def _dns_host_name(cls, value: str) -> str:
        # It goes into Postfix's config, the certificate, DNS records and the preflight's look-ups.
        if not _DOMAIN_RE.match(value):
            raise ValueError(
                f"{value!r} is not a DNS host name in lower case (e.g. mx.tower-a.example.net)"
            )
        return value

    @field_validator("icap_url")
    @classmethod
    def _valid_icap_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return str(parse_icap_url(value))  # raises ValueError saying how to write it

    @property
    def tower_addresses(self) -> list[IPv4Address]:
        """Every host of the tower: relay, monitor, SQL pair, scanners."""
        h = self.hosts
        return [h.relay, h.monitor, *h.sql, *h.scanners]

    @property
    def sql_primary(self) -> IPv4Address:
        return self.hosts.sql[0]

    @property
    def sql_standby(self) -> IPv4Address:
        return self.hosts.sql[1]

    @model_validator(mode="after")
    def _goc_backup_metrics_need_backup(self) -> TowerSettings:
        if self.goc_backup_metrics is not None and self.backup is None:
            raise ValueError(
                "goc_backup_metrics needs backup: the backup alerts (and their limits) are"
                " rendered from it; set backup, or scrape the GOC's repository from a tower"
                " that has it"
            )
        return self

    @model_validator(mode="after")
    def _backup_repo_is_the_monitor(self) -> TowerSettings:
        # Only the monitor's role sets a repository up (roles/monitor.py): until a
        # repository group exists, another host would be named in every pgbackrest.conf and
        # never deployed. A SQL host would also lose its backups with itself.
        repo = self.backup.repo_host if self.backup else None
        if repo is not None and repo != self.hosts.monitor:
            where = (
                " (a SQL host: its backups would be lost with it)" if repo in self.hosts.sql else ""
            )
            raise ValueError(
                f"backup.repo_host {repo} is not the monitor {self.hosts.monitor}{where}: only"
                " the monitor is deployed as a tower's repository host; leave backup.repo_host"
                " unset (the monitor)"
            )
        return self

    @property
    def backup_repo(self) -> IPv4Address | None:
        """The pgBackRest repository host: the one given, else the monitor (None: no backups)."""
        if self.backup is None:
            return None
        return self.backup.repo_host or self.hosts.monitor

    @property
    def mirror_url(self) -> str:
        return f"http://{self.hosts.monitor}:{self.ports.mirror_http}"

    @property
    def rules_mirror_url(self) -> str:
        """The monitor's copy of the bundles it verified, for its scanners."""
        return f"{self.mirror_url}/rules"

    def goc_conninfo(self, user: str, password: str) -> str:
        """The GOC's database as this tower reaches it (one host: see mailtower.goc.sync)."""
        if self.goc is None:
            raise SettingsError(f"tower {self.name} has no GOC in its settings")
        return conninfo(
            host=str(self.goc.address),
            port=self.goc.port,
            dbname=self.goc.database,
            user=user,
            password=password,
            connect_timeout=5,
        )

    def scanner_name(self, index: int) -> str:
        """HAProxy server name of the scanner at position ``index`` (0-based)."""
        return f"s{index + 1:02d}"

    def sql_dsn(self, user: str, password: str, *, writable: bool = False) -> str:
        """A libpq DSN naming both SQL hosts, so either can answer."""
        hosts = ",".join(str(ip) for ip in self.hosts.sql)
        attrs = "read-write" if writable else "any"
        return conninfo(
            host=hosts,
            port=self.ports.postgres,
            dbname=self.sql_database,
            user=user,
            password=password,
            target_session_attrs=attrs,
            connect_timeout=3,
            # A server that vanished mid-query (powered off, cut off) is noticed within about
            # 10 s, not after TCP's ~15 minutes of retransmissions: statement_timeout is the
            # server's and cannot fire then (a scanner's quarantine INSERT, a poll).
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            tcp_user_timeout=10000,
        )


def conninfo(**params: str | int) -> str:
    """A libpq connection string; a value with spaces, quotes or backslashes (a password) is
    quoted as libpq reads it, any other is written as is."""
    from psycopg.conninfo import make_conninfo

    return make_conninfo("", **params)


def load(path: Path = SETTINGS_PATH) -> TowerSettings:
    """Load the settings a deploy wrote; raise SettingsError naming what is wrong."""
    try:
        return TowerSettings.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise SettingsError(f"{path}: not found; deploy the tower first") from exc
    except (ValueError, ValidationError) as exc:
        raise SettingsError(f"{path}: invalid tower settings: {exc}") from exc


def from_data(data: dict) -> TowerSettings:
    """Build settings from inventory data; raise SettingsError naming the bad field."""
    return validate(TowerSettings, data, "tower settings in the inventory")


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: object, what: str) -> M:
    """``data`` as ``model``; SettingsError listing each bad field (``what`` says whose)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise SettingsError(f"invalid {what}:\n" + "\n".join(lines)) from exc


# --- The hosts beside the towers: the GOC, the authoritative DNS server, the lab's sender ----
# Each role validates its host data into one of these when it starts (roles._common.
# host_settings) and renders its templates from it.

# A DNS name of one or more labels (a zone may be a single label, e.g. the lab's "lab").
_DNS_NAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
# VirusEye's operator names (mailtower.goc.eye.auth.USERNAME): the deploy writes them into its
# credentials file, which refuses any other.
_OPERATOR_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# A name for a certificate: it goes into an openssl command line.
_TLS_NAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9.:-]*[A-Za-z0-9])?$")
EYE_PORT = 8025
# Where the deploy puts VirusEye's certificate when it makes it (GocSettings.eye_tls_self_signed)
# or is given it as PEM text (eye_tls_cert/eye_tls_key).
EYE_TLS_CERT = "/etc/mailtower/eye/tls.crt"
EYE_TLS_KEY = "/etc/mailtower/eye/tls.key"
# A TLS proxy's public origin, as VirusEye's --origin takes it (its CSRF check compares it).
_HTTPS_ORIGIN_RE = re.compile(r"^https://[A-Za-z0-9.:\[\]-]+$")


def _dns_name(value: str) -> str:
    value = value.strip().rstrip(".").lower()
    if not _DNS_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a DNS name (e.g. example.com)")
    return value


def _is_ip(value: str) -> bool:
    try:
        ip_address(value)
    except ValueError:
        return False
    return True


def _is_pem(value: str | None) -> bool:
    """PEM text rather than a path (no path starts with a PEM header)."""
    return value is not None and value.lstrip().startswith("-----BEGIN ")


def _check_tls_pair(cert_pem: str, key_pem: str) -> None:
    """A certificate (chain) and a key given as PEM text load and are one pair: ValueError if
    not. cryptography is imported here, not at the top: only a GOC's deploy with PEM text pays
    for it, never a daemon loading its settings (as BundleKeys does)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificates(cert_pem.encode())[0]
        key = serialization.load_pem_private_key(key_pem.encode(), None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM certificate and an unencrypted key: {exc}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError("eye_tls_key is not the key of eye_tls_cert (its first certificate)")


DnsName = Annotated[str, AfterValidator(_dns_name)]
Password = Annotated[str, Field(min_length=16)]
OperatorName = Annotated[str, Field(pattern=_OPERATOR_RE.pattern)]
# As VirusEye's own `operator add` asks (and at most what its login form takes).
OperatorPassword = Annotated[str, Field(min_length=12, max_length=1024)]


class DnsUpdateKey(StrictModel):
    """The TSIG key RFC 2136 updates (and zone transfers) must be signed with, as
    ``tsig-keygen`` makes it (mailtower.controller.dns.server.TsigKey signs with it)."""

    name: DnsName
    algorithm: Literal["hmac-sha256", "hmac-sha384", "hmac-sha512"] = "hmac-sha256"
    secret: str = Field(repr=False)  # base64

    @field_validator("secret")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            if not base64.b64decode(value, validate=True):
                raise ValueError("empty")
        except (binascii.Error, ValueError):
            raise ValueError(
                "the secret must be base64 (make a key with tsig-keygen -a hmac-sha256 NAME)"
            ) from None
        return value


class DnsServer(StrictModel):
    """An authoritative DNS server (roles/dns.py): the ``dns`` host data."""

    zones: list[DnsName] = Field(min_length=1)  # dynamic zones, seeded with SOA and NS once
    ns_name: DnsName  # the server's own name: every zone's SOA and NS
    ns_address: IPv4Address  # where it listens (and the glue, when ns_name is in the zone)
    update_from: IPv4Address  # the only address updates and transfers are taken from
    tsig: DnsUpdateKey

    @field_validator("zones")
    @classmethod
    def _zones_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a zone is listed twice: {value}")
        return value


class LabSender(StrictModel):
    """The lab's internet MTA (roles/lab_sender.py): the ``sender`` host data."""

    domain: DnsName  # its mail comes from this domain
    resolver: IPv4Address  # the DNS server it finds the towers' MX records with
    submit_from: IPv4Address  # the one address (the controller) it relays for
    # PEM of the CA it trusts: with it, it verifies every server it delivers to (the MX
    # name must be in the certificate, smtp_tls_security_level = verify); None: TLS if offered.
    tls_ca: str | None = None
    # Its retry timers, shortened so the lab sees deferred mail retried in seconds.
    queue_run_delay: Duration = "10s"
    minimal_backoff: Duration = "10s"
    maximal_backoff: Duration = "30s"


class SyncedTower(StrictModel):
    """A tower the GOC syncs with (its config subscription, its events publication)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")  # its TowerSettings.name
    sql: list[IPv4Address] = Field(min_length=1, max_length=2)  # its SQL pair
    monitor: IPv4Address  # reports the tower's state (mt_status_<tower>) and pulls rule bundles


class SyncedTowerSecrets(StrictModel):
    """One tower's own passwords at the GOC, exactly as that tower's settings hold them
    (``Secrets.sql_sync``, ``goc_sync``, ``goc_status``)."""

    sql_sync: Password = Field(repr=False)  # its mt_sync, which the GOC's events subscription uses
    # Its own roles at the GOC: mt_sync_<tower> (its config subscription) and mt_status_<tower>
    # (its monitor, which row-level security lets write only its own tower_status row).
    goc_sync: Password = Field(repr=False)
    goc_status: Password = Field(repr=False)


# Where an operator moving a GOC off the shared roles finds how (its section on secrets).
_SECRETS_RUNBOOK = "docs/runbook.md, 'Secrets'"


class GocSecrets(StrictModel):
    """The GOC's passwords (kept out of the repository): VirusEye's, and each tower's own.

    No two towers share a password, and none is VirusEye's: a tower's hosts hold its own, and
    must not hold what logs in as another tower (or reads every tower's events)."""

    eye_db: Password = Field(repr=False)  # mt_eye: VirusEye reads the hub
    towers: dict[str, SyncedTowerSecrets] = {}  # tower name → its own passwords
    # --- the quarantine portal (issue 18; GocSettings.portal) -------------------------------
    # mt_portal's password, and the key that signs the portal's sign-in forms' CSRF tokens;
    # both needed when ``portal`` is set (GocSettings checks), neither another's.
    portal_db: Password | None = Field(None, repr=False)
    portal_session_key: str | None = Field(None, min_length=32, repr=False)
    # --- end of the quarantine portal's secrets ---------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _not_shared_roles(cls, data: object) -> object:
        # The form from before each tower had its own: one mt_sync and one mt_status for all.
        if not isinstance(data, dict):
            return data
        shared = [f"secrets.{n}" for n in ("sync", "status") if n in data]
        if shared:
            raise ValueError(
                f"{' and '.join(shared)}: towers no longer share the GOC's roles; give each"
                " tower its own in secrets.towers.<name>.goc_sync and .goc_status (and"
                f" .sql_sync), as that tower's settings hold them ({_SECRETS_RUNBOOK})"
            )
        return data

    @field_validator("towers", mode="before")
    @classmethod
    def _one_set_per_tower(cls, towers: object) -> object:
        if isinstance(towers, dict):
            single = sorted(str(name) for name, own in towers.items() if isinstance(own, str))
            if single:
                raise ValueError(
                    f"{', '.join(single)}: a tower's own {{sql_sync, goc_sync, goc_status}}, not"
                    f" one password ({_SECRETS_RUNBOOK})"
                )
        return towers

    @field_validator("towers")
    @classmethod
    def _each_its_own(
        cls, towers: dict[str, SyncedTowerSecrets], info: ValidationInfo
    ) -> dict[str, SyncedTowerSecrets]:
        seen: dict[str, str] = {}
        eye_db = info.data.get("eye_db")  # validated before (declared first)
        if eye_db is not None:
            seen[eye_db] = "VirusEye (eye_db)"
        for name, own in towers.items():
            for key in SyncedTowerSecrets.model_fields:
                password = getattr(own, key)
                if seen.get(password, name) != name:
                    raise ValueError(
                        f"{name}.{key}: {name} and {seen[password]} share a password; each"
                        f" tower must have its own ({_SECRETS_RUNBOOK})"
                    )
                seen[password] = name
        return towers


# What a GOC's secrets file holds (the deploy's copy): GocSecrets' own passwords, and
# VirusEye's operator password (the web sign-in, GocSettings.eye).
GOC_SECRET_NAMES = ("eye_db", "eye_operator", "portal_db", "portal_session_key")


class BundleKeys(StrictModel):
    """The rule-bundle key pair the GOC signs with (PEM, as ``mailtower bundle keygen`` writes
    it), and the port it serves the published bundles on."""

    signing_key: str = Field(repr=False)  # PKCS#8, secret: it never leaves the GOC
    public_key: str  # every tower holds the same one (TowerSettings.bundles.public_key)
    port: int = Field(Goc.model_fields["bundle_port"].default, ge=1, le=65535)

    @model_validator(mode="after")
    def _one_pair(self) -> BundleKeys:
        """Both keys load and are one pair (a mismatch would make every tower refuse)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (
            Ed25519PrivateKey,
            Ed25519PublicKey,
        )

        try:
            private = serialization.load_pem_private_key(self.signing_key.encode(), None)
            public = serialization.load_pem_public_key(self.public_key.encode())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"a key is not PEM: {exc}") from exc
        if not isinstance(private, Ed25519PrivateKey) or not isinstance(public, Ed25519PublicKey):
            raise ValueError("signing_key and public_key must be Ed25519 keys")
        raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if private.public_key().public_bytes(*raw) != public.public_bytes(*raw):
            raise ValueError(
                "public_key is not the public half of signing_key (make the pair together: "
                "mailtower bundle keygen)"
            )
        return self


_FEED_RESERVED = {"enabled", "local_directory", "db_url", "on_update_exec", "log_method"}


class ClamavFeed(StrictModel):
    """A third-party signature feed fetched by Fangfrisch at the GOC (each off by default)."""

    name: Annotated[str, Field(pattern=_DB_NAME)]  # Fangfrisch's section: sanesecurity, urlhaus…
    enabled: bool = False
    # Fangfrisch's options of that section (prefix, auth_key, customer_id, url_…, …)
    options: dict[Annotated[str, Field(pattern=r"^!?[a-z][a-z0-9_]*$")], str] = {}

    @field_validator("options")
    @classmethod
    def _options(cls, options: dict[str, str]) -> dict[str, str]:
        for key, value in options.items():
            if key in _FEED_RESERVED:
                raise ValueError(f"{key} is set by mailtower (the feed's enabled, its directory)")
            if "\n" in value or "\r" in value:
                raise ValueError(f"{key}: one line only")
            # a file name, never a path: Fangfrisch writes it into the feed's own directory
            if key.startswith("filename_") and not re.fullmatch(r"[A-Za-z0-9][\w.-]*", value):
                raise ValueError(f"{key}: {value!r} is not a plain file name")
        return options


class ClamavUpstream(StrictModel):
    """The GOC's mirror of ClamAV's official databases (cvdupdate), served to the monitors."""

    # name → field of the current.cvd.clamav.net TXT record with its version (0: by HTTP header)
    databases: dict[Annotated[str, Field(pattern=_DB_NAME)], int] = Field(
        {"main": 1, "daily": 2, "bytecode": 7}, min_length=1
    )
    url: str = Field("https://database.clamav.net", pattern=r"^https?://[^/\s]+(/[^\s]*)?$")
    nameserver: str = ""  # cvdupdate's resolvers for the TXT record, comma-separated ("": system)
    check_interval: Duration = "1h"  # ClamAV asks mirrors not to check more often
    feeds: list[ClamavFeed] = []

    @model_validator(mode="after")
    def _mirror_rules(self) -> ClamavUpstream:
        if not self.check_interval.strip()[-1:].isalpha():
            raise ValueError("check_interval needs a unit (s, m, h, d): e.g. 1h")
        if "database.clamav.net" in self.url and duration_s(self.check_interval) < 3600:
            raise ValueError(
                f"check_interval {self.check_interval} is more often than ClamAV's mirror rules "
                "allow for database.clamav.net (at most once an hour): use 1h or more"
            )
        return self


# --- The quarantine portal (issue 18): roles/goc.py deploys it when GocSettings.portal is set;
# mailtower.goc.portal serves it. Its secrets: GocSecrets.portal_db, .portal_session_key. ---
PORTAL_PORT = 8027  # beside VirusEye (8025) and the bundles (Goc.bundle_port, 8026)
# Where the deploy puts the portal's self-signed certificate (PortalSettings.tls_self_signed).
PORTAL_TLS_CERT = "/etc/mailtower/portal/tls.crt"
PORTAL_TLS_KEY = "/etc/mailtower/portal/tls.key"


class PortalSettings(StrictModel):
    """The customers' quarantine portal at the GOC (``mailtower-portal``): HTTPS only, like
    VirusEye: its own certificate (paths on the GOC), one the deploy makes, or a TLS proxy."""

    listen: str = Field(
        f"127.0.0.1:{PORTAL_PORT}", pattern=r"^(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"
    )
    # The URL sign-in links point at (what users' browsers reach), e.g. https://portal.example
    public_url: str = Field(pattern=r"^https://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/-]*)?$")
    mail_from: str = Field(pattern=r"^[^@\s<>]+@[A-Za-z0-9.-]+$")  # the links' From
    # Where sign-in links are submitted (HOST or HOST:PORT, port 25 by default): in the lab,
    # the towers' relays, so the mail is scanned and routed as any customer mail.
    relays: list[str] = Field(min_length=1, max_length=20)
    session_hours: float = Field(8.0, gt=0, le=24)
    idle_minutes: float = Field(30.0, gt=0, le=24 * 60)
    tls_cert: str | None = None  # paths on the GOC host, the key readable by mailtower
    tls_key: str | None = Field(None, repr=False)
    tls_self_signed: list[str] = Field([], max_length=20)  # names the deploy makes one for
    origin: str | None = Field(None, pattern=_HTTPS_ORIGIN_RE.pattern)  # a TLS proxy in front

    @field_validator("relays")
    @classmethod
    def _relays(cls, relays: list[str]) -> list[str]:
        for relay in relays:
            host, sep, port = relay.rpartition(":")
            name = host if sep else relay
            if not (_is_ip(name) or _TLS_NAME_RE.match(name)) or (sep and not port.isdigit()):
                raise ValueError(f"relays: {relay!r} is not HOST or HOST:PORT")
        return relays

    @field_validator("tls_self_signed")
    @classmethod
    def _tls_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not (_is_ip(name) or _TLS_NAME_RE.match(name)):
                raise ValueError(f"tls_self_signed: {name!r} is not a DNS name or an address")
        return names

    @model_validator(mode="after")
    def _one_tls(self) -> PortalSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("portal: tls_cert and tls_key go together")
        given = [bool(self.tls_cert), bool(self.tls_self_signed), bool(self.origin)]
        if sum(given) != 1:
            raise ValueError(
                "portal: HTTPS only: give exactly one of tls_cert + tls_key, "
                "tls_self_signed: [names] or origin (a TLS proxy on the GOC host)"
            )
        if self.origin:
            host = self.listen.rpartition(":")[0].strip("[]")
            if not (_is_ip(host) and ip_address(host).is_loopback):
                raise ValueError(f"portal: origin: listen {self.listen} must be loopback")
        return self

    def tls(self) -> tuple[str, str] | None:
        """The certificate and key it serves HTTPS with; None: behind a TLS proxy."""
        if self.tls_self_signed:
            return PORTAL_TLS_CERT, PORTAL_TLS_KEY
        if self.tls_cert and self.tls_key:
            return self.tls_cert, self.tls_key
        return None


# --- end of the quarantine portal's settings -------------------------------------------------


class GocSettings(StrictModel):
    """The global operations centre (roles/goc.py): the ``goc`` host data."""

    database: str = "goc"
    port: int = 5432
    towers: list[SyncedTower] = []
    customers: list[Customer] = []  # loaded at the GOC (operators add more there)
    operators: dict[OperatorName, OperatorPassword] = {}  # who may log in to VirusEye
    secrets: GocSecrets
    eye_listen: str = f"127.0.0.1:{EYE_PORT}"
    # VirusEye serves HTTPS only (its session cookie Secure, HSTS); exactly one of three is
    # needed: the operator's certificate chain and key, both paths on the GOC host (the key
    # readable by the mailtower user) or both the PEM text itself (checked to be one pair; the
    # deploy writes them to EYE_TLS_CERT and EYE_TLS_KEY, the key 0600)…
    eye_tls_cert: str | None = None
    eye_tls_key: str | None = Field(None, repr=False)
    # …or a self-signed certificate the deploy makes for these DNS names and addresses
    # (once, and again when the list changes); browsers must be told to trust it…
    eye_tls_self_signed: list[str] = Field([], max_length=20)
    # …or a TLS proxy on the GOC host in front of it: its public origin (https://NAME), with
    # eye_listen on a loopback address.
    eye_origin: str | None = Field(None, pattern=_HTTPS_ORIGIN_RE.pattern)
    # Rule bundles: the GOC serves what is published in /srv/mailtower/bundles
    # (``mailtower bundle publish``) to every tower's monitor, 127.0.0.1 and bundle_readers.
    bundles: BundleKeys | None = None
    # The official ClamAV databases: cvdupdate mirrors them here for every tower's monitor
    # (served beside the bundles, /clamav/); None: the GOC fetches no signatures.
    clamav: ClamavUpstream | None = None
    # Who else may fetch bundles (the lab's controller, to check what was published).
    bundle_readers: list[IPv4Address] = []
    # The customers' quarantine portal (issue 18); None: not served here.
    portal: PortalSettings | None = None
    # pgBackRest backups of the GOC's PostgreSQL (stanza "goc") to ``backup.repo_host``, a
    # host that is not the GOC, in the inventory's goc_backup group (docs/runbook.md "The
    # GOC's backups"); None: none.
    backup: Backup | None = None
    # The repository host's node exporter (its backup metrics' textfile), on its
    # backup.repo_host address, for the tower monitor that scrapes it (goc_backup_metrics);
    # keep it to that monitor at the network's edge (the repository host has no firewall of
    # mailtower's).
    backup_exporter_port: int = Field(9100, ge=1, le=65535)

    @model_validator(mode="after")
    def _backup_repo(self) -> GocSettings:
        if self.backup is not None and self.backup.repo_host is None:
            raise ValueError("backup.repo_host: a GOC names its repository host (not itself)")
        return self

    @model_validator(mode="after")
    def _portal_secrets(self) -> GocSettings:
        if self.portal is None:
            return self
        missing = [
            f"secrets.{k}"
            for k in ("portal_db", "portal_session_key")
            if not getattr(self.secrets, k)
        ]
        if missing:
            raise ValueError(f"portal: {' and '.join(missing)} needed (docs/runbook.md)")
        taken = {self.secrets.eye_db} | {
            p for t in self.secrets.towers.values() for p in t.model_dump().values()
        }
        if self.secrets.portal_db in taken:
            raise ValueError("secrets.portal_db: the portal's own password, shared with no role")
        port = self.portal.listen.rpartition(":")[2]
        served = {self.eye_listen.rpartition(":")[2]: "eye_listen"}
        served[
            str(self.bundles.port if self.bundles else Goc.model_fields["bundle_port"].default)
        ] = "the bundles' port"
        if port in served:
            raise ValueError(f"portal.listen: port {port} is {served[port]}'s already")
        return self

    @field_validator("eye_tls_self_signed")
    @classmethod
    def _tls_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not (_is_ip(name) or _TLS_NAME_RE.match(name)):
                raise ValueError(f"eye_tls_self_signed: {name!r} is not a DNS name or an address")
        return names

    @field_validator("eye_tls_key")
    @classmethod
    def _tls_pair(cls, key: str | None, info: ValidationInfo) -> str | None:
        # Validated after eye_tls_cert (declared first), so a mismatch is reported at this field.
        cert = info.data.get("eye_tls_cert")
        if not (cert and key):
            return key
        if _is_pem(cert) != _is_pem(key):
            raise ValueError(
                "eye_tls_cert and eye_tls_key are both paths on the GOC or both PEM text"
            )
        if _is_pem(cert):
            _check_tls_pair(cert, key)
        return key

    @field_validator("towers")
    @classmethod
    def _towers_once(cls, towers: list[SyncedTower]) -> list[SyncedTower]:
        names = [t.name for t in towers]
        if len(set(names)) != len(names):
            raise ValueError(f"a tower is listed twice: {names}")
        return towers

    @model_validator(mode="after")
    def _one_tls(self) -> GocSettings:
        if bool(self.eye_tls_cert) != bool(self.eye_tls_key):
            raise ValueError("eye_tls_cert and eye_tls_key go together")
        given = [bool(self.eye_tls_cert), bool(self.eye_tls_self_signed), bool(self.eye_origin)]
        if sum(given) != 1:
            raise ValueError(
                "VirusEye serves HTTPS only: give exactly one of eye_tls_cert + eye_tls_key "
                "(paths on the GOC or PEM text), eye_tls_self_signed: [names] or eye_origin "
                "(a TLS proxy on the GOC host)"
            )
        if self.eye_origin:
            host = self.eye_listen.rpartition(":")[0].strip("[]")
            if not (_is_ip(host) and ip_address(host).is_loopback):
                raise ValueError(f"eye_origin: eye_listen {self.eye_listen} must be loopback")
        return self

    @model_validator(mode="after")
    def _tower_passwords(self) -> GocSettings:
        missing = [
            f"secrets.towers.{t.name}" for t in self.towers if t.name not in self.secrets.towers
        ]
        if missing:
            raise ValueError(
                f"each tower's own passwords are needed: {', '.join(missing)}:"
                f" {{{', '.join(SyncedTowerSecrets.model_fields)}}}, as that tower's settings"
                " hold them"
            )
        return self

    def eye_tls(self) -> tuple[str, str] | None:
        """The certificate and key VirusEye serves HTTPS with; None: behind a TLS proxy."""
        if self.eye_tls_self_signed or self.eye_tls_pem():
            return EYE_TLS_CERT, EYE_TLS_KEY
        if self.eye_tls_cert and self.eye_tls_key:
            return self.eye_tls_cert, self.eye_tls_key
        return None

    def eye_tls_pem(self) -> tuple[str, str] | None:
        """The certificate and key given as PEM text, for the deploy to write; None: not so."""
        if self.eye_tls_cert and self.eye_tls_key and _is_pem(self.eye_tls_cert):
            return self.eye_tls_cert, self.eye_tls_key
        return None
