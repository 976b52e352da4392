"""The GOC's tables: the tower's configuration tables (the GOC is their source of truth) and
the union of every tower's ``verdict_events``.

The shared tables have the tower's shape (templates/sql/etc/mailtower/sql/schema.sql.j2;
tests/unit/test_sync_schema.py compares the two column by column), because logical
replication matches columns by name. The GOC adds, without touching what is replicated:

- ``verdict_events.received_at``: when the GOC stored the event (a subscriber may have extra
  columns; the apply worker fills their defaults). The tower's subscribed tables have one of
  their own the same way (``TOWER_ONLY_COLUMNS``);
- an index on ``(tower, scanned_at)`` for per-tower queries and reconciliation counts;
- a ``BEFORE INSERT`` trigger, enabled ``ALWAYS`` so it also fires in the apply and
  table-copy workers, that skips an event whose ``event_id`` is already stored. Without it a
  duplicate (a scanner re-flushing after a failover an event the dead primary had already
  sent, a re-copy, a reconciliation overlap) is a unique violation that stops the tower's
  apply worker for good; with it the duplicate is dropped and the stream goes on;
- a second ``BEFORE INSERT`` trigger, also ``ALWAYS``, that **stamps the tower**: a row an
  apply or table-copy worker writes gets ``tower`` from the subscription that worker serves
  (``mt_events_<tower>``, looked up by the worker's pid in ``pg_stat_subscription``), whatever
  the row said, and ``received_at`` from the GOC's clock. A tower (or one of its scanners)
  therefore cannot store events under another tower's name. Each subscription applies into
  this one shared table (PostgreSQL 15 matches the publisher's schema-qualified table name and
  cannot map it elsewhere), so the subscription, which the GOC owns and names, is the only
  trustworthy source of the tower. Rows inserted outside a worker (reconciliation, which stamps
  them itself; the owner by hand) are taken as they are: no other role may insert here;
- ``BEFORE UPDATE`` and ``BEFORE DELETE`` row triggers and a ``BEFORE TRUNCATE`` statement
  trigger, all ``ALWAYS``, that **keep the events a tower already sent**. A tower publishes
  inserts only, but its primary's superuser can widen ``mt_events`` at any time (the GOC
  checks the publication only when it subscribes); its UPDATE would then relabel an event
  as another tower's, its DELETE remove any event whose id it knows, its TRUNCATE empty the
  whole table, every tower's rows included. In a replication worker an UPDATE or DELETE is
  skipped with a WARNING naming the subscription (the GOC's log shows it), and a TRUNCATE is
  an error: that tower's stream stops there (apply errors in ``sync_health``) until an
  operator skips the transaction, instead of the GOC losing every tower's events. Nothing
  legitimate updates, deletes or truncates through a subscription here: re-points and
  reconciliation insert, and a table copy (``copy_data``) only inserts. Outside a worker (an
  operator by hand) UPDATE, DELETE and TRUNCATE work as before.
"""

from __future__ import annotations

from dataclasses import dataclass

