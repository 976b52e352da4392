-- The customers' portal's own objects in the GOC hub database (mailtower.goc.portal.store
-- .apply_schema applies it as the database owner; idempotent). verdict_events belongs to the
-- hub's schema (mailtower.goc.sync) and must exist first. Names are schema-qualified.

-- Who signs in with a password: operators (every customer) and customers' admins (one).
-- Users (a recipient's own mail) have no row: they sign in by a link mailed to them.
CREATE TABLE IF NOT EXISTS public.portal_users (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9._-]{1,64}$'),
    role        text NOT NULL CHECK (role IN ('operator', 'admin')),
    customer_id bigint REFERENCES public.customers(id) ON DELETE CASCADE,
    password    text NOT NULL CHECK (password LIKE 'scrypt$%'),  -- scrypt, as VirusEye's
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((role = 'admin') = (customer_id IS NOT NULL))
);

-- Server-side sessions: the cookie holds a random id, the table only its SHA-256, so a copy of
-- the table signs nobody in. Expires when idle or at its absolute end, whichever comes first;
-- revoked by logout, a changed password or a removed user (ON DELETE CASCADE).
CREATE TABLE IF NOT EXISTS public.portal_sessions (
    id_hash      bytea PRIMARY KEY,
    role         text NOT NULL CHECK (role IN ('operator', 'admin', 'user')),
    name         text REFERENCES public.portal_users(name) ON DELETE CASCADE ON UPDATE CASCADE,
    customer_id  bigint,
    address      text,
    csrf         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,  -- absolute
    idle_s       integer NOT NULL CHECK (idle_s > 0),
    revoked_at   timestamptz,
    CHECK ((role = 'user') = (address IS NOT NULL AND name IS NULL)),
    CHECK ((role = 'admin') = (customer_id IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS portal_sessions_expires ON public.portal_sessions (expires_at);

-- One-time sign-in links for users: the token's SHA-256, the address, used at most once.
CREATE TABLE IF NOT EXISTS public.portal_links (
    token_hash  bytea PRIMARY KEY,
    address     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX IF NOT EXISTS portal_links_expires ON public.portal_links (expires_at);

-- Every release, delete and allow-list (and sign-ins), with who did it: never updated.
CREATE TABLE IF NOT EXISTS public.portal_audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    who         text NOT NULL,      -- a portal user's name, or a user's address
    role        text NOT NULL,
    customer_id bigint,
    action      text NOT NULL,      -- release | delete | allow | login | link | logout
    event_id    uuid,
    tower       text,
    details     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS portal_audit_at ON public.portal_audit (at);

-- Subject search: a trigram index makes ILIKE '%text%' an index scan (pg_trgm ships with
-- Debian's postgresql-15). The extension is created by the owner at the deploy.
CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;
CREATE INDEX IF NOT EXISTS verdict_events_quarantine_subject
    ON public.verdict_events USING gin (subject public.gin_trgm_ops)
    WHERE quarantine_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS verdict_events_quarantine_sender
    ON public.verdict_events USING gin (sender public.gin_trgm_ops)
    WHERE quarantine_id IS NOT NULL;

-- Recipients as scand stores them keep Postfix's spelling (Alice@Acme.example); the portal
-- compares addresses in lower case, through this function and its GIN expression index (the
-- hub's GIN index on recipients itself stays: the sync's schema owns it). Immutable,
-- NULL-safe (NULL in, NULL out; NULL elements kept), order kept; schema-qualified and with its
-- own search_path, so an index on it means the same under any session's search_path.
CREATE OR REPLACE FUNCTION public.mt_lower_addresses(addresses text[]) RETURNS text[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog
    AS $$
        SELECT coalesce(array_agg(lower(t.a) ORDER BY t.n), '{}'::text[])
        FROM unnest(addresses) WITH ORDINALITY AS t(a, n)
    $$;
CREATE INDEX IF NOT EXISTS verdict_events_quarantine_recipients_lower
    ON public.verdict_events USING gin (public.mt_lower_addresses(recipients))
    WHERE quarantine_id IS NOT NULL;
