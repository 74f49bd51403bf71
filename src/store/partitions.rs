//! Day partitions of `events`: made days ahead, dropped once past their use, with DDL that
//! never waits long for a lock; and the one repair a commit may need.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::PgConnection;
use time::OffsetDateTime;

use super::{Result, Store, StoreError};

/// Advisory lock key: partition upkeep, one instance at a time.
const UPKEEP_LOCK: i64 = 0x5357_0002;

/// How long partition DDL may wait for a lock before it gives up until the next pass.
const DDL_LOCK_TIMEOUT: &str = "SET lock_timeout = '50ms'";

const SECONDS_PER_DAY: i64 = 86_400;

/// Storage parameter of an archive day. A day is only ever inserted into, then dropped whole:
/// insert-driven autovacuum would read its newest pages again and rewrite them to set their
/// visibility bits, all day long, on the table ingest writes to. Postgres still vacuums a day
/// that lives long enough to near transaction ID wraparound (`autovacuum_freeze_max_age`). A
/// day also takes the statistics targets of `events` (migration 0007): Postgres analyzes it
/// from 3,000 rows instead of 30,000 random pages of a day larger than memory. In an hour's
/// soak each of the two stalled delivery once the day held 13 to 15 GB.
/// Spelled as `pg_class.reloptions` lists it: a day without it there has not been given its
/// settings yet.
const ARCHIVE_DAY_OPTIONS: &str = "autovacuum_vacuum_insert_threshold=-1";

/// The column clauses giving a day the statistics targets `events` declares.
const PARENT_STATISTICS: &str = "\
SELECT coalesce(string_agg(format(', ALTER COLUMN %I SET STATISTICS %s', attname, attstattarget), ''), '')
FROM pg_attribute
WHERE attrelid = 'events'::regclass AND attnum > 0 AND NOT attisdropped AND attstattarget >= 0";

/// The UTC day number (days since the epoch) of now.
pub fn today() -> i32 {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    (seconds / SECONDS_PER_DAY) as i32
}

/// UTC day number of a time.
pub(super) fn day_of(time: OffsetDateTime) -> i32 {
    time.unix_timestamp().div_euclid(SECONDS_PER_DAY) as i32
}

impl Store {
    /// Partition upkeep, one process at a time: creates the day partitions of today and the
    /// next two days, gives days an older process made the archive's storage parameters, and
    /// drops archive days older than `retention` (and than yesterday: the dedup window) that
    /// no queued run refers to. Each DDL statement waits at most 50 ms for its lock; one that
    /// cannot get it is skipped until the next pass (days are made ahead, so a skipped pass
    /// costs nothing), so a reader holding a lock never stalls ingest.
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
        create_day(&mut conn, day).await?;
        // A settled day is left alone: its `ALTER` would wait on any vacuum of the day and
        // make every connection plan its statements on it again.
        if !day_partitions(&mut conn).await?.contains(&(day, true)) {
            set_day_options(&mut conn, day).await?;
        }
        Ok(())
    }
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
    let partitions = day_partitions(conn).await?;
    let existing: Vec<i32> = partitions.iter().map(|&(day, _)| day).collect();
    // Days made below, by a pass whose settings timed out, or by an older process during a
    // rolling upgrade (migration 0007 set the days before it).
    let mut unsettled: Vec<i32> = partitions
        .iter()
        .filter(|(_, settled)| !settled)
        .map(|&(day, _)| day)
        .collect();
    for d in day..=day + 2 {
        if existing.contains(&d) {
            continue;
        }
        match create_day(conn, d).await {
            Ok(()) => {
                report.created += 1;
                unsettled.push(d);
            }
            Err(error) if is_lock_timeout(&error) => report.deferred += 1,
            Err(error) => return Err(error),
        }
    }
    for d in unsettled {
        match set_day_options(conn, d).await {
            Ok(()) => {}
            Err(error) if is_lock_timeout(&error) => report.deferred += 1,
            Err(error) => return Err(error),
        }
    }
    // An archive day goes once all of it is older than the retention and no run needs it.
    // Today and yesterday stay whatever the retention: their messageIds are the dedup window.
    // A retention past `i32::MAX` days (the config takes any duration) keeps every day.
    let retention_days = i32::try_from(retention.as_secs().div_ceil(SECONDS_PER_DAY as u64))
        .unwrap_or(i32::MAX)
        .max(1);
    for old in existing {
        if old >= day.saturating_sub(retention_days) {
            continue;
        }
        let needed: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE day = $1)")
            .bind(old)
            .fetch_one(&mut *conn)
            .await?;
        if needed {
            continue;
        }
        match drop_day(conn, old).await {
            Ok(()) => report.dropped_days += 1,
            Err(error) if is_lock_timeout(&error) => report.deferred += 1,
            Err(error) => return Err(error),
        }
    }
    Ok(report)
}

/// The days of the archive's partitions (`events_d<day>`), each with whether it has been given
/// its settings ([`set_day_options`]).
async fn day_partitions(conn: &mut PgConnection) -> Result<Vec<(i32, bool)>> {
    let rows: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, coalesce($1 = ANY (c.reloptions), false) \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'events'::regclass",
    )
    .bind(ARCHIVE_DAY_OPTIONS)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(name, options)| Some((name.strip_prefix("events_d")?.parse().ok()?, options)))
        .collect())
}

async fn create_day(conn: &mut PgConnection, day: i32) -> Result<()> {
    ddl(
        conn,
        &format!(
            "CREATE TABLE IF NOT EXISTS events_d{day} PARTITION OF events \
             FOR VALUES FROM ({day}) TO ({next})",
            next = day + 1
        ),
    )
    .await
}

/// Gives a day [`ARCHIVE_DAY_OPTIONS`] and the statistics targets of `events` (which a new
/// partition does not inherit), in one statement: a day with the option has both.
async fn set_day_options(conn: &mut PgConnection, day: i32) -> Result<()> {
    let statistics: String = sqlx::query_scalar(PARENT_STATISTICS)
        .fetch_one(&mut *conn)
        .await?;
    ddl(
        conn,
        &format!("ALTER TABLE events_d{day} SET ({ARCHIVE_DAY_OPTIONS}){statistics}"),
    )
    .await
}

async fn drop_day(conn: &mut PgConnection, day: i32) -> Result<()> {
    ddl(conn, &format!("DROP TABLE IF EXISTS events_d{day}")).await
}

// Statements naming a partition are not kept prepared: each names a different table.
async fn ddl(conn: &mut PgConnection, sql: &str) -> Result<()> {
    sqlx::query(sql)
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
