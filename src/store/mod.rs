//! Postgres: every SQL statement Switchyard runs lives here.
//!
//! The queue follows River and graphile-worker: work is inserted with `unnest` in one statement
//! per group commit, claimed in batches with `FOR UPDATE SKIP LOCKED` (claiming moves `run_at`
//! past a lease, so an abandoned claim simply comes due again), completed in batches, and
//! workers are woken with `NOTIFY`.
//!
//! Three shapes keep it flat under sustained load on a stock Postgres (autovacuum on):
//! - `events` is an append-only archive in UTC-day partitions: written once, never updated,
//!   dropped a whole day at a time after `[archive] retention`.
//! - `jobs` holds *runs*: up to a hundred events of one source for one destination, claimed
//!   and completed as one row. The queue's churn is a row per run, not per event, and the
//!   table stays as small as the work in flight, so autovacuum keeps it clean.
//! - Partition DDL runs ahead of need, with a short `lock_timeout`, and is retried later when
//!   a reader holds a lock: ingest never waits on it.

pub mod commit;
mod listen;

pub use listen::{JobsListener, JobsNotice};

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};
use time::OffsetDateTime;

/// Events per run at most.
pub const MAX_RUN: usize = 100;
/// The channel jobs are announced on.
pub const JOBS_CHANNEL: &str = "switchyard_jobs";
/// Advisory lock namespace: instance liveness.
const INSTANCE_LOCKS: i32 = 0x5357_0001;
/// Advisory lock key: partition upkeep, one instance at a time.
const UPKEEP_LOCK: i64 = 0x5357_0002;
/// A process whose heartbeat is older than this, and whose lock is free, is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);
/// How long partition DDL may wait for a lock before it gives up until the next pass.
const DDL_LOCK_TIMEOUT: &str = "SET lock_timeout = '50ms'";
const SECONDS_PER_DAY: i64 = 86_400;

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
    /// The group commit's connections: [`INSERT_EVENTS`] runs there on its generic plan.
    writes: PgPool,
}

/// Connections of [`Store::writes`] (`serve` runs four group-commit writers).
const WRITE_CONNECTIONS: u32 = 4;

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
    /// Deliver this user's events to it one at a time, in ingest order (runs hold one user).
    pub ordered: bool,
    /// Events per run for this destination (at most [`MAX_RUN`]).
    pub run_size: usize,
}

/// What a group commit wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Messages seen for the first time (the others were repeats of a known messageId).
    pub fresh: u64,
    /// Deliveries queued (events × destinations).
    pub jobs: u64,
}

/// Which of a destination's queues: live traffic, or replays of the archive (which yield to
/// live traffic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Live,
    Replay,
}

/// A claimed run: events of one source for one destination.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub id: i64,
    /// This claim's attempt number; outcomes are written only while it still holds.
    pub attempts: i32,
    pub enqueued_at: OffsetDateTime,
    pub events: Vec<ClaimedEvent>,
}

/// One event of a claimed run.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    pub id: i64,
    pub message_id: String,
    pub payload: Vec<u8>,
}

/// What became of one event of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    Delivered,
    /// Try again with the run.
    Retry,
    /// Never tried or cut off by shutdown: due again at once.
    Release,
    Dead {
        status: Option<i32>,
        error: String,
    },
}

/// The outcome of a whole run, written when every event of it has one.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub id: i64,
    pub attempts: i32,
    /// When the events left to try are due again.
    pub delay: Duration,
    pub status: Option<i32>,
    pub error: Option<String>,
    pub events: Vec<(i64, Fate)>,
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

/// This process's registration. Liveness has two signs: a session advisory lock held by a
/// connection of its own (gone the moment the process dies) and a heartbeat row; a process is
/// dead only when both are gone, so a dropped lock connection alone never makes a live
/// process's claims look abandoned.
pub struct Instance {
    pub id: i32,
    url: String,
    connection: Option<PgConnection>,
}

impl Instance {
    /// Beats the heartbeat and makes sure the lock is held, reconnecting for it if its
    /// connection dropped. Call every second or so.
    pub async fn keep_alive(&mut self, store: &Store) -> Result<()> {
        let beat = sqlx::query("UPDATE instances SET alive_at = now() WHERE id = $1")
            .bind(self.id)
            .execute(&store.pool)
            .await?;
        if beat.rows_affected() == 0 {
            // Declared dead while cut off (its claims were released): register again.
            sqlx::query(
                "INSERT INTO instances (id, delivers) VALUES ($1, true) ON CONFLICT DO NOTHING",
            )
            .bind(self.id)
            .execute(&store.pool)
            .await?;
        }
        let healthy = match self.connection.as_mut() {
            Some(connection) => connection.ping().await.is_ok(),
            None => false,
        };
        if !healthy {
            self.connection = None;
            let mut connection = PgConnection::connect(&self.url).await?;
            sqlx::query("SELECT pg_advisory_lock($1, $2)")
                .bind(INSTANCE_LOCKS)
                .bind(self.id)
                .execute(&mut connection)
                .await?;
            self.connection = Some(connection);
            tracing::info!(instance = self.id, "liveness lock taken again");
        }
        Ok(())
    }

