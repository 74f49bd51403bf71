-- Storage for sustained load: an append-only event archive by UTC day, a small queue of runs,
-- and nothing that needs a partition a minute.
--
-- * `events` keeps every accepted message, partitioned by UTC day. Rows are written once and
--   never updated or deleted, so the archive makes no dead tuples; a day is dropped whole once
--   it is older than `[archive] retention` and no queued run refers to it.
-- * `jobs` is one plain table of *runs*: up to a hundred events of one source for one
--   destination, delivered and completed together. A run is updated when claimed and deleted
--   when done, so the queue's churn is a row per run rather than a row per event, and the
--   table stays as small as the work in flight.
-- * `message_ids` keeps its day partitions; they are created ahead of time and dropped with a
--   short lock timeout, so ingest never waits on DDL.

ALTER TABLE events RENAME TO events_v1;
ALTER TABLE events_v1 RENAME CONSTRAINT events_pkey TO events_v1_pkey;
ALTER TABLE jobs RENAME TO jobs_v1;
ALTER TABLE jobs_v1 RENAME CONSTRAINT jobs_pkey TO jobs_v1_pkey;
ALTER SEQUENCE jobs_id_seq RENAME TO jobs_v1_id_seq;
DROP INDEX jobs_due;
DROP INDEX jobs_order;

CREATE SEQUENCE events_id_seq2;

CREATE TABLE events (
    day         int NOT NULL,
    id          bigint NOT NULL DEFAULT nextval('events_id_seq2'),
    source_id   int NOT NULL,
    message_id  text NOT NULL,
    received_at timestamptz NOT NULL,
    -- hash of userId (else anonymousId): the key of per-user ordering, fixed-size whatever
    -- the id's length.
    order_key   bigint NOT NULL,
    payload     bytea NOT NULL,
    PRIMARY KEY (day, id)
) PARTITION BY RANGE (day);

-- Large payloads are compressed with lz4 where the server has it (pglz otherwise).
DO $$
BEGIN
    ALTER TABLE events ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    NULL;
END
$$;

CREATE TABLE jobs (
    id             bigserial PRIMARY KEY,
    destination_id int NOT NULL,
    source_id      int NOT NULL,
    -- The events' day partition and their ids in it, in ingest order.
    day            int NOT NULL,
    event_ids      bigint[] NOT NULL,
    -- Per-user ordering: the user's hash for destinations with ordering = "per_user" (each
    -- such run holds one user's events), else NULL.
    order_key      bigint,
    run_at         timestamptz NOT NULL,
    enqueued_at    timestamptz NOT NULL,
    attempts       int NOT NULL DEFAULT 0,
    owner          int,
    last_status    int,
    last_error     text
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0,
        autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);

CREATE INDEX jobs_due ON jobs (destination_id, run_at);
CREATE INDEX jobs_order ON jobs (destination_id, order_key, id) WHERE order_key IS NOT NULL;

ALTER TABLE dead_letters ADD COLUMN order_key bigint NOT NULL DEFAULT 0;

-- Processes say they are alive here as well as by their advisory lock: a process whose lock
-- connection dropped is not dead while it keeps beating.
ALTER TABLE instances ADD COLUMN alive_at timestamptz NOT NULL DEFAULT now();
-- Only processes that deliver take a share of the rate-limit keys.
ALTER TABLE instances ADD COLUMN delivers bool NOT NULL DEFAULT true;

-- Work queued before the upgrade moves over: each old job becomes a run of one event.
DO $$
DECLARE
    today int := floor(extract(epoch FROM now()) / 86400)::int;
BEGIN
    EXECUTE format('CREATE TABLE events_d%s PARTITION OF events FOR VALUES FROM (%s) TO (%s)',
                   today, today, today + 1);
    CREATE TEMP TABLE moved_events ON COMMIT DROP AS
        SELECT part, old_id, nextval('events_id_seq2') AS new_id, user_key
        FROM (SELECT j.part, j.event_id AS old_id, max(j.order_key) AS user_key
              FROM jobs_v1 j GROUP BY j.part, j.event_id ORDER BY j.part, j.event_id) s;
    INSERT INTO events (day, id, source_id, message_id, received_at, order_key, payload)
    SELECT today, m.new_id, e.source_id, e.message_id, e.received_at,
           hashtextextended(coalesce(m.user_key, ''), 0), e.payload
    FROM moved_events m JOIN events_v1 e ON e.part = m.part AND e.id = m.old_id;
    INSERT INTO jobs (destination_id, source_id, day, event_ids, order_key, run_at,
                      enqueued_at, attempts, last_status, last_error)
    SELECT j.destination_id, j.source_id, today, ARRAY[m.new_id],
           CASE WHEN j.order_key IS NOT NULL THEN hashtextextended(j.order_key, 0) END,
           j.run_at, j.enqueued_at, j.attempts, j.last_status, j.last_error
    FROM jobs_v1 j JOIN moved_events m ON m.part = j.part AND m.old_id = j.event_id
    ORDER BY j.part, j.id;
END
$$;

DROP TABLE jobs_v1;
DROP TABLE events_v1;
