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

//!
//! One file per concern: [`queue`] (the group commit's insert and dedup), [`claims`] (claiming
//! and finishing runs, pauses), [`dead_letters`], [`replays`] of the archive, [`instances`]
//! (liveness and rate-limit key leases), [`partitions`] (day partitions and their upkeep),
//! [`payload`] (payloads stored compressed), [`commit`] (group commit batching) and [`listen`]
//! (the `NOTIFY` wake-ups).

mod claims;
pub mod commit;
mod dead_letters;
mod instances;
mod listen;
mod partitions;
mod payload;
mod queue;
mod replays;
pub mod server;

pub use claims::{storable, Ask, ClaimedEvent, ClaimedRun, Fate, Lane, RunOutcome};
pub use commit::CommitTimes;
pub use dead_letters::DeadLetter;
pub use instances::{Instance, DEAD_AFTER};
pub use listen::{JobsListener, JobsNotice};
pub use partitions::{today, UpkeepReport};
pub use queue::{destinations, parse_notice, Committed, NewEvent, Target};
pub use replays::{ArchivedEvent, Replay, ReplayStep};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Events per run at most.
pub const MAX_RUN: usize = 100;
/// The channel jobs are announced on.
pub const JOBS_CHANNEL: &str = "switchyard_jobs";

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
    /// The group commit's connections: its `INSERT_EVENTS` runs there on its generic plan.
    writes: PgPool,
    /// The completer's connections: run outcomes are written there, never by a table scan.
    finishes: PgPool,
    /// Claims in ingest order (not per user) run there, on generic plans, never by a table scan.
    claims: PgPool,
    /// Archived events this process's replays selected, until their runs are claimed.
    selected: Arc<claims::Selected>,
}

/// Connections of [`Store::writes`]: one per group-commit writer.
const WRITE_CONNECTIONS: u32 = commit::WRITERS as u32;
/// Connections of [`Store::finishes`]: one completer writes outcomes, one batch at a time.
const FINISH_CONNECTIONS: u32 = 2;
/// Connections of [`Store::claims`]: the scheduler claims live runs one claim at a time, and a
/// few replay claims may be out beside it.
const CLAIM_CONNECTIONS: u32 = 4;

