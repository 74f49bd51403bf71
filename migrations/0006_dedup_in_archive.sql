-- Dedup by the archive itself. A group commit wrote every message twice: once into
-- `message_ids` (the dedup window, a table of its own) and once into `events`. The archive now
-- carries the dedup key as a unique index of each day, so a fresh message is one row: an event
-- that no destination takes while the archive is off is kept without its payload, for the
-- window only. The window is unchanged: the same UTC day (the index) or the day before (a
-- lookup); upkeep never drops yesterday.
--
-- The key is compared byte for byte (COLLATE "C"): equality is the same under any
-- deterministic collation, and the index needs no locale-aware comparison.

ALTER TABLE events ALTER COLUMN payload DROP NOT NULL;

-- A dead letter sent again is queued from a copy of its event, which may share its day with
-- the original: copies take no part in dedup.
ALTER TABLE events ADD COLUMN requeued bool NOT NULL DEFAULT false;
UPDATE events SET requeued = true
WHERE (day, id) IN (
    SELECT day, id FROM (
        SELECT day, id, row_number() OVER (PARTITION BY day, source_id, message_id ORDER BY id) AS n
        FROM events) copies
    WHERE n > 1);

CREATE UNIQUE INDEX events_message_id ON events (day, source_id, message_id COLLATE "C")
    WHERE NOT requeued;

-- messageIds seen today or yesterday whose event was not archived carry over as rows without
-- payload, in days made here if upkeep had dropped them.
DO $$
DECLARE
    d int;
BEGIN
    FOR d IN SELECT DISTINCT day FROM message_ids LOOP
        EXECUTE format('CREATE TABLE IF NOT EXISTS events_d%s PARTITION OF events '
                       'FOR VALUES FROM (%s) TO (%s)', d, d, d + 1);
    END LOOP;
END
$$;

INSERT INTO events (day, source_id, message_id, received_at, order_key, payload)
SELECT m.day, m.source_id, m.message_id, now(), 0, NULL
FROM message_ids m
WHERE NOT EXISTS (
    SELECT 1 FROM events e
    WHERE e.day = m.day AND e.source_id = m.source_id AND NOT e.requeued
      AND e.message_id COLLATE "C" = m.message_id COLLATE "C");

DROP TABLE message_ids;
