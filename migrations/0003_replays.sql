-- Replays: archived events delivered again to one destination, on a lane of their own.
--
-- A replay selects archived events in [from_at, to_at) in chunks (its cursor is the last
-- (day, id) looked at, so a restart resumes where it was), queues them as runs marked with
-- the replay's id, and counts what became of them.

CREATE TABLE replays (
    id             bigserial PRIMARY KEY,
    destination_id int NOT NULL,
    from_at        timestamptz NOT NULL,
    to_at          timestamptz NOT NULL,
    -- Source ids to replay from (NULL: every source the destination receives from).
    sources        int[],
    state          text NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued', 'running', 'done', 'cancelled')),
    -- Archived events in range (an estimate until selection is done, then the events queued).
    events         bigint NOT NULL DEFAULT 0,
    selected       bigint NOT NULL DEFAULT 0,
    selection_done bool NOT NULL DEFAULT false,
    cursor_day     int NOT NULL DEFAULT 0,
    cursor_id      bigint NOT NULL DEFAULT 0,
    delivered      bigint NOT NULL DEFAULT 0,
    failed         bigint NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);

-- Runs of a replay carry its id; live runs carry NULL. Claims look at one lane at a time, so
-- the due index leads with the lane.
ALTER TABLE jobs ADD COLUMN replay_id bigint;
DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (destination_id, (replay_id IS NOT NULL), run_at);
CREATE INDEX jobs_replay ON jobs (replay_id) WHERE replay_id IS NOT NULL;

ALTER TABLE dead_letters ADD COLUMN replay_id bigint;