    /// Deregisters this process (its jobs must have been released already).
    pub async fn close(mut self, store: &Store) -> Result<()> {
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(self.id)
            .execute(&store.pool)
            .await?;
        if let Some(connection) = self.connection.take() {
            connection.close().await?;
        }
        Ok(())
    }
}

/// The UTC day number (days since the epoch) of now.
pub fn today() -> i32 {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    (seconds / SECONDS_PER_DAY) as i32
}

/// One group commit: dedup by (source, messageId) with locks taken in key order (so that
/// concurrent groups repeating the same ids queue up instead of deadlocking), the events into
/// the archive, the runs, and a `NOTIFY` naming the destinations.
const INSERT_EVENTS: &str = r#"
WITH input AS (
    SELECT *
    FROM unnest($1::int[], $2::text[], $3::timestamptz[], $4::bytea[], $5::bool[], $6::text[])
        WITH ORDINALITY AS t(source_id, message_id, received_at, payload, wanted, user_key, idx)
), fresh AS (
    INSERT INTO message_ids (day, source_id, message_id)
    SELECT $7, i.source_id, i.message_id
    FROM input i
    WHERE NOT EXISTS (
        SELECT 1 FROM message_ids m
        WHERE m.day = $7 - 1 AND m.source_id = i.source_id AND m.message_id = i.message_id)
    ORDER BY i.source_id, i.message_id
    ON CONFLICT DO NOTHING
    RETURNING source_id, message_id
), inserted AS (
    -- Ordered by position so that ids (and so per-user order) follow ingest order.
    INSERT INTO events (day, source_id, message_id, received_at, order_key, payload)
    SELECT $7, i.source_id, i.message_id, i.received_at, hashtextextended(i.user_key, 0),
           i.payload
    FROM input i JOIN fresh f USING (source_id, message_id)
    WHERE i.wanted OR $8
    ORDER BY i.idx
    RETURNING id, source_id, message_id, order_key
), placed AS (
    SELECT i.idx, ins.id, ins.order_key
    FROM inserted ins JOIN input i USING (source_id, message_id)
), runs AS (
    SELECT r.run, r.destination_id, r.source_id, r.ordered,
           array_agg(p.id ORDER BY p.idx) AS ids, min(p.order_key) AS order_key
    FROM unnest($9::int[], $10::int[]) AS m(run, idx)
    JOIN placed p ON p.idx = m.idx
    JOIN unnest($11::int[], $12::int[], $13::bool[])
        WITH ORDINALITY AS r(destination_id, source_id, ordered, run) ON r.run = m.run
    GROUP BY r.run, r.destination_id, r.source_id, r.ordered
), queued AS (
    INSERT INTO jobs (destination_id, source_id, day, event_ids, order_key, run_at, enqueued_at)
    SELECT destination_id, source_id, $7, ids, CASE WHEN ordered THEN order_key END, now(), now()
    FROM runs
    ORDER BY run
    RETURNING cardinality(event_ids) AS events
)
SELECT (SELECT count(*) FROM fresh) AS fresh,
       (SELECT coalesce(sum(events), 0) FROM queued)::bigint AS jobs,
       pg_notify($15, $14)
"#;

/// A claim: the `due` runs (`$1` destination, `$2` at most) are leased for `$3` seconds to
/// owner `$4` and returned with their events, one row per event.
macro_rules! claim {
    ($due:literal) => {
        concat!(
            "WITH due AS (",
            $due,
            r#"), claimed AS (
    UPDATE jobs j
    SET run_at = now() + make_interval(secs => $3), attempts = j.attempts + 1, owner = $4
    FROM due
    WHERE j.id = due.id
    RETURNING j.id, j.day, j.event_ids, j.attempts, j.enqueued_at
)
SELECT c.id, c.attempts, c.enqueued_at, e.id AS event_id, e.message_id, e.payload
FROM claimed c
CROSS JOIN LATERAL unnest(c.event_ids) WITH ORDINALITY AS u(event_id, position)
JOIN events e ON e.day = c.day AND e.id = u.event_id
ORDER BY c.id, u.position
"#
        )
    };
}

/// The oldest due runs of a destination.
const CLAIM: &str = claim!(
    r#"
    SELECT id FROM jobs
    WHERE destination_id = $1 AND (replay_id IS NOT NULL) = $5 AND run_at <= now()
      AND NOT EXISTS (SELECT 1 FROM paused_destinations WHERE destination_id = $1)
    ORDER BY run_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
"#
);

/// Per-user ordering: only the oldest run of each user is claimable, so while it is in flight
/// or waiting to be retried, that user's later runs wait and other users' do not.
const CLAIM_ORDERED: &str = claim!(
    r#"
    SELECT j.id FROM jobs j
    WHERE j.destination_id = $1 AND (j.replay_id IS NOT NULL) = $5 AND j.run_at <= now()
      AND NOT EXISTS (SELECT 1 FROM paused_destinations WHERE destination_id = $1)
      AND NOT EXISTS (
          SELECT 1 FROM jobs earlier
          WHERE earlier.destination_id = j.destination_id
            AND (earlier.replay_id IS NOT NULL) = $5
            AND earlier.order_key = j.order_key
            AND earlier.id < j.id)
    ORDER BY j.id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
"#
);

