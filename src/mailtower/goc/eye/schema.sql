-- VirusEye's objects in the GOC hub database (mailtower.goc.eye.status.apply_schema applies it;
-- idempotent). verdict_events itself belongs to the hub's schema (mailtower.goc.sync) and must
-- exist first. Names are schema-qualified, as the hub's own DDL is.

-- One row per tower, upserted by the tower's monitor (mailtower.goc.eye.status.upsert_tower_status).
-- The same table can live on a tower's primary and ride the events publication up to the GOC.
CREATE TABLE IF NOT EXISTS public.tower_status (
    tower             text PRIMARY KEY,
    scanners_up       integer NOT NULL CHECK (scanners_up >= 0),
    scanners_total    integer NOT NULL CHECK (scanners_total >= 0),
    queue_size        integer NOT NULL CHECK (queue_size >= 0),
    replication_lag_s real,  -- NULL: the tower could not measure it (no standby streaming)
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- Rule bundles (mailtower.bundles), added later: ADD COLUMN IF NOT EXISTS migrates a GOC made
-- before them. Table-level grants (mt_status, mt_eye) cover the new columns.
ALTER TABLE public.tower_status
    -- the oldest bundle version any in-service scanner runs; NULL: unknown or shipped rules
    ADD COLUMN IF NOT EXISTS rules_bundle integer CHECK (rules_bundle >= 1),
    -- the version the monitor's mirror holds: what every scanner should run
    ADD COLUMN IF NOT EXISTS rules_target integer CHECK (rules_target >= 1),
    -- in-service scanners running an older version than rules_target
    ADD COLUMN IF NOT EXISTS scanners_behind integer NOT NULL DEFAULT 0
        CHECK (scanners_behind >= 0);
-- The official ClamAV databases in the tower's mirror, added later still (issue 16): per
-- database its version, build time and scanners behind, and the GOC's last good check upstream
-- (mailtower.goc.eye.status.TowerStatus.clamav). NULL: the tower takes none.
ALTER TABLE public.tower_status
    ADD COLUMN IF NOT EXISTS clamav jsonb CHECK (jsonb_typeof(clamav) = 'object');

-- Virus events are a small slice of all events: VirusEye's window queries read this partial
-- index instead of every clean message of the day.
CREATE INDEX IF NOT EXISTS verdict_events_virus_at
    ON public.verdict_events (scanned_at) WHERE verdict = 'virus';
-- "First seen" of an outbreak is the oldest event under its name, ever: one index probe per
-- name. The expression must stay identical to mailtower.goc.eye.queries.OUTBREAK_NAME.
CREATE INDEX IF NOT EXISTS verdict_events_virus_name
    ON public.verdict_events ((findings -> 0 ->> 'name'), scanned_at) WHERE verdict = 'virus';

-- Logged-out VirusEye sessions (mailtower.goc.eye.revocations): a session id is kept until its
-- token would have expired anyway, so a restart of the web view does not bring a logged-out
-- cookie back. mt_eye may SELECT, INSERT and DELETE (mailtower.goc.sync.deployed).
CREATE TABLE IF NOT EXISTS public.eye_revoked_sessions (
    sid        text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