# Everything is schema-qualified: apply workers run with an empty search_path.
TABLES: dict[str, str] = {
    "customers": """
CREATE TABLE public.customers (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
)""",
    "domains": """
CREATE TABLE public.domains (
    name        text PRIMARY KEY CHECK (name = lower(name)),
    customer_id bigint NOT NULL REFERENCES public.customers(id) ON DELETE CASCADE,
    active      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
)""",
    "routes": """
CREATE TABLE public.routes (
    domain      text PRIMARY KEY REFERENCES public.domains(name) ON DELETE CASCADE,
    transport   text NOT NULL CHECK (transport ~ '^(smtp|lmtp):'),
    updated_at  timestamptz NOT NULL DEFAULT now()
)""",
    # One JSON policy per customer (mailtower.customers.policy: the fields that differ from
    # the default); no row: the default policy.
    "policies": """
CREATE TABLE public.policies (
    customer_id bigint PRIMARY KEY REFERENCES public.customers(id) ON DELETE CASCADE,
    policy      jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now()
)""",
    # The addresses a customer with recipient_check = list accepts (the relay's RCPT check).
    "recipients": """
CREATE TABLE public.recipients (
    address     text PRIMARY KEY CHECK (address = lower(address)),
    domain      text NOT NULL REFERENCES public.domains(name) ON DELETE CASCADE,
    updated_at  timestamptz NOT NULL DEFAULT now()
)""",
    "verdict_events": """
CREATE TABLE public.verdict_events (
    event_id      uuid PRIMARY KEY,
    tower         text NOT NULL,
    scanner       text NOT NULL,
    scanned_at    timestamptz NOT NULL,
    verdict       text NOT NULL
                  CHECK (verdict IN ('clean', 'virus', 'banned', 'suspicious', 'tempfail')),
    message_id    text,
    sender        text,
    recipients    text[] NOT NULL,
    findings      jsonb NOT NULL DEFAULT '[]',
    quarantine_id text,
    size_bytes    integer NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    customer_id   bigint,
    subject       text,
    expires_at    timestamptz,
    message       bytea,
    quarantine_meta jsonb NOT NULL DEFAULT '{}'
)""",
}

GOC_ONLY_COLUMNS = {"verdict_events": ("received_at",)}
# The tower's own columns in the tables it subscribes to: each row's stamp for the scanners'
# delta loads (schema.sql.j2, mailtower.customers.snapshot). Never replicated: the apply and
# table-copy workers fill them from their defaults and the tower's trigger sets them, so a
# copy from the GOC and a comparison with the GOC leave them out.
TOWER_ONLY_COLUMNS = {
    "customers": ("mt_gen",),
    "domains": ("mt_gen",),
    "policies": ("mt_gen",),
}

# Columns of an older shape, dropped by ensure_goc (nothing ever wrote them), and the columns
# it adds to a table made before them, with their definitions.
DROPPED_COLUMNS = {"policies": ("banned_extensions", "max_message_bytes", "encrypted_archives")}
ADDED_COLUMNS = {
    "policies": (("policy", "jsonb NOT NULL DEFAULT '{}'::jsonb"),),
    "verdict_events": (
        ("received_at", "timestamptz NOT NULL DEFAULT now()"),
        # the quarantine (docs/quarantine.md)
        ("customer_id", "bigint"),
        ("subject", "text"),
        ("expires_at", "timestamptz"),
        ("message", "bytea"),
        ("quarantine_meta", "jsonb NOT NULL DEFAULT '{}'"),
    ),
}


@dataclass(frozen=True)
class Index:
    name: str
    ddl: str


INDEXES = (
    Index("recipients_domain", "CREATE INDEX recipients_domain ON public.recipients (domain)"),
    Index(
        "verdict_events_scanned_at",
        "CREATE INDEX verdict_events_scanned_at ON public.verdict_events (scanned_at)",
    ),
    Index(
        "verdict_events_message_id",
        "CREATE INDEX verdict_events_message_id ON public.verdict_events (message_id)",
    ),
    Index(
        "verdict_events_tower_scanned_at",
        "CREATE INDEX verdict_events_tower_scanned_at ON public.verdict_events (tower, scanned_at)",
    ),
    # The quarantine (docs/quarantine.md): the portal's pages per customer and per recipient,
    # and the GOC's expiry.
    Index(
        "verdict_events_quarantine_customer",
        "CREATE INDEX verdict_events_quarantine_customer ON public.verdict_events"
        " (customer_id, scanned_at DESC, event_id) WHERE quarantine_id IS NOT NULL",
    ),
    Index(
        "verdict_events_quarantine_at",
        "CREATE INDEX verdict_events_quarantine_at ON public.verdict_events"
        " (scanned_at DESC, event_id) WHERE quarantine_id IS NOT NULL",
    ),
    Index(
        "verdict_events_quarantine_recipients",
        "CREATE INDEX verdict_events_quarantine_recipients ON public.verdict_events"
        " USING gin (recipients) WHERE quarantine_id IS NOT NULL",
    ),
    Index(
        "verdict_events_quarantine_expiry",
        "CREATE INDEX verdict_events_quarantine_expiry ON public.verdict_events (expires_at)"
        " WHERE message IS NOT NULL",
    ),
)

