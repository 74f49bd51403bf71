//! Postgres: every SQL statement Switchyard runs lives here.
//!
//! The queue follows River and graphile-worker: jobs are inserted with `unnest` in one
//! statement per group commit, claimed in batches with `FOR UPDATE SKIP LOCKED` (claiming moves
//! `run_at` past a lease, so an abandoned claim simply comes due again), completed in batches,
//! and workers are woken with `NOTIFY`. Events and jobs live in time partitions that are dropped
//! whole once their work is done, instead of being deleted row by row and vacuumed.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};
use time::OffsetDateTime;

/// Seconds of ingest per partition of `events` and `jobs`. Short, so that a window is dropped
/// (with every dead tuple its claims and completions left) a couple of minutes after its work
/// is done, instead of the queue's indexes filling with dead entries vacuum must chase.
pub const PART_SECONDS: i64 = 60;

/// Storage options of `jobs` partitions: room on each page for the claim's new row version, and
/// autovacuum that keeps up with a queue's churn (every job is updated once and deleted once).
const JOBS_STORAGE: &str = "fillfactor = 80, vacuum_truncate = false, \
     autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000, \
     autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_cost_limit = 10000";
/// The channel jobs are announced on.
pub const JOBS_CHANNEL: &str = "switchyard_jobs";
/// Advisory lock namespace: instance liveness.
const INSTANCE_LOCKS: i32 = 0x5357_0001;
/// Advisory lock key: partition maintenance, one instance at a time.
const MAINTENANCE_LOCK: i64 = 0x5357_0002;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The handle every stage shares.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

/// A message ready to commit.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source_id: i32,
    pub message_id: String,
    pub received_at: OffsetDateTime,
    /// userId, else anonymousId: the key of per-user ordering.
    pub user_key: String,
    /// The enriched message, serialized.
    pub payload: Vec<u8>,
    /// Destinations that get a delivery of it.
    pub targets: Vec<Target>,
}

/// One destination an event is queued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub destination_id: i32,
    /// Deliver this user's events to it one at a time, in ingest order.
    pub ordered: bool,
}

/// What a group commit wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Messages seen for the first time (the others were repeats of a known messageId).
    pub fresh: u64,
    pub jobs: u64,
}

/// A claimed delivery.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub key: JobKey,
    pub attempts: i32,
    pub enqueued_at: OffsetDateTime,
    pub message_id: String,
    pub payload: Vec<u8>,
}

/// Identifies a job row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobKey {
    pub part: i32,
    pub id: i64,
}

/// A job to try again after `delay`.
#[derive(Debug, Clone)]
pub struct RetryJob {
    pub key: JobKey,
    pub delay: Duration,
    pub status: Option<i32>,
    pub error: String,
}

/// A job that goes to the dead letters.
#[derive(Debug, Clone)]
pub struct DeadJob {
    pub key: JobKey,
    pub status: Option<i32>,
    pub error: String,
}

/// A dead letter as the admin API shows it.
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

/// This process's registration; its advisory lock lives as long as `connection` does.
pub struct Instance {
    pub id: i32,
    connection: PgConnection,
}

impl Instance {
    /// Deregisters this process (its jobs must have been released already).
    pub async fn close(mut self) -> Result<()> {
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(self.id)
            .execute(&mut self.connection)
            .await?;
        self.connection.close().await?;
        Ok(())
    }
}

