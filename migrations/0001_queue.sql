-- Switchyard's state: events, the delivery queue, dead letters and the dedup window.
--
-- Events and jobs are partitioned by `part`, a time window (see store::PART_SECONDS). A window
-- whose jobs are all finished is dropped whole, so finished work never needs DELETE + VACUUM to
-- be reclaimed. Partitions are created ahead of time by the maintenance task.

CREATE TABLE sources (
    id   serial PRIMARY KEY,
    name text NOT NULL UNIQUE
);

CREATE TABLE destinations (
    id   serial PRIMARY KEY,
    name text NOT NULL UNIQUE
);

-- Running processes. Each holds a session advisory lock on its id while alive, so the others
-- can tell a crashed process at once and release its leases.
CREATE TABLE instances (
    id         serial PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now()
);

-- Accepted messages, exactly as they will be delivered (enriched JSON).
CREATE TABLE events (
    part        int NOT NULL,
    id          bigserial NOT NULL,
    source_id   int NOT NULL,
    message_id  text NOT NULL,
    received_at timestamptz NOT NULL,
    payload     bytea NOT NULL,
    PRIMARY KEY (part, id)
) PARTITION BY RANGE (part);

-- One row per (event, destination) still to deliver. A row is claimable when run_at <= now();
-- claiming pushes run_at past the lease, so a crashed worker's claim simply expires.
-- Delivered rows are deleted; failed ones move to dead_letters.
CREATE TABLE jobs (
    part           int NOT NULL,
    id             bigserial NOT NULL,
    event_id       bigint NOT NULL,
    destination_id int NOT NULL,
    source_id      int NOT NULL,
    -- userId (or anonymousId) for destinations with ordering = "per_user", else NULL.
    order_key      text,
    run_at         timestamptz NOT NULL,
    enqueued_at    timestamptz NOT NULL,
    attempts       int NOT NULL DEFAULT 0,
    owner          int,
    last_status    int,
    last_error     text,
    PRIMARY KEY (part, id)
) PARTITION BY RANGE (part);

CREATE INDEX jobs_due ON jobs (destination_id, run_at);
-- No index on owner: claims would pay for it on every row, and it is read only when a process
-- stops or dies (a scan then is cheaper than an index write per claim).
-- Per-user ordering: only a user's oldest job of a destination may be claimed.
CREATE INDEX jobs_order ON jobs (destination_id, order_key, id) WHERE order_key IS NOT NULL;

-- messageIds seen per source, by UTC day: a repeat within the same or the previous day is
-- acknowledged and not delivered again. Days older than that are dropped.
CREATE TABLE message_ids (
    day        int NOT NULL,
    source_id  int NOT NULL,
    message_id text NOT NULL,
    PRIMARY KEY (day, source_id, message_id)
) PARTITION BY RANGE (day);

-- Deliveries that ran out of retries or failed for good, with the event, until replayed.
CREATE TABLE dead_letters (
    id             bigserial PRIMARY KEY,
    destination_id int NOT NULL,
    source_id      int NOT NULL,
    message_id     text NOT NULL,
    attempts       int NOT NULL,
    last_status    int,
    last_error     text NOT NULL,
    received_at    timestamptz NOT NULL,
    failed_at      timestamptz NOT NULL DEFAULT now(),
    payload        bytea NOT NULL
);

CREATE INDEX dead_letters_by_destination ON dead_letters (destination_id, id);

-- Rate-limit keys leased to one process at a time, so each key's bucket lives in exactly one
-- place and a limit holds in total however many processes deliver.
CREATE TABLE key_leases (
    key        text PRIMARY KEY,
    owner      int NOT NULL,
    expires_at timestamptz NOT NULL
);