DEDUP_FUNCTION = "mt_skip_known_event"
DEDUP_TRIGGER = "verdict_events_skip_known"
# The body is compared with pg_proc.prosrc to decide whether it needs replacing.
DEDUP_BODY = """
BEGIN
    -- Already stored (re-copy, reconciliation, a re-flushed event): skip it, keep applying.
    IF EXISTS (SELECT 1 FROM public.verdict_events WHERE event_id = NEW.event_id) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
"""
DEDUP_FUNCTION_DDL = f"""
CREATE OR REPLACE FUNCTION public.{DEDUP_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $body${DEDUP_BODY}$body$"""
DEDUP_TRIGGER_DDL = (
    f"CREATE TRIGGER {DEDUP_TRIGGER} BEFORE INSERT ON public.verdict_events"
    f" FOR EACH ROW EXECUTE FUNCTION public.{DEDUP_FUNCTION}()"
)
# 'A': fires whatever session_replication_role is, i.e. in apply and table-sync workers too.
DEDUP_TRIGGER_ENABLE = f"ALTER TABLE public.verdict_events ENABLE ALWAYS TRIGGER {DEDUP_TRIGGER}"

STAMP_FUNCTION = "mt_stamp_event_tower"
STAMP_TRIGGER = "verdict_events_stamp_tower"
# Subscription names are names.events_subscription(tower): 'mt_events_' + the tower's name with
# '-' as '_' (tower names never hold '_', so this inverts it).
STAMP_BODY = """
DECLARE
    sub name;
BEGIN
    SELECT s.subname INTO sub FROM pg_catalog.pg_stat_subscription s
     WHERE s.pid = pg_catalog.pg_backend_pid() LIMIT 1;
    IF sub IS NULL THEN
        RETURN NEW;  -- not a replication worker: reconciliation stamps its rows itself
    END IF;
    IF sub !~ '^mt_events_[a-z][a-z0-9_]*$' THEN
        RAISE EXCEPTION 'verdict_events written by subscription %, which is no tower''s', sub;
    END IF;
    NEW.tower := pg_catalog.replace(pg_catalog.substr(sub, 11), '_', '-');
    NEW.received_at := pg_catalog.now();
    RETURN NEW;
END
"""
STAMP_FUNCTION_DDL = f"""
CREATE OR REPLACE FUNCTION public.{STAMP_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $body${STAMP_BODY}$body$"""
STAMP_TRIGGER_DDL = (
    f"CREATE TRIGGER {STAMP_TRIGGER} BEFORE INSERT ON public.verdict_events"
    f" FOR EACH ROW EXECUTE FUNCTION public.{STAMP_FUNCTION}()"
)
STAMP_TRIGGER_ENABLE = f"ALTER TABLE public.verdict_events ENABLE ALWAYS TRIGGER {STAMP_TRIGGER}"

# UPDATE and DELETE from a tower: only a widened publication sends them (towers publish
# inserts). Skipped, not an error: the tower's later inserts keep flowing.
KEEP_FUNCTION = "mt_keep_sent_event"
KEEP_UPDATE_TRIGGER = "verdict_events_keep_on_update"
KEEP_DELETE_TRIGGER = "verdict_events_keep_on_delete"
KEEP_BODY = """
DECLARE
    sub name;
BEGIN
    SELECT s.subname INTO sub FROM pg_catalog.pg_stat_subscription s
     WHERE s.pid = pg_catalog.pg_backend_pid() LIMIT 1;
    IF sub IS NULL THEN  -- an operator: as without the trigger
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
        RETURN NEW;
    END IF;
    RAISE WARNING 'verdict_events: % of event % from subscription % skipped: towers publish'
        ' inserts only (was its publication widened on a compromised primary?)',
        TG_OP, OLD.event_id, sub;
    RETURN NULL;
END
"""
KEEP_FUNCTION_DDL = f"""
CREATE OR REPLACE FUNCTION public.{KEEP_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $body${KEEP_BODY}$body$"""