const INSERT_EVENTS: &str = r#"
WITH input AS (
    SELECT *
    FROM unnest($1::int[], $2::text[], $3::timestamptz[], $4::bytea[], $5::bool[], $11::text[])
        WITH ORDINALITY AS t(source_id, message_id, received_at, payload, wanted, user_key, idx)
), fresh AS (
    INSERT INTO message_ids (day, source_id, message_id)
    SELECT floor(extract(epoch FROM now()) / 86400)::int, i.source_id, i.message_id
    FROM input i
    WHERE NOT EXISTS (
        SELECT 1 FROM message_ids m
        WHERE m.day = floor(extract(epoch FROM now()) / 86400)::int - 1
          AND m.source_id = i.source_id AND m.message_id = i.message_id)
    ON CONFLICT DO NOTHING
    RETURNING source_id, message_id
), inserted AS (
    INSERT INTO events (part, source_id, message_id, received_at, payload)
    SELECT floor(extract(epoch FROM now()) / $8::int)::int, i.source_id, i.message_id,
           i.received_at, i.payload
    FROM input i JOIN fresh f USING (source_id, message_id)
    WHERE i.wanted
    ORDER BY i.idx
    RETURNING part, id, source_id, message_id
), queued AS (
    -- Ordered by position so that ids (and so per-user order) follow ingest order.
    INSERT INTO jobs (part, event_id, destination_id, source_id, order_key, run_at, enqueued_at)
    SELECT ins.part, ins.id, t.destination_id, ins.source_id,
           CASE WHEN t.ordered THEN i.user_key END, now(), now()
    FROM inserted ins
    JOIN input i USING (source_id, message_id)
    JOIN unnest($6::int[], $7::int[], $12::bool[]) AS t(idx, destination_id, ordered)
        ON t.idx = i.idx
    ORDER BY i.idx, t.destination_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM fresh) AS fresh,
       (SELECT count(*) FROM queued) AS jobs,
       pg_notify($10, $9)
"#;

/// A claim: the `due` rows (`$1` destination, `$2` at most) are leased for `$3` seconds to
/// owner `$4` and returned with their events. Only how `due` picks rows differs between claims.
macro_rules! claim {
    ($due:literal) => {
        concat!(
            "WITH due AS (",
            $due,
            r#"), claimed AS (
    UPDATE jobs j
    SET run_at = now() + make_interval(secs => $3), attempts = j.attempts + 1, owner = $4
    FROM due
    WHERE j.part = due.part AND j.id = due.id
    RETURNING j.part, j.id, j.event_id, j.attempts, j.enqueued_at
)
SELECT c.part, c.id, c.attempts, c.enqueued_at, e.message_id, e.payload
FROM claimed c
JOIN events e ON e.part = c.part AND e.id = c.event_id
ORDER BY c.id
"#
        )
    };
}

/// The oldest due jobs of a destination.
const CLAIM: &str = claim!(
    r#"
    SELECT part, id FROM jobs
    WHERE destination_id = $1 AND run_at <= now()
    ORDER BY run_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
"#
);

/// Per-user ordering: only the oldest job of each user is claimable, so while it is in flight
/// or waiting to be retried, that user's later jobs wait and other users' do not.
const CLAIM_ORDERED: &str = claim!(
    r#"
    SELECT j.part, j.id FROM jobs j
    WHERE j.destination_id = $1 AND j.run_at <= now()
      AND NOT EXISTS (
          SELECT 1 FROM jobs earlier
          WHERE earlier.destination_id = j.destination_id
            AND earlier.order_key = j.order_key
            AND earlier.id < j.id)
    ORDER BY j.id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
"#
);

const COMPLETE: &str = r#"
DELETE FROM jobs j
USING unnest($1::int[], $2::bigint[]) AS d(part, id)
WHERE j.part = d.part AND j.id = d.id
"#;

const RETRY: &str = r#"
UPDATE jobs j
SET run_at = now() + make_interval(secs => d.delay), owner = NULL,
    last_status = d.status, last_error = d.error
FROM unnest($1::int[], $2::bigint[], $3::float8[], $4::int[], $5::text[])
    AS d(part, id, delay, status, error)
WHERE j.part = d.part AND j.id = d.id
"#;

