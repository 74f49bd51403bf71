//! `postgres-baseline`: what Postgres alone does on this machine, the limit every other
//! scenario is divided by.
//!
//! COPY: the same ~400-byte events, in binary COPY, into a plain table shaped like Switchyard's
//! `events`, from four connections (two per core, so Postgres never waits for the next chunk) in chunks of 5,000 rows, each its own
//! transaction. Drain: a jobs-like table with one row per copied event, claimed in batches of
//! 100 with `FOR UPDATE SKIP LOCKED` (claiming pushes `run_at` past a lease and returns the
//! event's payload, as Switchyard's claim does) and completed with a batched `DELETE`, by four
//! workers until it is empty. Commit: the same events as single-row `INSERT`s, each its own
//! transaction (so its own WAL flush), from sixteen connections, as a naive service writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use sqlx::{Connection as _, PgConnection, Row as _};

use super::Env;
use crate::database::Database;
use crate::events::{timestamp_now, EventMaker};
use crate::loader::per_sec;
use crate::report::{round, Row};
use crate::timing;

const COPY_FOR: Duration = Duration::from_secs(8);
const COPY_STREAMS: usize = 4;
const COPY_CHUNK: u64 = 5_000;
const DRAIN_JOBS: i64 = 200_000;
const DRAINERS: usize = 4;
const CLAIM_BATCH: i64 = 100;
const COMMIT_FOR: Duration = Duration::from_secs(8);
const COMMITTERS: usize = 16;

const SCHEMA: &str = r#"
CREATE TABLE baseline_events (
    id          bigserial PRIMARY KEY,
    source_id   int NOT NULL,
    message_id  text NOT NULL,
    received_at timestamptz NOT NULL,
    payload     bytea NOT NULL
);
CREATE TABLE baseline_jobs (
    id             bigserial PRIMARY KEY,
    event_id       bigint NOT NULL,
    destination_id int NOT NULL,
    run_at         timestamptz NOT NULL,
    attempts       int NOT NULL DEFAULT 0,
    owner          int
);
CREATE INDEX baseline_jobs_due ON baseline_jobs (destination_id, run_at);
"#;

const COPY: &str =
    "COPY baseline_events (source_id, message_id, received_at, payload) FROM STDIN (FORMAT binary)";

const INSERT_ONE: &str =
    "INSERT INTO baseline_events (source_id, message_id, received_at, payload) \
     VALUES (1, $1, now(), $2)";

const QUEUE_JOBS: &str = r#"
INSERT INTO baseline_jobs (event_id, destination_id, run_at)
SELECT id, 1, now() FROM baseline_events ORDER BY id LIMIT $1
"#;

const CLAIM: &str = r#"
WITH due AS (
    SELECT id FROM baseline_jobs
    WHERE destination_id = 1 AND run_at <= now()
    ORDER BY run_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE baseline_jobs j
    SET run_at = now() + interval '40 seconds', attempts = j.attempts + 1, owner = $2
    FROM due
    WHERE j.id = due.id
    RETURNING j.id, j.event_id
)
SELECT c.id, e.message_id, e.payload
FROM claimed c JOIN baseline_events e ON e.id = c.event_id
"#;

const COMPLETE: &str = "DELETE FROM baseline_jobs WHERE id = ANY($1)";

pub async fn run(env: &Env) -> anyhow::Result<Row> {
    let database = env.database("baseline").await?;
    let mut connection = database.connect().await?;
    sqlx::raw_sql(SCHEMA).execute(&mut connection).await?;
    let mut row = Row::new("postgres-baseline");

    let meter = env.meter(&[], &database, None);
    let started = Instant::now();
    let copiers: Vec<_> = (0..COPY_STREAMS)
        .map(|_| tokio::spawn(copy_for(database.clone(), COPY_FOR)))
        .collect();
    let mut copied = 0;
    let mut connections = Vec::new();
    for copier in copiers {
        let (rows, connection) = copier.await.context("a COPY task failed")??;
        copied += rows;
        connections.push(connection);
    }
    let copy_rate = per_sec(copied, started.elapsed());
    // Read before the backends exit, or their CPU time goes with them.
    let copy_cpu = meter.finish();
    close(connections).await;

    let queued = sqlx::query(QUEUE_JOBS)
        .bind(DRAIN_JOBS)
        .execute(&mut connection)
        .await?
        .rows_affected();
    sqlx::query("ANALYZE baseline_jobs")
        .execute(&mut connection)
        .await?;
    let meter = env.meter(&[], &database, None);
    let started = Instant::now();
    let drained = Arc::new(AtomicU64::new(0));
    let drainers: Vec<_> = (0..DRAINERS as i32)
        .map(|owner| tokio::spawn(drain(database.clone(), owner, drained.clone())))
        .collect();
    let mut connections = Vec::new();
    for drainer in drainers {
        connections.push(drainer.await.context("a drain task failed")??);
    }
    let drained = drained.load(Ordering::Relaxed);
    let drain_rate = per_sec(drained, started.elapsed());
    let drain_cpu = meter.finish();
    close(connections).await;

    let meter = env.meter(&[], &database, None);
    let started = Instant::now();
    let committers: Vec<_> = (0..COMMITTERS)
        .map(|_| tokio::spawn(commit_for(database.clone(), COMMIT_FOR)))
        .collect();
    let mut committed = 0;
    let mut connections = Vec::new();
    for committer in committers {
        let (rows, connection) = committer.await.context("an INSERT task failed")??;
        committed += rows;
        connections.push(connection);
    }
    let commit_rate = per_sec(committed, started.elapsed());
    let commit_cpu = meter.finish();
    close(connections).await;

    row.events_per_sec = copy_rate;
    row.cpu = Some(copy_cpu);
    row.set("copy_events_per_sec", round(copy_rate, 1));
    row.set("copy_rows", copied);
    row.set("drain_events_per_sec", round(drain_rate, 1));
    row.set("drain_jobs", drained);
    row.set("drain_cpu_postgres_pct", round(drain_cpu.postgres, 1));
    row.set("drain_cpu_loader_pct", round(drain_cpu.loader, 1));
    row.set("commit_events_per_sec", round(commit_rate, 1));
    row.set("commit_rows", committed);
    row.set("commit_cpu_postgres_pct", round(commit_cpu.postgres, 1));
    row.set("commit_cpu_loader_pct", round(commit_cpu.loader, 1));
    if drained != queued {
        row.error = Some(format!("queued {queued} jobs but drained {drained}"));
    }
    Ok(row)
}