# TRUNCATE cannot be skipped (a statement trigger's result is ignored): it is refused, which
# stops that tower's apply worker at this transaction; the other towers go on.
REFUSE_TRUNCATE_FUNCTION = "mt_refuse_replicated_truncate"
REFUSE_TRUNCATE_TRIGGER = "verdict_events_refuse_truncate"
REFUSE_TRUNCATE_BODY = """
DECLARE
    sub name;
BEGIN
    SELECT s.subname INTO sub FROM pg_catalog.pg_stat_subscription s
     WHERE s.pid = pg_catalog.pg_backend_pid() LIMIT 1;
    IF sub IS NOT NULL THEN
        RAISE EXCEPTION 'verdict_events: TRUNCATE from subscription % refused: towers publish'
            ' inserts only (was its publication widened on a compromised primary?)', sub
            USING HINT = 'narrow the tower''s publication (deploy it), then ALTER SUBSCRIPTION '
                || sub || ' SKIP (lsn = ...) with the finish LSN this error''s context names';
    END IF;
    RETURN NULL;
END
"""
REFUSE_TRUNCATE_FUNCTION_DDL = f"""
CREATE OR REPLACE FUNCTION public.{REFUSE_TRUNCATE_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $body${REFUSE_TRUNCATE_BODY}$body$"""


def _always(trigger: str) -> str:
    # 'A': fires whatever session_replication_role is, i.e. in apply and table-sync workers too.
    return f"ALTER TABLE public.verdict_events ENABLE ALWAYS TRIGGER {trigger}"


@dataclass(frozen=True)
class Trigger:
    """A trigger on verdict_events enabled ALWAYS (apply workers run as replicas)."""

    function: str
    body: str
    function_ddl: str
    name: str
    ddl: str
    enable: str


TRIGGERS = (
    Trigger(
        DEDUP_FUNCTION,
        DEDUP_BODY,
        DEDUP_FUNCTION_DDL,
        DEDUP_TRIGGER,
        DEDUP_TRIGGER_DDL,
        DEDUP_TRIGGER_ENABLE,
    ),
    Trigger(
        STAMP_FUNCTION,
        STAMP_BODY,
        STAMP_FUNCTION_DDL,
        STAMP_TRIGGER,
        STAMP_TRIGGER_DDL,
        STAMP_TRIGGER_ENABLE,
    ),
    Trigger(
        KEEP_FUNCTION,
        KEEP_BODY,
        KEEP_FUNCTION_DDL,
        KEEP_UPDATE_TRIGGER,
        f"CREATE TRIGGER {KEEP_UPDATE_TRIGGER} BEFORE UPDATE ON public.verdict_events"
        f" FOR EACH ROW EXECUTE FUNCTION public.{KEEP_FUNCTION}()",
        _always(KEEP_UPDATE_TRIGGER),
    ),
    Trigger(
        KEEP_FUNCTION,
        KEEP_BODY,
        KEEP_FUNCTION_DDL,
        KEEP_DELETE_TRIGGER,
        f"CREATE TRIGGER {KEEP_DELETE_TRIGGER} BEFORE DELETE ON public.verdict_events"
        f" FOR EACH ROW EXECUTE FUNCTION public.{KEEP_FUNCTION}()",
        _always(KEEP_DELETE_TRIGGER),
    ),
    Trigger(
        REFUSE_TRUNCATE_FUNCTION,
        REFUSE_TRUNCATE_BODY,
        REFUSE_TRUNCATE_FUNCTION_DDL,
        REFUSE_TRUNCATE_TRIGGER,
        f"CREATE TRIGGER {REFUSE_TRUNCATE_TRIGGER} BEFORE TRUNCATE ON public.verdict_events"
        f" FOR EACH STATEMENT EXECUTE FUNCTION public.{REFUSE_TRUNCATE_FUNCTION}()",
        _always(REFUSE_TRUNCATE_TRIGGER),
    ),
)