const DEAD_LETTER: &str = r#"
WITH d AS (
    SELECT * FROM unnest($1::int[], $2::bigint[], $3::int[], $4::text[])
        AS d(part, id, status, error)
), moved AS (
    DELETE FROM jobs j USING d
    WHERE j.part = d.part AND j.id = d.id
    RETURNING j.part, j.event_id, j.destination_id, j.attempts, d.status, d.error
)
INSERT INTO dead_letters
    (destination_id, source_id, message_id, attempts, last_status, last_error, received_at, payload)
SELECT m.destination_id, e.source_id, e.message_id, m.attempts, m.status, m.error,
       e.received_at, e.payload
FROM moved m
JOIN events e ON e.part = m.part AND e.id = m.event_id
"#;

const DEAD_LETTER_DESTINATION: &str = r#"
WITH moved AS (
    DELETE FROM jobs WHERE destination_id = $1
    RETURNING part, event_id, destination_id, attempts, last_status
)
INSERT INTO dead_letters
    (destination_id, source_id, message_id, attempts, last_status, last_error, received_at, payload)
SELECT m.destination_id, e.source_id, e.message_id, m.attempts, m.last_status, $2,
       e.received_at, e.payload
FROM moved m
JOIN events e ON e.part = m.part AND e.id = m.event_id
"#;

const RELEASE_OWNED: &str = r#"
UPDATE jobs SET run_at = now(), owner = NULL
WHERE owner = $1 AND run_at > now()
"#;

const REPLAY: &str = r#"
WITH picked AS (
    DELETE FROM dead_letters
    WHERE destination_id = $1 AND ($2::bigint[] IS NULL OR id = ANY($2))
    RETURNING source_id, message_id, received_at, payload
), inserted AS (
    INSERT INTO events (part, source_id, message_id, received_at, payload)
    SELECT floor(extract(epoch FROM now()) / $3::int)::int, source_id, message_id, received_at,
           payload
    FROM picked
    ORDER BY received_at
    RETURNING part, id, source_id, payload
), queued AS (
    INSERT INTO jobs (part, event_id, destination_id, source_id, order_key, run_at, enqueued_at)
    SELECT part, id, $1, source_id,
           CASE WHEN $5 THEN coalesce(convert_from(payload, 'UTF8')::jsonb ->> 'userId',
                                      convert_from(payload, 'UTF8')::jsonb ->> 'anonymousId') END,
           now(), now()
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

const LEASE_KEYS: &str = r#"
INSERT INTO key_leases (key, owner, expires_at)
SELECT k, $2, now() + make_interval(secs => $3) FROM unnest($1::text[]) AS k
ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
WHERE key_leases.owner = EXCLUDED.owner OR key_leases.expires_at < now()
RETURNING key
"#;

const DUE_DESTINATIONS: &str = r#"
SELECT d FROM unnest($1::int[]) AS d
WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.destination_id = d AND j.run_at <= now())
"#;

