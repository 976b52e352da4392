-- VirusEye's objects in the GOC hub database (mailtower.eye.status.apply_schema applies it;
-- idempotent). verdict_events itself belongs to the hub's schema (mailtower.sync) and must
-- exist first. Names are schema-qualified, as the hub's own DDL is.

-- One row per tower, upserted by the tower's monitor (mailtower.eye.status.upsert_tower_status).
-- The same table can live on a tower's primary and ride the events publication up to the GOC.
CREATE TABLE IF NOT EXISTS public.tower_status (
    tower             text PRIMARY KEY,
    scanners_up       integer NOT NULL CHECK (scanners_up >= 0),
    scanners_total    integer NOT NULL CHECK (scanners_total >= 0),
    queue_size        integer NOT NULL CHECK (queue_size >= 0),
    replication_lag_s real,  -- NULL: the tower could not measure it (no standby streaming)
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Virus events are a small slice of all events: VirusEye's window queries read this partial
-- index instead of every clean message of the day.
CREATE INDEX IF NOT EXISTS verdict_events_virus_at
    ON public.verdict_events (scanned_at) WHERE verdict = 'virus';
-- "First seen" of an outbreak is the oldest event under its name, ever: one index probe per
-- name. The expression must stay identical to mailtower.eye.queries.OUTBREAK_NAME.
CREATE INDEX IF NOT EXISTS verdict_events_virus_name
    ON public.verdict_events ((findings -> 0 ->> 'name'), scanned_at) WHERE verdict = 'virus';
