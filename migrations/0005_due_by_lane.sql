-- The due index, one per lane. `jobs_due` led with the expression `(replay_id IS NOT NULL)`, but
-- a claim's `(replay_id IS NOT NULL) = false` is folded by the planner into `replay_id IS NULL`,
-- which no longer matches that expression: with a deep backlog every claim read and sorted the
-- whole queue (21 ms for one run at 43,000 runs) and delivery fell to a few hundred events a
-- second while ingest went on. A partial index per lane matches the claims' own conditions, so
-- a claim reads only the runs it takes, oldest first.
DROP INDEX jobs_due;
CREATE INDEX jobs_due_live ON jobs (destination_id, run_at) WHERE replay_id IS NULL;
CREATE INDEX jobs_due_replay ON jobs (destination_id, run_at) WHERE replay_id IS NOT NULL;