impl Store {
    /// Connects with a pool of `max_connections`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations in `migrations/` (concurrent callers wait on sqlx's lock).
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// True when the database answers and the migrations are applied.
    pub async fn ready(&self) -> bool {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE success)",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap_or(false)
    }

    /// Ids for source or destination names, creating the ones not seen before. Ids are stable
    /// across restarts and reloads, since queued jobs refer to them.
    pub async fn name_ids(
        &self,
        table: NameTable,
        names: &[String],
    ) -> Result<HashMap<String, i32>> {
        let sql = match table {
            NameTable::Sources => {
                "INSERT INTO sources (name) SELECT unnest($1::text[]) ON CONFLICT (name) DO NOTHING"
            }
            NameTable::Destinations => {
                "INSERT INTO destinations (name) SELECT unnest($1::text[]) \
                 ON CONFLICT (name) DO NOTHING"
            }
        };
        sqlx::query(sql).bind(names).execute(&self.pool).await?;
        let select = match table {
            NameTable::Sources => "SELECT name, id FROM sources WHERE name = ANY($1)",
            NameTable::Destinations => "SELECT name, id FROM destinations WHERE name = ANY($1)",
        };
        let rows: Vec<(String, i32)> = sqlx::query_as(select)
            .bind(names)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// Commits a group of messages in one statement: dedup by (source, messageId), the events,
    /// one job per (event, destination), and a `NOTIFY` naming the destinations.
    pub async fn insert_events(&self, events: &[NewEvent]) -> Result<Committed> {
        let mut source_ids = Vec::with_capacity(events.len());
        let mut message_ids = Vec::with_capacity(events.len());
        let mut received = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        let mut wanted = Vec::with_capacity(events.len());
        let mut user_keys = Vec::with_capacity(events.len());
        let mut job_index = Vec::new();
        let mut job_destination = Vec::new();
        let mut job_ordered = Vec::new();
        let mut woken: Vec<i32> = Vec::new();
        for (i, event) in events.iter().enumerate() {
            source_ids.push(event.source_id);
            message_ids.push(event.message_id.as_str());
            received.push(event.received_at);
            payloads.push(event.payload.as_slice());
            wanted.push(!event.targets.is_empty());
            user_keys.push(event.user_key.as_str());
            for target in &event.targets {
                job_index.push(i as i32 + 1);
                job_destination.push(target.destination_id);
                job_ordered.push(target.ordered);
                if !woken.contains(&target.destination_id) {
                    woken.push(target.destination_id);
                }
            }
        }
        let notice = notice_payload(&woken);
        let row = sqlx::query(INSERT_EVENTS)
            .bind(&source_ids)
            .bind(&message_ids)
            .bind(&received)
            .bind(&payloads)
            .bind(&wanted)
            .bind(&job_index)
            .bind(&job_destination)
            .bind(PART_SECONDS as i32)
            .bind(&notice)
            .bind(JOBS_CHANNEL)
            .bind(&user_keys)
            .bind(&job_ordered)
            .fetch_one(&self.pool)
            .await?;
        Ok(Committed {
            fresh: row.get::<i64, _>("fresh") as u64,
            jobs: row.get::<i64, _>("jobs") as u64,
        })
    }

    /// Claims up to `limit` due jobs of one destination for `lease`, oldest first; with
    /// `ordered`, only each user's oldest job.
    pub async fn claim(
        &self,
        destination_id: i32,
        limit: usize,
        lease: Duration,
        owner: i32,
        ordered: bool,
    ) -> Result<Vec<ClaimedJob>> {
        let sql = if ordered { CLAIM_ORDERED } else { CLAIM };
        let rows = sqlx::query(sql)
            .bind(destination_id)
            .bind(limit as i64)
            .bind(lease.as_secs_f64())
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| ClaimedJob {
                key: JobKey {
                    part: row.get("part"),
                    id: row.get("id"),
                },
                attempts: row.get("attempts"),
                enqueued_at: row.get("enqueued_at"),
                message_id: row.get("message_id"),
                payload: row.get("payload"),
            })
            .collect())
    }

    /// Records a batch of outcomes in one transaction: delivered jobs are deleted, retried
    /// ones rescheduled, failed ones moved to the dead letters with their event.
    pub async fn finish(
        &self,
        delivered: &[JobKey],
        retried: &[RetryJob],
        dead: &[DeadJob],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if !delivered.is_empty() {
            let (parts, ids) = split_keys(delivered.iter().copied());
            sqlx::query(COMPLETE)
                .bind(parts)
                .bind(ids)
                .execute(&mut *tx)
                .await?;
        }
        if !retried.is_empty() {
            let (parts, ids) = split_keys(retried.iter().map(|r| r.key));
            let delays: Vec<f64> = retried.iter().map(|r| r.delay.as_secs_f64()).collect();
            let statuses: Vec<Option<i32>> = retried.iter().map(|r| r.status).collect();
            let errors: Vec<&str> = retried.iter().map(|r| r.error.as_str()).collect();
            sqlx::query(RETRY)
                .bind(parts)
                .bind(ids)
                .bind(delays)
                .bind(statuses)
                .bind(errors)
                .execute(&mut *tx)
                .await?;
        }
        if !dead.is_empty() {
            let (parts, ids) = split_keys(dead.iter().map(|d| d.key));
            let statuses: Vec<Option<i32>> = dead.iter().map(|d| d.status).collect();
            let errors: Vec<&str> = dead.iter().map(|d| d.error.as_str()).collect();
            sqlx::query(DEAD_LETTER)
                .bind(parts)
                .bind(ids)
                .bind(statuses)
                .bind(errors)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Of `destinations`, those with a job due now.
    pub async fn due_destinations(&self, destinations: &[i32]) -> Result<Vec<i32>> {
        Ok(sqlx::query_scalar(DUE_DESTINATIONS)
            .bind(destinations)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Registers this process: an id, and a session advisory lock on it held by a connection
    /// of its own, so that when the process dies the lock goes with it.
    pub async fn register_instance(&self, url: &str) -> Result<Instance> {
        let mut connection = PgConnection::connect(url).await?;
        let id: i64 = sqlx::query_scalar("SELECT nextval('instances_id_seq')")
            .fetch_one(&mut connection)
            .await?;
        let id = id as i32;
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(INSTANCE_LOCKS)
            .bind(id)
            .execute(&mut connection)
            .await?;
        sqlx::query("INSERT INTO instances (id) VALUES ($1)")
            .bind(id)
            .execute(&mut connection)
            .await?;
        Ok(Instance { id, connection })
    }

    /// Moves every queued job of a destination to the dead letters with `reason`.
    pub async fn dead_letter_destination(&self, destination_id: i32, reason: &str) -> Result<u64> {
        let done = sqlx::query(DEAD_LETTER_DESTINATION)
            .bind(destination_id)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Makes the jobs claimed by `owner` due again now (shutdown, or a dead process).
    pub async fn release_owned(&self, owner: i32) -> Result<u64> {
        let done = sqlx::query(RELEASE_OWNED)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Finds processes that died (their advisory lock is free) and releases their claims at
    /// once rather than when their leases run out. Returns how many jobs were released.
    pub async fn release_dead_instances(&self, me: i32) -> Result<u64> {
        let mut conn = self.pool.acquire().await?;
        let others: Vec<i32> = sqlx::query_scalar("SELECT id FROM instances WHERE id <> $1")
            .bind(me)
            .fetch_all(&mut *conn)
            .await?;
        let mut released = 0;
        for id in others {
            let dead: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(INSTANCE_LOCKS)
                .bind(id)
                .fetch_one(&mut *conn)
                .await?;
            if !dead {
                continue;
            }
            released += sqlx::query(RELEASE_OWNED)
                .bind(id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM key_leases WHERE owner = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            sqlx::query("DELETE FROM instances WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(INSTANCE_LOCKS)
                .bind(id)
                .execute(&mut *conn)
                .await?;
        }
        Ok(released)
    }

    /// Creates the partitions the next windows need and drops the ones whose work is done:
    /// a past window with no job left, and dedup days older than yesterday.
    pub async fn maintain_partitions(&self) -> Result<PartitionReport> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(MAINTENANCE_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(PartitionReport::default());
        }
        sqlx::query("SET LOCAL lock_timeout = '500ms'")
            .execute(&mut *tx)
            .await?;
        let (part, day): (i32, i32) = sqlx::query_as(
            "SELECT floor(extract(epoch FROM now()) / $1::int)::int, \
                    floor(extract(epoch FROM now()) / 86400)::int",
        )
        .bind(PART_SECONDS as i32)
        .fetch_one(&mut *tx)
        .await?;
        for p in part..=part + 2 {
            for (table, storage) in [("events", ""), ("jobs", JOBS_STORAGE)] {
                let with = if storage.is_empty() {
                    String::new()
                } else {
                    format!(" WITH ({storage})")
                };
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS {table}_p{p} PARTITION OF {table} \
                     FOR VALUES FROM ({p}) TO ({next}){with}",
                    next = p + 1
                );
                sqlx::query(&sql)
                    .persistent(false)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for d in day..=day + 1 {
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS message_ids_d{d} PARTITION OF message_ids \
                 FOR VALUES FROM ({d}) TO ({next})",
                next = d + 1
            );
            sqlx::query(&sql)
                .persistent(false)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;

        let mut report = PartitionReport::default();
        for old in self.partitions("jobs", "jobs_p").await? {
            // Windows that may still be written to, or hold work, churn: every job is updated
            // once and deleted once. Vacuum them here rather than trusting autovacuum's settings
            // (or its being on), so claims never wade through dead index entries.
            if old <= part {
                // No truncation: it would take an exclusive lock and stall every claim.
                let vacuum = format!("VACUUM (TRUNCATE false, SKIP_LOCKED true) jobs_p{old}");
                if let Err(error) = sqlx::query(&vacuum)
                    .persistent(false)
                    .execute(&self.pool)
                    .await
                {
                    tracing::debug!(%error, window = old, "vacuuming a queue partition failed");
                }
            }
            // A window is dropped once it is a full window in the past and empty.
            if old >= part - 1 {
                continue;
            }
            match self.drop_window_if_done(old).await {
                Ok(true) => report.dropped_windows += 1,
                Ok(false) => report.live_windows += 1,
                Err(error) => {
                    tracing::debug!(%error, window = old, "partition busy, dropping it later");
                    report.live_windows += 1;
                }
            }
        }
        for old in self.partitions("message_ids", "message_ids_d").await? {
            if old < day - 1 {
                let sql = format!("DROP TABLE IF EXISTS message_ids_d{old}");
                sqlx::query(&sql)
                    .persistent(false)
                    .execute(&self.pool)
                    .await?;
                report.dropped_days += 1;
            }
        }
        Ok(report)
    }

    async fn partitions(&self, parent: &str, prefix: &str) -> Result<Vec<i32>> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = $1::regclass",
        )
        .bind(parent)
        .fetch_all(&self.pool)
        .await?;
        Ok(names
            .iter()
            .filter_map(|name| name.strip_prefix(prefix)?.parse().ok())
            .collect())
    }

    /// Drops one window's jobs and events if no job is left in it. The partitions are locked
    /// before they are checked, so a commit still writing into the window is waited for.
    /// (Statements naming a partition are not kept prepared: a new window every minute would
    /// fill every connection's statement cache.)
    async fn drop_window_if_done(&self, part: i32) -> Result<bool> {
        // Look first without a lock: a window with work left is the common case, and an
        // exclusive lock request would stall every claim (they scan all partitions) while it
        // waits. Only a window that looks empty is locked and checked again.
        let any: bool = sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM jobs_p{part})"))
            .persistent(false)
            .fetch_one(&self.pool)
            .await?;
        if any {
            return Ok(false);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '100ms'")
            .execute(&mut *tx)
            .await?;
        let lock = format!("LOCK TABLE jobs_p{part}, events_p{part} IN ACCESS EXCLUSIVE MODE");
        sqlx::query(&lock)
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        let left: bool = sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM jobs_p{part})"))
            .persistent(false)
            .fetch_one(&mut *tx)
            .await?;
        if left {
            return Ok(false);
        }
        let drop = format!("DROP TABLE jobs_p{part}, events_p{part}");
        sqlx::query(&drop)
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
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
                payload: row.get(7),
            })
            .collect())
    }

    /// Queues dead letters of one destination again, with a fresh retry budget.
    pub async fn replay(
        &self,
        destination_id: i32,
        ids: Option<&[i64]>,
        ordered: bool,
    ) -> Result<u64> {
        let count: i64 = sqlx::query_scalar(REPLAY)
            .bind(destination_id)
            .bind(ids)
            .bind(PART_SECONDS as i32)
            .bind(JOBS_CHANNEL)
            .bind(ordered)
            .fetch_one(&self.pool)
            .await?;
        Ok(count as u64)
    }

    /// Queued jobs per (destination id, source id), and how many of them are waiting for a
    /// retry. A full count: callers sample it now and then rather than per request.
    pub async fn queued(&self) -> Result<Vec<(i32, i32, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT destination_id, source_id, count(*), \
                    count(*) FILTER (WHERE last_error IS NOT NULL) \
             FROM jobs GROUP BY 1, 2",
        )
        .fetch_all(&self.pool)
        .await?)
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

    /// Takes or renews leases on rate-limit keys (by digest) for `ttl`; returns the keys this
    /// process holds afterwards. A key held by another live process is left alone.
    pub async fn lease_keys(
        &self,
        keys: &[String],
        owner: i32,
        ttl: Duration,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(LEASE_KEYS)
            .bind(keys)
            .bind(owner)
            .bind(ttl.as_secs_f64())
            .fetch_all(&self.pool)
            .await?)
    }

    /// The rate-limit keys (digests) another live process holds.
    pub async fn keys_held_elsewhere(&self, owner: i32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT key FROM key_leases WHERE owner <> $1 AND expires_at > now()",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?)
    }

    /// How many processes are registered.
    pub async fn instance_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM instances")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Gives up some key leases of `owner`, for another process to take.
    pub async fn release_key_leases(&self, keys: &[String], owner: i32) -> Result<()> {
        sqlx::query("DELETE FROM key_leases WHERE owner = $1 AND key = ANY($2)")
            .bind(owner)
            .bind(keys)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Gives up every key lease of `owner` (at shutdown).
    pub async fn release_keys(&self, owner: i32) -> Result<()> {
        sqlx::query("DELETE FROM key_leases WHERE owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Which name table [`Store::name_ids`] fills.
#[derive(Debug, Clone, Copy)]
pub enum NameTable {
    Sources,
    Destinations,
}

/// What a maintenance pass did.
#[derive(Debug, Clone, Copy, Default)]
pub struct PartitionReport {
    pub dropped_windows: u32,
    pub live_windows: u32,
    pub dropped_days: u32,
}

fn split_keys(keys: impl Iterator<Item = JobKey>) -> (Vec<i32>, Vec<i64>) {
    keys.map(|k| (k.part, k.id)).unzip()
}

/// The `NOTIFY` payload: destination ids, comma separated; empty (meaning "look at every
/// destination") when they would not fit Postgres's 8000-byte limit.
fn notice_payload(destinations: &[i32]) -> String {
    let text = destinations
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    if text.len() > 7000 {
        String::new()
    } else {
        text
    }
}

/// Parses a `NOTIFY` payload back into destination ids (`None`: every destination).
pub fn parse_notice(payload: &str) -> Option<Vec<i32>> {
    if payload.is_empty() {
        return None;
    }
    Some(
        payload
            .split(',')
            .filter_map(|id| id.parse().ok())
            .collect(),
    )
}

// ---- Added on branch `clients` for the oldest-queued-age gauge (issue 14, item 9). ----------
// Kept apart so the store rewrite can port it: one grouped scan of the queue, run per scrape.

impl Store {
    /// Seconds since the oldest queued delivery of each destination id was enqueued.
    pub async fn oldest_queued_ages(&self) -> Result<HashMap<i32, f64>> {
        let rows: Vec<(i32, f64)> = sqlx::query_as(
            "SELECT destination_id, \
                    greatest(extract(epoch FROM now() - min(enqueued_at)), 0)::float8 \
             FROM jobs GROUP BY destination_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_overflow_to_everyone() {
        assert_eq!(parse_notice(&notice_payload(&[3, 7])), Some(vec![3, 7]));
        let many: Vec<i32> = (100_000..102_000).collect();
        assert_eq!(parse_notice(&notice_payload(&many)), None);
    }
}