impl Store {
    /// Connects with a pool of `max_connections`, and small ones for the group commit, for
    /// claims in ingest order and for run outcomes.
    ///
    /// The group commit's statement, claims and run outcomes run on their generic plans, made
    /// once per connection. With Postgres's default (`plan_cache_mode = auto`) they were
    /// planned again on most calls, each custom plan looking cheaper for the few rows its
    /// arrays hold, and planning took as long as executing or longer: 0.32 ms of 0.66 ms per
    /// group in `ingest-single`; in `deliver-e2e`, 0.43 ms per claim against 0.33 ms of
    /// execution and 0.41 ms per outcome batch against 0.09 ms, a third of Postgres's time
    /// (`pg_stat_statements`, `track_planning`). Claims and outcomes are written so that their
    /// generic plans look every row up by key, whatever the statistics said when the plan
    /// was made: a claim's plan made while the queue was empty read the whole day of events
    /// for every run it claimed once the queue was deep (43 s for 10 runs of 100 events in a
    /// day of 300,000), before its events were looked up one by one.
    ///
    /// Run outcomes find their runs by primary key, but a connection keeps the plan it made
    /// after its first few outcomes: made while the queue was short (a replay's start), it
    /// scanned the queue, and went on scanning it whole for every outcome once it had grown
    /// (1,385 pages, 3.4 ms a statement in the `replay` bench, against 0.2 ms by the key).
    /// Their connections, and the claims', have sequential scans off.
    ///
    /// No connection lets Postgres JIT-compile its statements. A claim is planned as costly
    /// once the queue is deep (Postgres cannot know how few runs its `LIMIT` leaves), and above
    /// `jit_above_cost` every claim spent 40 to 60 ms compiling itself: in a soak, a backlog of
    /// a few seconds brought delivery down to 1,000 events a second, and the queue it left
    /// kept it there. Switchyard's statements are short and repeated; none gains from JIT.
    ///
    /// sqlx pings a connection (a round trip) both when it is taken from the pool and when it
    /// is given back. The second ping already drops a connection that died, so the first is
    /// skipped: a connection that died while idle fails one statement and is then dropped, and
    /// every caller treats a failed statement as retryable (ingest answers 503, delivery and
    /// replays try again).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        let options = url.parse::<PgConnectOptions>()?.options([("jit", "off")]);
        let pools = |max: u32| {
            PgPoolOptions::new()
                .max_connections(max)
                .min_connections(1)
                .acquire_timeout(Duration::from_secs(2))
                .test_before_acquire(false)
        };
        let pool = pools(max_connections).connect_with(options.clone()).await?;
        let writes = pools(WRITE_CONNECTIONS)
            .connect_with(
                options
                    .clone()
                    .options([("plan_cache_mode", "force_generic_plan")]),
            )
            .await?;
        let by_key = options.options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
        ]);
        let finishes = pools(FINISH_CONNECTIONS)
            .connect_with(by_key.clone())
            .await?;
        let claims = pools(CLAIM_CONNECTIONS).connect_with(by_key).await?;
        Ok(Store {
            pool,
            writes,
            finishes,
            claims,
            selected: Arc::default(),
        })
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
        self.finishes.close().await;
        self.claims.close().await;
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

    /// Source ids by name (for the shell commands).
    pub async fn source_id(&self, name: &str) -> Result<Option<i32>> {
        Ok(sqlx::query_scalar("SELECT id FROM sources WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?)
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

/// Which name table [`Store::name_ids`] fills.
#[derive(Debug, Clone, Copy)]
pub enum NameTable {
    Sources,
    Destinations,
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use sqlx::{Connection, PgConnection};

    use super::*;
    use crate::testkit::TestDatabase;

    /// Whether Postgres JIT-compiled a statement it was made to plan as costly as a claim
    /// against a deep queue.
    async fn compiled<'c, E>(executor: E) -> bool
    where
        E: sqlx::PgExecutor<'c>,
    {
        let plan: String = sqlx::query_scalar(
            "EXPLAIN (ANALYZE, FORMAT JSON) \
             SELECT sum(x * 2 + 1) FROM generate_series(1, 1000) x",
        )
        .fetch_one(executor)
        .await
        .map(|plan: serde_json::Value| plan.to_string())
        .expect("an explained statement");
        plan.contains("\"JIT\"")
    }

    /// No pool of the store lets Postgres JIT-compile. A claim against a deep queue is planned
    /// as costly (Postgres cannot know how few runs `LIMIT` leaves), and once the queue was deep
    /// enough each claim spent 40 to 60 ms compiling itself: delivery fell to 1,000 events a
    /// second and, the queue growing, stayed there.
    #[tokio::test]
    async fn no_connection_compiles_its_statements() {
        let db = TestDatabase::create("no_jit").await;
        db.scalar(&format!(
            "ALTER DATABASE {} SET jit_above_cost = 0",
            server::quote_identifier(&db.name)
        ))
        .await;
        let mut plain = PgConnection::connect(&db.url).await.unwrap();
        let available: bool = sqlx::query_scalar("SELECT pg_jit_available()")
            .fetch_one(&mut plain)
            .await
            .unwrap();
        assert_eq!(
            compiled(&mut plain).await,
            available,
            "a plain connection compiles when the server can"
        );

        let store = Store::connect(&db.url, 2).await.unwrap();
        for (name, pool) in [
            ("main", &store.pool),
            ("writes", &store.writes),
            ("finishes", &store.finishes),
            ("claims", &store.claims),
        ] {
            assert!(
                !compiled(pool).await,
                "the {name} pool compiled a statement"
            );
        }
        store.close().await;
    }
}
