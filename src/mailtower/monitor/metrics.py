"""The monitor's Prometheus metrics, in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from mailtower.monitor.pool import MAINT, READY, Pool


class MonitorMetrics:
    """Every metric the monitor exports."""

    def __init__(
        self,
        pool: Pool,
        *,
        goc: bool = False,
        bundles: bool = False,
        clamav: list[str] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.scanner_up = Gauge(
            "mailtower_scanner_up",
            "1 if the scanner's last health probe answered 200",
            ["scanner", "address"],
            registry=r,
        )
        self.scanner_enabled = Gauge(
            "mailtower_scanner_enabled",
            "1 if the monitor set the scanner ready in HAProxy, 0 if in maintenance",
            ["scanner"],
            registry=r,
        )
        self.transitions = Counter(
            "mailtower_scanner_transitions",
            "Scanners put in maintenance (to=maint) or set ready (to=ready) by the monitor",
            ["scanner", "to"],
            registry=r,
        )
        self.haproxy_errors = Counter(
            "mailtower_haproxy_errors",
            "Failed calls to the relay's HAProxy runtime API",
            registry=r,
        )
        self.sql_lag = Gauge(
            "mailtower_sql_replication_lag_seconds",
            "Largest replay lag of the standbys of the SQL primary",
            registry=r,
        )
        self.sql_streaming = Gauge(
            "mailtower_sql_standbys_streaming",
            "Standbys streaming from the SQL primary",
            registry=r,
        )
        self.sql_up = Gauge(
            "mailtower_sql_up",
            "1 if the last replication query on the SQL primary succeeded",
            registry=r,
        )
        # The quarantine manager (mailtower.monitor.quarantine).
        self.quarantine_messages = Gauge(
            "mailtower_quarantine_messages",
            "Quarantined messages the tower holds (message not yet expired or deleted)",
            ["customer"],
            registry=r,
        )
        self.quarantine_bytes = Gauge(
            "mailtower_quarantine_bytes",
            "Bytes of the quarantined messages the tower holds",
            ["customer"],
            registry=r,
        )
        self.quarantine_actions = Counter(
            "mailtower_quarantine_actions",
            "Requests from the GOC's portal carried out, by action and result",
            ["action", "result"],
            registry=r,
        )
        self.quarantine_expired = Counter(
            "mailtower_quarantine_expired",
            "Quarantined messages dropped at their expiry",
            registry=r,
        )
        self.quarantine_notices = Counter(
            "mailtower_quarantine_notices",
            "Quarantine notices by result (sent, deferred: tried again, refused by the relay)",
            ["result"],
            registry=r,
        )
        self.quarantine_failures = Counter(
            "mailtower_quarantine_failures",
            "Passes of the quarantine manager that failed (GOC or tower SQL down, …), by pass",
            ["pass"],
            registry=r,
        )
        self.quarantine_pending = Gauge(
            "mailtower_quarantine_requests_pending",
            "The GOC's requests to this tower not done yet, at the last pass that read them",
            registry=r,
        )
        for name in ("actions", "expiry", "space", "notices"):
            self.quarantine_failures.labels(name)
        for result in ("sent", "deferred", "refused"):
            self.quarantine_notices.labels(result)
        if goc:  # a tower without a GOC has no report to fail: no series that says it does
            self.goc_status_up = Gauge(
                "mailtower_goc_status_up",
                "1 if the last report of the tower's state to the GOC succeeded, 0 if it failed",
                registry=r,
            )
            self.goc_status_last_success = Gauge(
                "mailtower_goc_status_last_success_timestamp_seconds",
                "Unix time of the last report of the tower's state to the GOC that succeeded",
                registry=r,
            )
            self.goc_status_failures = Counter(
                "mailtower_goc_status_failures",
                "Reports of the tower's state that the GOC did not take",
                registry=r,
            )
            self.goc_status_skipped = Counter(
                "mailtower_goc_status_skipped",
                "Reports not sent because the relay's queue size could not be read",
                registry=r,
            )
        if bundles:  # rule bundles from the GOC (mailtower.monitor.rollout)
            self.scanner_rules_bundle = Gauge(
                "mailtower_scanner_rules_bundle",
                "Rule bundle version the scanner's last health answer named (0: shipped rules)",
                ["scanner"],
                registry=r,
            )
            self.rules_target = Gauge(
                "mailtower_rules_target",
                "Rule bundle version the tower's mirror holds and rolls out (0: none yet)",
                registry=r,
            )
            self.rules_rejected = Gauge(
                "mailtower_rules_rejected_version",
                "Last rule bundle version rejected because it failed its canary (0: none)",
                registry=r,
            )
            self.rules_updates = Counter(
                "mailtower_rules_updates",
                "Scanner rule updates by result (ok, failed)",
                ["result"],
                registry=r,
            )
            self.rules_stuck = Gauge(
                "mailtower_rules_scanners_stuck",
                "Scanners kept out of service after an update: no rules a canary passed",
                registry=r,
            )
            self.rules_pull_failures = Counter(
                "mailtower_rules_pull_failures",
                "Failed reads of the GOC's bundles, and bundles the monitor refused",
                registry=r,
            )
            for result in ("ok", "failed"):
                self.rules_updates.labels(result)
            for s in pool.scanners:
                self.scanner_rules_bundle.labels(s.name).set(0)
        if clamav is not None:  # the official databases ``clamav`` (rollout/clamav.py)
            self._clamav(pool, clamav)
        # the rolling upgrade of scand (mailtower.monitor.rollout.stack)
        self.upgrade_restarts = Counter(
            "mailtower_upgrade_restarts",
            "Scanner restarts of a rolling upgrade by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self.upgrade_stuck = Gauge(
            "mailtower_upgrade_scanners_stuck",
            "Scanners kept out of service after failing a check of a rolling upgrade",
            registry=r,
        )
        for result in ("ok", "failed"):
            self.upgrade_restarts.labels(result)
        # Every series exists from the start, so rate() and absent() work before any event.
        for s in pool.scanners:
            self.scanner_up.labels(s.name, s.address).set(0)
            self.scanner_enabled.labels(s.name).set(1 if s.enabled else 0)
            for to in (MAINT, READY):
                self.transitions.labels(s.name, to)

    def _clamav(self, pool: Pool, databases: list[str]) -> None:
        r = self.registry
        self.clamav_mirror_version = Gauge(
            "mailtower_clamav_mirror_version",
            "Version of the ClamAV database the tower's mirror holds, verified (0: none)",
            ["db"],
            registry=r,
        )
        self.clamav_scanner_version = Gauge(
            "mailtower_clamav_scanner_version",
            "Version of the ClamAV database the scanner's last health answer named (0: none)",
            ["scanner", "db"],
            registry=r,
        )
        self.clamav_database_built = Gauge(
            "mailtower_clamav_database_built_timestamp_seconds",
            "When ClamAV built the version of the database the mirror holds (the CVD header's"
            " build time; time() minus this is the database's age)",
            ["db"],
            registry=r,
        )
        self.clamav_mirror_age = Gauge(
            "mailtower_clamav_mirror_age_seconds",
            "Since the GOC last checked the upstream successfully (its index's upstream.last_ok;"
            " +Inf: never, or no mirror here yet)",
            registry=r,
        )
        self.clamav_upstream_cooldown = Gauge(
            "mailtower_clamav_upstream_cooldown",
            "1 while the GOC waits out the upstream's cool-down (429/403, Retry-After)",
            registry=r,
        )
        self.clamav_upstream_refusals = Gauge(
            "mailtower_clamav_upstream_refusals",
            "Refusals of the GOC by the upstream, as the GOC's index reports them",
            registry=r,
        )
        self.clamav_behind = Gauge(
            "mailtower_clamav_behind_scanners",
            "Scanners in service that do not run the mirror's version of every database",
            registry=r,
        )
        self.clamav_rejected = Gauge(
            "mailtower_clamav_rejected",
            "1 while the mirror's set of databases is rejected (its canary failed on the first"
            " scanner): the scanners keep theirs",
            registry=r,
        )
        self.clamav_updates = Counter(
            "mailtower_clamav_updates",
            "Scanner ClamAV database updates by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self.clamav_stuck = Gauge(
            "mailtower_clamav_scanners_stuck",
            "Scanners kept out of service after a database update: nothing a canary passed",
            registry=r,
        )
        self.clamav_pull_failures = Counter(
            "mailtower_clamav_pull_failures",
            "Failed pulls of the GOC's ClamAV mirror (unreachable, or files refused here)",
            registry=r,
        )
        self.clamav_mirror_age.set(float("inf"))
        for result in ("ok", "failed"):
            self.clamav_updates.labels(result)
        for db in databases:
            self.clamav_mirror_version.labels(db).set(0)
            for s in pool.scanners:
                self.clamav_scanner_version.labels(s.name, db).set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
