//! Dead letters: deliveries that ran out of retries (or lost their destination), kept with
//! the payload so that they can be looked at and queued again.

use std::collections::HashMap;

use sqlx::Row;
use time::OffsetDateTime;

use super::{partitions::today, payload, Result, Store, JOBS_CHANNEL};

/// A dead letter as stored: a timestamp, and the event as its raw payload bytes. (The admin
/// API answers with its own shape, made from this one: RFC 3339 time, the event parsed.)
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: i64,
    pub message_id: String,
    pub destination: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: String,
    pub failed_at: OffsetDateTime,
    pub payload: Vec<u8>,
}

/// Moves queued runs of destinations not in `$1` to the dead letters, except runs a live
/// process has claimed (their outcomes are still coming). A replay's runs count as failed in
/// its progress, as an outcome's dead events do.
const RETIRE: &str = r#"
WITH moved AS (
    DELETE FROM jobs j
    WHERE NOT (j.destination_id = ANY($1))
      AND (j.owner IS NULL OR j.run_at <= now()
           OR NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = j.owner))
    RETURNING j.day, j.event_ids, j.destination_id, j.attempts, j.last_status, j.replay_id
), counted AS (
    UPDATE replays p
    SET failed = p.failed + c.events
    FROM (SELECT replay_id, sum(cardinality(event_ids)) AS events
          FROM moved
          WHERE replay_id IS NOT NULL
          GROUP BY replay_id) c
    WHERE p.id = c.replay_id
)
INSERT INTO dead_letters (destination_id, source_id, message_id, attempts, last_status,
                          last_error, received_at, payload, order_key, replay_id)
SELECT m.destination_id, e.source_id, e.message_id, m.attempts, m.last_status,
       format('destination `%s` was removed from the config', d.name),
       e.received_at, e.payload, e.order_key, m.replay_id
FROM moved m
JOIN destinations d ON d.id = m.destination_id
CROSS JOIN LATERAL unnest(m.event_ids) AS u(id)
JOIN events e ON e.day = m.day AND e.id = u.id
"#;

const REPLAY: &str = r#"
WITH picked AS (
    DELETE FROM dead_letters
    WHERE destination_id = $1 AND ($2::bigint[] IS NULL OR id = ANY($2))
    RETURNING source_id, message_id, received_at, payload, order_key
), inserted AS (
    -- A copy, outside dedup: the original may still be in today's archive.
    INSERT INTO events (day, source_id, message_id, received_at, order_key, payload, requeued)
    SELECT $3, source_id, message_id, received_at, order_key, payload, true
    FROM picked
    ORDER BY received_at
    RETURNING id, source_id, order_key
), queued AS (
    INSERT INTO jobs (destination_id, source_id, day, event_ids, order_key, run_at, enqueued_at)
    SELECT $1, source_id, $3, ARRAY[id], CASE WHEN $5 THEN order_key END, now(), now()
    FROM inserted
    ORDER BY id
    RETURNING 1
)
SELECT (SELECT count(*) FROM queued) AS queued, pg_notify($4, $1::text)
"#;

const DEAD_LETTERS: &str = r#"
SELECT d.id, d.message_id, dest.name, d.attempts, d.last_status, d.last_error, d.failed_at,
       d.payload
FROM dead_letters d
JOIN destinations dest ON dest.id = d.destination_id
WHERE ($1::text IS NULL OR dest.name = $1)
ORDER BY d.id
LIMIT $2
"#;

impl Store {
    /// Moves the queued runs of destinations that are not in `known` to the dead letters (a
    /// destination removed from the config, by a reload or between runs), so they neither
    /// wait forever nor count against `max_queued`. Returns the events moved.
    pub async fn retire_removed(&self, known: &[i32]) -> Result<u64> {
        let done = sqlx::query(RETIRE).bind(known).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    /// Dead letters, oldest first.
    pub async fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(DEAD_LETTERS)
            .bind(destination)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| DeadLetter {
                id: row.get(0),
                message_id: row.get(1),
                destination: row.get(2),
                attempts: row.get(3),
                last_status: row.get(4),
                last_error: row.get(5),
                failed_at: row.get(6),
                payload: payload::unpack(row.get(7)),
            })
            .collect())
    }

    /// Queues dead letters of one destination again, with a fresh retry budget.
    pub async fn requeue_dead_letters(
        &self,
        destination_id: i32,
        ids: Option<&[i64]>,
        ordered: bool,
    ) -> Result<u64> {
        let count: i64 = sqlx::query_scalar(REPLAY)
            .bind(destination_id)
            .bind(ids)
            .bind(today())
            .bind(JOBS_CHANNEL)
            .bind(ordered)
            .fetch_one(&self.pool)
            .await?;
        Ok(count as u64)
    }

    /// Dead letters per destination id.
    pub async fn dead_counts(&self) -> Result<HashMap<i32, i64>> {
        let rows: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT destination_id, count(*) FROM dead_letters GROUP BY destination_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }
}