/// Writes run outcomes. Only runs still held by this claim (`$11` owner, the attempt number)
/// are touched, so a late outcome never overwrites a newer claim's, and an event is never both
/// delivered and dead-lettered. A run with events left to try keeps them and comes due after
/// its delay; a run with none left is deleted; dead events go to the dead letters.
const FINISH: &str = r#"
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::int[], $5::text[])
        AS r(id, attempts, delay, status, error)
), e AS (
    SELECT * FROM unnest($6::bigint[], $7::bigint[], $8::smallint[], $9::int[], $10::text[])
        AS e(run, event_id, fate, status, error)
), mine AS (
    SELECT j.id, j.day, j.destination_id, j.attempts, j.replay_id
    FROM jobs j JOIN r ON r.id = j.id AND r.attempts = j.attempts
    WHERE j.owner = $11
    FOR UPDATE OF j
), left_over AS (
    SELECT e.run, array_agg(e.event_id ORDER BY e.event_id) AS ids
    FROM e JOIN mine ON mine.id = e.run
    WHERE e.fate IN (1, 3)
    GROUP BY e.run
), kept AS (
    UPDATE jobs j
    SET event_ids = l.ids, run_at = now() + make_interval(secs => r.delay), owner = NULL,
        last_status = coalesce(r.status, j.last_status),
        last_error = coalesce(r.error, j.last_error)
    FROM left_over l JOIN r ON r.id = l.run
    WHERE j.id = l.run
    RETURNING j.id
), gone AS (
    DELETE FROM jobs j
    USING mine
    WHERE j.id = mine.id AND NOT EXISTS (SELECT 1 FROM left_over l WHERE l.run = mine.id)
    RETURNING j.id
), dead AS (
    INSERT INTO dead_letters (destination_id, source_id, message_id, attempts, last_status,
                              last_error, received_at, payload, order_key, replay_id)
    SELECT mine.destination_id, ev.source_id, ev.message_id, mine.attempts, e.status, e.error,
           ev.received_at, ev.payload, ev.order_key, mine.replay_id
    FROM e
    JOIN mine ON mine.id = e.run
    JOIN events ev ON ev.day = mine.day AND ev.id = e.event_id
    WHERE e.fate = 2
    RETURNING 1
), progress AS (
    UPDATE replays p
    SET delivered = p.delivered + c.delivered, failed = p.failed + c.failed
    FROM (SELECT mine.replay_id,
                 count(*) FILTER (WHERE e.fate = 0) AS delivered,
                 count(*) FILTER (WHERE e.fate = 2) AS failed
          FROM e JOIN mine ON mine.id = e.run
          WHERE mine.replay_id IS NOT NULL
          GROUP BY mine.replay_id) c
    WHERE p.id = c.replay_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM mine) AS runs
"#;

/// Moves queued runs of destinations not in `$1` to the dead letters, except runs a live
/// process has claimed (their outcomes are still coming).
const RETIRE: &str = r#"
WITH moved AS (
    DELETE FROM jobs j
    WHERE NOT (j.destination_id = ANY($1))
      AND (j.owner IS NULL OR j.run_at <= now()
           OR NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = j.owner))
    RETURNING j.day, j.event_ids, j.destination_id, j.attempts, j.last_status, j.replay_id
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

const RELEASE_OWNED: &str = r#"
UPDATE jobs SET run_at = now(), owner = NULL
WHERE owner = $1 AND run_at > now()
"#;

