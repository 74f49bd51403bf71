-- An archive day is only ever inserted into, then dropped whole. Two things autovacuum did to
-- the day being written stalled delivery once the day held 13 to 15 GB (an hour's soak):
-- - insert-driven vacuum read the day's newest pages again and rewrote them, all day long;
-- - each analyze (every 10% of growth) read 30,000 random pages (300 rows per point of the
--   statistics target, 100 by default) from a day far larger than memory.
-- Days are now made without insert-driven vacuum and analyzed from 3,000 rows: targets of 10,
-- and none for the payload, which no query plans on. Partitions made later copy these targets
-- from `events`. Postgres still analyzes each day and still vacuums one that nears transaction
-- ID wraparound.
ALTER TABLE events
    ALTER COLUMN day SET STATISTICS 10,
    ALTER COLUMN id SET STATISTICS 10,
    ALTER COLUMN source_id SET STATISTICS 10,
    ALTER COLUMN message_id SET STATISTICS 10,
    ALTER COLUMN received_at SET STATISTICS 10,
    ALTER COLUMN order_key SET STATISTICS 10,
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN requeued SET STATISTICS 10;

DO $$
DECLARE
    day_table text;
BEGIN
    FOR day_table IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'events'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %I SET (autovacuum_vacuum_insert_threshold = -1)', day_table);
    END LOOP;
END
$$;