async fn close(connections: Vec<PgConnection>) {
    for connection in connections {
        let _ = connection.close().await;
    }
}

/// COPYs chunks of events until `duration` has passed; returns the rows copied and the
/// connection, still open.
async fn copy_for(database: Database, duration: Duration) -> anyhow::Result<(u64, PgConnection)> {
    let mut connection = database.connect().await?;
    let events = EventMaker::single("Order Completed");
    let started = Instant::now();
    let mut copied = 0;
    let mut buffer = Vec::with_capacity(COPY_CHUNK as usize * 520);
    while started.elapsed() < duration {
        buffer.clear();
        chunk(&events, copied, &mut buffer);
        let mut copy = connection.copy_in_raw(COPY).await?;
        copy.send(buffer.as_slice()).await?;
        copied += copy.finish().await?;
    }
    Ok((copied, connection))
}

/// Inserts one event per statement, each committed on its own, until `duration` has passed;
/// returns the rows inserted and the connection, still open.
async fn commit_for(database: Database, duration: Duration) -> anyhow::Result<(u64, PgConnection)> {
    let mut connection = database.connect().await?;
    let events = EventMaker::single("Order Completed");
    let timestamp = timestamp_now();
    let started = Instant::now();
    let mut inserted = 0;
    let mut payload = Vec::with_capacity(512);
    while started.elapsed() < duration {
        payload.clear();
        events.write_track(&mut payload, inserted, timing::now_ns(), &timestamp);
        sqlx::query(INSERT_ONE)
            .bind(events.message_id(inserted))
            .bind(payload.as_slice())
            .execute(&mut connection)
            .await?;
        inserted += 1;
    }
    Ok((inserted, connection))
}

/// Events `first..first + COPY_CHUNK` in Postgres's binary COPY format.
fn chunk(events: &EventMaker, first: u64, out: &mut Vec<u8>) {
    /// Microseconds from the Unix epoch to Postgres's (2000-01-01).
    const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;
    let received_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
        - POSTGRES_EPOCH_MICROS;
    let timestamp = timestamp_now();
    let sent_ns = timing::now_ns();
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    let mut payload = Vec::with_capacity(512);
    for seq in first..first + COPY_CHUNK {
        payload.clear();
        events.write_track(&mut payload, seq, sent_ns, &timestamp);
        let message_id = events.message_id(seq);
        out.extend_from_slice(&4i16.to_be_bytes());
        out.extend_from_slice(&4i32.to_be_bytes());
        out.extend_from_slice(&1i32.to_be_bytes());
        out.extend_from_slice(&(message_id.len() as i32).to_be_bytes());
        out.extend_from_slice(message_id.as_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&received_at.to_be_bytes());
        out.extend_from_slice(&(payload.len() as i32).to_be_bytes());
        out.extend_from_slice(&payload);
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
}

/// Claims and completes batches until nothing is due; returns the connection, still open.
async fn drain(
    database: Database,
    owner: i32,
    drained: Arc<AtomicU64>,
) -> anyhow::Result<PgConnection> {
    let mut connection: PgConnection = database.connect().await?;
    loop {
        let rows = sqlx::query(CLAIM)
            .bind(CLAIM_BATCH)
            .bind(owner)
            .fetch_all(&mut connection)
            .await?;
        if rows.is_empty() {
            break;
        }
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let payload: Vec<u8> = row.try_get("payload")?;
            anyhow::ensure!(!payload.is_empty(), "a claimed job has no payload");
            ids.push(row.try_get::<i64, _>("id")?);
        }
        sqlx::query(COMPLETE)
            .bind(&ids)
            .execute(&mut connection)
            .await?;
        drained.fetch_add(ids.len() as u64, Ordering::Relaxed);
    }
    Ok(connection)
}