const REPLAY: &str = r#"
WITH picked AS (
    DELETE FROM dead_letters
    WHERE destination_id = $1 AND ($2::bigint[] IS NULL OR id = ANY($2))
    RETURNING source_id, message_id, received_at, payload, order_key
), inserted AS (
    INSERT INTO events (day, source_id, message_id, received_at, order_key, payload)
    SELECT $3, source_id, message_id, received_at, order_key, payload
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
  AND NOT EXISTS (SELECT 1 FROM paused_destinations p WHERE p.destination_id = d)
"#;

impl Store {
    /// Connects with a pool of `max_connections`, and a small one for the group commit.
    ///
    /// The group commit's statement runs on its generic plan, made once per connection. With
    /// Postgres's default (`plan_cache_mode = auto`) it was planned again on most calls: under
    /// single-event traffic its arrays hold a few events, so each custom plan looks cheaper
    /// than the generic one, and planning took as long as executing (0.32 ms of 0.66 ms per
    /// group in `ingest-single`, from `pg_stat_statements`). Only there: the claim's generic
    /// plan is far slower than its custom ones.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(options.clone())
            .await?;
        let writes = PgPoolOptions::new()
            .max_connections(WRITE_CONNECTIONS)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(options.options([("plan_cache_mode", "force_generic_plan")]))
            .await?;
        Ok(Store { pool, writes })
    }

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool's connections: (idle, in use).
    pub fn connections(&self) -> (usize, usize) {
        let idle = self.pool.num_idle();
        (idle, (self.pool.size() as usize).saturating_sub(idle))
    }

    /// Closes every connection, once nothing is left to write.
    pub async fn close(&self) {
        self.writes.close().await;
        self.pool.close().await;
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

    /// Commits a group of messages in one statement: dedup by (source, messageId), the events
    /// (every fresh one when `archive`, else those with a destination), their runs, and a
    /// `NOTIFY` naming the destinations.
    pub async fn insert_events(&self, events: &[NewEvent], archive: bool) -> Result<Committed> {
        let mut source_ids = Vec::with_capacity(events.len());
        let mut message_ids = Vec::with_capacity(events.len());
        let mut received = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        let mut wanted = Vec::with_capacity(events.len());
        let mut user_keys = Vec::with_capacity(events.len());
        for event in events {
            source_ids.push(event.source_id);
            message_ids.push(event.message_id.as_str());
            received.push(event.received_at);
            payloads.push(event.payload.as_slice());
            wanted.push(!event.targets.is_empty());
            user_keys.push(event.user_key.as_str());
        }
        let runs = Runs::plan(events);
        let notice = notice_payload(&runs.destinations());
        let row = sqlx::query(INSERT_EVENTS)
            .bind(&source_ids)
            .bind(&message_ids)
            .bind(&received)
            .bind(&payloads)
            .bind(&wanted)
            .bind(&user_keys)
            .bind(today())
            .bind(archive)
            .bind(&runs.member_run)
            .bind(&runs.member_index)
            .bind(&runs.destination)
            .bind(&runs.source)
            .bind(&runs.ordered)
            .bind(&notice)
            .bind(JOBS_CHANNEL)
            .fetch_one(&self.writes)
            .await?;
        Ok(Committed {
            fresh: row.get::<i64, _>("fresh") as u64,
            jobs: row.get::<i64, _>("jobs") as u64,
        })
    }

    /// Claims up to `limit` due runs of one destination's `lane` for `lease`, oldest first;
    /// with `ordered`, only each user's oldest run.
    pub async fn claim(
        &self,
        destination_id: i32,
        limit: usize,
        lease: Duration,
        owner: i32,
        ordered: bool,
        lane: Lane,
    ) -> Result<Vec<ClaimedRun>> {
        let sql = if ordered { CLAIM_ORDERED } else { CLAIM };
        let rows = sqlx::query(sql)
            .bind(destination_id)
            .bind(limit as i64)
            .bind(lease.as_secs_f64())
            .bind(owner)
            .bind(lane == Lane::Replay)
            .fetch_all(&self.pool)
            .await?;
        let mut runs: Vec<ClaimedRun> = Vec::new();
        for row in rows {
            let id: i64 = row.get("id");
            if runs.last().is_none_or(|run| run.id != id) {
                runs.push(ClaimedRun {
                    id,
                    attempts: row.get("attempts"),
                    enqueued_at: row.get("enqueued_at"),
                    events: Vec::new(),
                });
            }
            if let Some(run) = runs.last_mut() {
                run.events.push(ClaimedEvent {
                    id: row.get("event_id"),
                    message_id: row.get("message_id"),
                    payload: row.get("payload"),
                });
            }
        }
        Ok(runs)
    }

    /// Records run outcomes of claims held by `owner` in one statement; returns how many runs
    /// were still held (the others' outcomes are dropped: a newer claim owns them).
    pub async fn finish(&self, owner: i32, outcomes: &[RunOutcome]) -> Result<u64> {
        let mut ids = Vec::with_capacity(outcomes.len());
        let mut attempts = Vec::with_capacity(outcomes.len());
        let mut delays = Vec::with_capacity(outcomes.len());
        let mut statuses = Vec::with_capacity(outcomes.len());
        let mut errors: Vec<Option<String>> = Vec::with_capacity(outcomes.len());
        let mut event_run = Vec::new();
        let mut event_ids = Vec::new();
        let mut fates: Vec<i16> = Vec::new();
        let mut event_status = Vec::new();
        let mut event_error: Vec<Option<String>> = Vec::new();
        for outcome in outcomes {
            ids.push(outcome.id);
            attempts.push(outcome.attempts);
            delays.push(outcome.delay.as_secs_f64());
            statuses.push(outcome.status);
            errors.push(outcome.error.as_deref().map(storable));
            for (event, fate) in &outcome.events {
                event_run.push(outcome.id);
                event_ids.push(*event);
                let (code, status, error) = match fate {
                    Fate::Delivered => (0, None, None),
                    Fate::Retry => (1, None, None),
                    Fate::Dead { status, error } => (2, *status, Some(storable(error))),
                    Fate::Release => (3, None, None),
                };
                fates.push(code);
                event_status.push(status);
                event_error.push(error);
            }
        }
        let held: i64 = sqlx::query_scalar(FINISH)
            .bind(&ids)
            .bind(&attempts)
            .bind(&delays)
            .bind(&statuses)
            .bind(&errors)
            .bind(&event_run)
            .bind(&event_ids)
            .bind(&fates)
            .bind(&event_status)
            .bind(&event_error)
            .bind(owner)
            .fetch_one(&self.pool)
            .await?;
        Ok(held as u64)
    }

    /// Of `destinations`, those with a job due now.
    pub async fn due_destinations(&self, destinations: &[i32]) -> Result<Vec<i32>> {
        Ok(sqlx::query_scalar(DUE_DESTINATIONS)
            .bind(destinations)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Registers this process: an id, a heartbeat row, and a session advisory lock on the id
    /// held by a connection of its own, so that when the process dies the lock goes with it.
    pub async fn register_instance(&self, url: &str, delivers: bool) -> Result<Instance> {
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
        sqlx::query("INSERT INTO instances (id, delivers) VALUES ($1, $2)")
            .bind(id)
            .bind(delivers)
            .execute(&mut connection)
            .await?;
        Ok(Instance {
            id,
            url: url.to_owned(),
            connection: Some(connection),
        })
    }

    /// Moves the queued runs of destinations that are not in `known` to the dead letters (a
    /// destination removed from the config, by a reload or between runs), so they neither
    /// wait forever nor count against `max_queued`. Returns the events moved.
    pub async fn retire_removed(&self, known: &[i32]) -> Result<u64> {
        let done = sqlx::query(RETIRE).bind(known).execute(&self.pool).await?;
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

    /// Finds processes that died (heartbeat stale and advisory lock free) and releases their
    /// claims at once rather than when their leases run out. Returns how many runs were
    /// released.
    pub async fn release_dead_instances(&self, me: i32) -> Result<u64> {
        let mut conn = self.pool.acquire().await?;
        let silent: Vec<i32> = sqlx::query_scalar(
            "SELECT id FROM instances WHERE id <> $1 AND alive_at < now() - make_interval(secs => $2)",
        )
        .bind(me)
        .bind(DEAD_AFTER.as_secs_f64())
        .fetch_all(&mut *conn)
        .await?;
        let mut released = 0;
        for id in silent {
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

    /// Partition upkeep, one process at a time: creates the day partitions of today and the
    /// next two days, drops dedup days older than yesterday, and drops archive days older than
    /// `retention` that no queued run refers to. Each DDL statement waits at most 50 ms for its
    /// lock; one that cannot get it is skipped until the next pass (days are made ahead, so a
    /// skipped pass costs nothing), so a reader holding a lock never stalls ingest.
    pub async fn upkeep(&self, retention: Duration) -> Result<UpkeepReport> {
        let mut conn = self.pool.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(UPKEEP_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            return Ok(UpkeepReport::default());
        }
        let report = upkeep_locked(&mut conn, retention).await;
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(UPKEEP_LOCK)
            .execute(&mut *conn)
            .await;
        let _ = sqlx::query("RESET lock_timeout").execute(&mut *conn).await;
        report
    }

    /// Creates today's partitions if missing, waiting for locks as long as needed: for a
    /// commit that found its day missing (upkeep had not run yet).
    pub async fn prepare_today(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        let day = today();
        for table in ["events", "message_ids"] {
            create_day(&mut conn, table, day).await?;
        }
        Ok(())
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

    /// Queued jobs per (destination id, source id), and how many of them are waiting for a
    /// retry. A full count: callers sample it now and then rather than per request.
    pub async fn queued(&self) -> Result<Vec<(i32, i32, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT destination_id, source_id, sum(cardinality(event_ids))::bigint, \
                    coalesce(sum(cardinality(event_ids)) FILTER (WHERE last_error IS NOT NULL), 0)::bigint \
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

    /// How many live processes deliver (ingest-only processes take no rate-limit keys).
    pub async fn delivering_instances(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM instances \
             WHERE delivers AND alive_at > now() - make_interval(secs => $1)",
        )
        .bind(DEAD_AFTER.as_secs_f64())
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

/// What an upkeep pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpkeepReport {
    pub created: u32,
    pub dropped_days: u32,
    /// DDL that could not get its lock within the timeout, left for the next pass.
    pub deferred: u32,
}

async fn upkeep_locked(conn: &mut PgConnection, retention: Duration) -> Result<UpkeepReport> {
    let mut report = UpkeepReport::default();
    sqlx::query(DDL_LOCK_TIMEOUT).execute(&mut *conn).await?;
    let day = today();
    for table in ["events", "message_ids"] {
        let existing = day_partitions(conn, table).await?;
        for d in day..=day + 2 {
            if existing.contains(&d) {
                continue;
            }
            match create_day(conn, table, d).await {
                Ok(()) => report.created += 1,
                Err(error) if is_lock_timeout(&error) => report.deferred += 1,
                Err(error) => return Err(error),
            }
        }
    }
    // Dedup covers today and yesterday.
    for old in day_partitions(conn, "message_ids").await? {
        if old < day - 1 {
            match drop_day(conn, "message_ids", old).await {
                Ok(()) => report.dropped_days += 1,
                Err(error) if is_lock_timeout(&error) => report.deferred += 1,
                Err(error) => return Err(error),
            }
        }
    }
    // An archive day goes once all of it is older than the retention and no run needs it.
    let retention_days = retention.as_secs().div_ceil(SECONDS_PER_DAY as u64) as i32;
    for old in day_partitions(conn, "events").await? {
        if old >= day - retention_days || old >= day {
            continue;
        }
        let needed: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE day = $1)")
            .bind(old)
            .fetch_one(&mut *conn)
            .await?;
        if needed {
            continue;
        }
        match drop_day(conn, "events", old).await {
            Ok(()) => report.dropped_days += 1,
            Err(error) if is_lock_timeout(&error) => report.deferred += 1,
            Err(error) => return Err(error),
        }
    }
    Ok(report)
}

/// The days of a table's partitions (`<table>_d<day>`).
async fn day_partitions(conn: &mut PgConnection, table: &str) -> Result<Vec<i32>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i \
         JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = $1::regclass",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let prefix = format!("{table}_d");
    Ok(names
        .iter()
        .filter_map(|name| name.strip_prefix(&prefix)?.parse().ok())
        .collect())
}

// Statements naming a partition are not kept prepared: each names a different table.
async fn create_day(conn: &mut PgConnection, table: &str, day: i32) -> Result<()> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {table}_d{day} PARTITION OF {table} \
         FOR VALUES FROM ({day}) TO ({next})",
        next = day + 1
    );
    sqlx::query(&sql)
        .persistent(false)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn drop_day(conn: &mut PgConnection, table: &str, day: i32) -> Result<()> {
    let sql = format!("DROP TABLE IF EXISTS {table}_d{day}");
    sqlx::query(&sql)
        .persistent(false)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// 55P03: lock_not_available, what `lock_timeout` raises.
fn is_lock_timeout(error: &StoreError) -> bool {
    matches!(error, StoreError::Database(sqlx::Error::Database(db))
        if db.code().as_deref() == Some("55P03"))
}

/// Text as Postgres can store it: `text` columns refuse NUL, which a vendor's error body may
/// hold.
pub fn storable(text: &str) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.to_owned()
    }
}

/// How a group's deliveries are cut into runs: per destination and source, in ingest order,
/// at most the destination's run size; for per-user ordering, one user per run.
#[derive(Debug, Default)]
struct Runs {
    /// For each (run, event) membership: the run's number and the event's position (1-based).
    member_run: Vec<i32>,
    member_index: Vec<i32>,
    /// Per run (numbered from 1 in this order).
    destination: Vec<i32>,
    source: Vec<i32>,
    ordered: Vec<bool>,
}

impl Runs {
    fn plan(events: &[NewEvent]) -> Runs {
        let mut runs = Runs::default();
        // The open run of each (destination, source, user if ordered), and its size so far.
        let mut open: HashMap<(i32, i32, Option<&str>), (i32, usize)> = HashMap::new();
        for (position, event) in events.iter().enumerate() {
            for target in &event.targets {
                let user = target.ordered.then_some(event.user_key.as_str());
                let key = (target.destination_id, event.source_id, user);
                let limit = target.run_size.clamp(1, MAX_RUN);
                let run = match open.get_mut(&key) {
                    Some((run, size)) if *size < limit => {
                        *size += 1;
                        *run
                    }
                    _ => {
                        runs.destination.push(target.destination_id);
                        runs.source.push(event.source_id);
                        runs.ordered.push(target.ordered);
                        let run = runs.destination.len() as i32;
                        open.insert(key, (run, 1));
                        run
                    }
                };
                runs.member_run.push(run);
                runs.member_index.push(position as i32 + 1);
            }
        }
        runs
    }

    fn destinations(&self) -> Vec<i32> {
        let mut ids = self.destination.clone();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
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

impl Store {
    /// Seconds since the oldest queued live delivery of each destination id was enqueued.
    pub async fn oldest_queued_ages(&self) -> Result<HashMap<i32, f64>> {
        let rows: Vec<(i32, f64)> = sqlx::query_as(
            "SELECT destination_id, \
                    greatest(extract(epoch FROM now() - min(enqueued_at)), 0)::float8 \
             FROM jobs WHERE replay_id IS NULL GROUP BY destination_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }
}

/// A replay as the admin API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Replay {
    pub id: i64,
    pub destination_id: i32,
    pub destination: String,
    pub from_at: OffsetDateTime,
    pub to_at: OffsetDateTime,
    pub sources: Option<Vec<i32>>,
    pub state: String,
    pub events: i64,
    pub selected: i64,
    pub selection_done: bool,
    pub cursor_day: i32,
    pub cursor_id: i64,
    pub delivered: i64,
    pub failed: i64,
    pub created_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
}

/// An archived event, as replays and exports read it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ArchivedEvent {
    pub day: i32,
    pub id: i64,
    pub source_id: i32,
    pub order_key: i64,
    pub received_at: OffsetDateTime,
    pub payload: Vec<u8>,
}

/// Runs a replay queues in one step, with where its selection got to.
#[derive(Debug, Clone, Default)]
pub struct ReplayStep {
    /// (day, source id, event ids in order, order key when per-user).
    pub runs: Vec<(i32, i32, Vec<i64>, Option<i64>)>,
    pub cursor: (i32, i64),
    pub done: bool,
}

const REPLAY_COLUMNS: &str = "r.id, r.destination_id, d.name AS destination, r.from_at, r.to_at, \
    r.sources, r.state, r.events, r.selected, r.selection_done, r.cursor_day, r.cursor_id, \
    r.delivered, r.failed, r.created_at, r.finished_at";

/// Archived events after a cursor, in (day, id) order, within a time range and sources.
const ARCHIVE_PAGE: &str = r#"
SELECT day, id, source_id, order_key, received_at, payload
FROM events
WHERE day BETWEEN $1 AND $2 AND (day, id) > ($3, $4)
  AND received_at >= $5 AND received_at < $6
  AND ($7::int[] IS NULL OR source_id = ANY($7))
ORDER BY day, id
LIMIT $8
"#;

/// UTC day number of a time.
fn day_of(time: OffsetDateTime) -> i32 {
    time.unix_timestamp().div_euclid(SECONDS_PER_DAY) as i32
}

impl Store {
    /// Records a replay of the archive in `[from, to)` (of `sources`, or all) to a destination;
    /// returns it with `events` the archived events in range (the destination's filters may
    /// then select fewer).
    pub async fn create_replay(
        &self,
        destination_id: i32,
        from: OffsetDateTime,
        to: OffsetDateTime,
        sources: Option<&[i32]>,
    ) -> Result<Replay> {
        let events: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE day BETWEEN $1 AND $2 \
             AND received_at >= $3 AND received_at < $4 \
             AND ($5::int[] IS NULL OR source_id = ANY($5))",
        )
        .bind(day_of(from))
        .bind(day_of(to))
        .bind(from)
        .bind(to)
        .bind(sources)
        .fetch_one(&self.pool)
        .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO replays (destination_id, from_at, to_at, sources, events, cursor_day) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(destination_id)
        .bind(from)
        .bind(to)
        .bind(sources)
        .bind(events)
        .bind(day_of(from) - 1)
        .fetch_one(&self.pool)
        .await?;
        let _ = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(JOBS_CHANNEL)
            .bind(destination_id.to_string())
            .execute(&self.pool)
            .await;
        self.replay(id)
            .await?
            .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
    }

    /// Replays, newest first (`id` for one).
    pub async fn replays(&self, id: Option<i64>) -> Result<Vec<Replay>> {
        let sql = format!(
            "SELECT {REPLAY_COLUMNS} FROM replays r JOIN destinations d ON d.id = r.destination_id \
             WHERE $1::bigint IS NULL OR r.id = $1 ORDER BY r.id DESC LIMIT 1000"
        );
        Ok(sqlx::query_as(&sql).bind(id).fetch_all(&self.pool).await?)
    }

    pub async fn replay(&self, id: i64) -> Result<Option<Replay>> {
        Ok(self.replays(Some(id)).await?.into_iter().next())
    }

    /// Replays whose selection is not finished, oldest first.
    pub async fn selecting_replays(&self) -> Result<Vec<Replay>> {
        let sql = format!(
            "SELECT {REPLAY_COLUMNS} FROM replays r JOIN destinations d ON d.id = r.destination_id \
             WHERE r.state IN ('queued', 'running') AND NOT r.selection_done ORDER BY r.id"
        );
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }

    /// Events a replay has queued and not finished yet.
    pub async fn replay_backlog(&self, id: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(sum(cardinality(event_ids)), 0)::bigint FROM jobs WHERE replay_id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// The next archived events of a replay's range after its cursor.
    pub async fn replay_page(&self, replay: &Replay, limit: i64) -> Result<Vec<ArchivedEvent>> {
        self.archive_page(
            (replay.from_at, replay.to_at),
            replay.sources.as_deref(),
            (replay.cursor_day, replay.cursor_id),
            limit,
        )
        .await
    }

    /// Archived events received in `range`, after `cursor`, in (day, id) order.
    pub async fn archive_page(
        &self,
        range: (OffsetDateTime, OffsetDateTime),
        sources: Option<&[i32]>,
        cursor: (i32, i64),
        limit: i64,
    ) -> Result<Vec<ArchivedEvent>> {
        Ok(sqlx::query_as(ARCHIVE_PAGE)
            .bind(day_of(range.0))
            .bind(day_of(range.1))
            .bind(cursor.0)
            .bind(cursor.1)
            .bind(range.0)
            .bind(range.1)
            .bind(sources)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Queues one step of a replay and moves its cursor, in one transaction, unless it was
    /// cancelled meanwhile. Returns the events queued.
    pub async fn queue_replay_step(&self, replay: &Replay, step: &ReplayStep) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        // Only from the cursor this step was read at: another process that selected the same
        // page first wins, and this step is dropped rather than queued twice.
        let current: Option<(String, i32, i64)> = sqlx::query_as(
            "SELECT state, cursor_day, cursor_id FROM replays WHERE id = $1 FOR UPDATE",
        )
        .bind(replay.id)
        .fetch_optional(&mut *tx)
        .await?;
        match current {
            Some((state, day, id))
                if matches!(state.as_str(), "queued" | "running")
                    && (day, id) == (replay.cursor_day, replay.cursor_id) => {}
            _ => return Ok(0),
        }
        let mut days = Vec::with_capacity(step.runs.len());
        let mut sources = Vec::with_capacity(step.runs.len());
        let mut lists = Vec::with_capacity(step.runs.len());
        let mut keys = Vec::with_capacity(step.runs.len());
        for (day, source, ids, key) in &step.runs {
            days.push(*day);
            sources.push(*source);
            // Postgres arrays of arrays must be rectangular: each run travels as text.
            lists.push(format!(
                "{{{}}}",
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            ));
            keys.push(*key);
        }
        let queued: i64 = sqlx::query_scalar(
            "WITH queued AS ( \
                 INSERT INTO jobs (destination_id, source_id, day, event_ids, order_key, run_at, \
                                   enqueued_at, replay_id) \
                 SELECT $1, s, d, l::bigint[], k, now(), now(), $2 \
                 FROM unnest($3::int[], $4::int[], $5::text[], $6::bigint[]) AS u(d, s, l, k) \
                 RETURNING cardinality(event_ids) AS n) \
             SELECT coalesce(sum(n), 0)::bigint FROM queued",
        )
        .bind(replay.destination_id)
        .bind(replay.id)
        .bind(&days)
        .bind(&sources)
        .bind(&lists)
        .bind(&keys)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE replays SET state = 'running', cursor_day = $2, cursor_id = $3, \
                 selected = selected + $4, selection_done = $5, \
                 events = CASE WHEN $5 THEN selected + $4 ELSE events END \
             WHERE id = $1",
        )
        .bind(replay.id)
        .bind(step.cursor.0)
        .bind(step.cursor.1)
        .bind(queued)
        .bind(step.done)
        .execute(&mut *tx)
        .await?;
        if queued > 0 {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(JOBS_CHANNEL)
                .bind(replay.destination_id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(queued as u64)
    }

    /// Marks replays done whose selection is finished and whose runs are all settled.
    pub async fn finish_replays(&self) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE replays r SET state = 'done', finished_at = now() \
             WHERE r.state IN ('queued', 'running') AND r.selection_done \
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.replay_id = r.id)",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Cancels a replay: nothing more is selected, and its runs not in flight are dropped.
    /// `false` when there is no such replay.
    pub async fn cancel_replay(&self, id: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query(
            "UPDATE replays SET state = CASE WHEN state = 'done' THEN state ELSE 'cancelled' END, \
                 finished_at = coalesce(finished_at, now()) WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        sqlx::query("DELETE FROM jobs WHERE replay_id = $1 AND (owner IS NULL OR run_at <= now())")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(found)
    }

    /// Source ids by name (for the shell commands).
    pub async fn source_id(&self, name: &str) -> Result<Option<i32>> {
        Ok(sqlx::query_scalar("SELECT id FROM sources WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Pauses (or resumes) a destination's deliveries in every process. A resume notifies the
    /// delivering processes so they claim its backlog at once.
    pub async fn set_paused(&self, destination_id: i32, paused: bool) -> Result<()> {
        if paused {
            sqlx::query(
                "INSERT INTO paused_destinations (destination_id) VALUES ($1) \
                 ON CONFLICT (destination_id) DO NOTHING",
            )
            .bind(destination_id)
            .execute(&self.pool)
            .await?;
        } else {
            sqlx::query(
                "WITH gone AS (DELETE FROM paused_destinations WHERE destination_id = $1) \
                 SELECT pg_notify($2, $1::text)",
            )
            .bind(destination_id)
            .bind(JOBS_CHANNEL)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// The paused destinations' ids.
    pub async fn paused(&self) -> Result<HashSet<i32>> {
        let ids: Vec<i32> = sqlx::query_scalar("SELECT destination_id FROM paused_destinations")
            .fetch_all(&self.pool)
            .await?;
        Ok(ids.into_iter().collect())
    }

    /// Destination ids by name (for the shell commands).
    pub async fn destination_id(&self, name: &str) -> Result<Option<i32>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM destinations WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(source_id: i32, user: &str, targets: &[(i32, bool, usize)]) -> NewEvent {
        NewEvent {
            source_id,
            message_id: String::new(),
            received_at: OffsetDateTime::UNIX_EPOCH,
            user_key: user.into(),
            payload: Vec::new(),
            targets: targets
                .iter()
                .map(|&(destination_id, ordered, run_size)| Target {
                    destination_id,
                    ordered,
                    run_size,
                })
                .collect(),
        }
    }

    #[test]
    fn runs_are_cut_per_destination_source_and_size() {
        let events = vec![
            event(1, "a", &[(10, false, 2), (11, true, 5)]),
            event(1, "b", &[(10, false, 2), (11, true, 5)]),
            event(1, "a", &[(10, false, 2), (11, true, 5)]),
            event(2, "a", &[(10, false, 2)]),
        ];
        let runs = Runs::plan(&events);
        // 10: [1,2] [3] from source 1, [4] from source 2; 11: user a [1,3], user b [2].
        assert_eq!(runs.destination, vec![10, 11, 11, 10, 10]);
        assert_eq!(runs.source, vec![1, 1, 1, 1, 2]);
        assert_eq!(runs.member_run, vec![1, 2, 1, 3, 4, 2, 5]);
        assert_eq!(runs.member_index, vec![1, 1, 2, 2, 3, 3, 4]);
        assert_eq!(runs.destinations(), vec![10, 11]);
    }

    #[test]
    fn stored_text_has_no_nul() {
        assert_eq!(storable("a\0b"), "a\u{FFFD}b");
        assert_eq!(storable("plain"), "plain");
    }

    #[test]
    fn notices_round_trip_and_overflow_to_everyone() {
        assert_eq!(parse_notice(&notice_payload(&[3, 7])), Some(vec![3, 7]));
        let many: Vec<i32> = (100_000..102_000).collect();
        assert_eq!(parse_notice(&notice_payload(&many)), None);
    }
}
