//! `ingest-single` and `ingest-batch`: intake alone. Switchyard runs with `--role ingest` and one
//! webhook configured, so every accepted event is stored and queued for it (a durable 200
//! means both are committed) and nothing is delivered.

use std::time::Duration;

use super::{note_log, Env};
use crate::events::EventMaker;
use crate::loader::{self, Endpoint, Load};
use crate::report::{round, Row};
use crate::sink::Sink;
use crate::switchyard::{Role, Webhook};

const DURATION: Duration = Duration::from_secs(17);
const WARMUP: Duration = Duration::from_secs(2);

/// `/v1/track`, one event a request, 64 connections.
pub async fn single(env: &Env) -> anyhow::Result<Row> {
    intake(env, "ingest-single", Endpoint::Track, 64).await
}

/// `/v1/batch`, 100 events a request, 16 connections.
pub async fn batch(env: &Env) -> anyhow::Result<Row> {
    intake(env, "ingest-batch", Endpoint::Batch(100), 16).await
}

async fn intake(
    env: &Env,
    scenario: &str,
    endpoint: Endpoint,
    connections: usize,
) -> anyhow::Result<Row> {
    let database = env.database(scenario).await?;
    let sink = Sink::start(1)?;
    let switchyard = env
        .switchyard(
            scenario,
            &database,
            Role::Ingest,
            &[Webhook::new("sink", sink.url(0))],
        )
        .await?;
    let load = Load::closed(endpoint, connections, DURATION)
        .warmup(WARMUP)
        .events(EventMaker::single("Order Completed"));
    let running = tokio::spawn(loader::run(switchyard.addr, load));
    tokio::time::sleep(WARMUP).await;
    let meter = env.meter(&[switchyard.pid], &database, Some(&sink));
    let mut report = running.await?;
    let cpu = meter.finish();

    let mut connection = database.connect().await?;
    let queued: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(cardinality(event_ids)), 0)::bigint FROM jobs")
            .fetch_one(&mut connection)
            .await?;

    let mut row = Row::new(scenario);
    row.events_per_sec = report.events_per_sec();
    (row.p50_ms, row.p99_ms) = report.latencies.p50_p99();
    row.cpu = Some(cpu);
    row.set(
        "requests_per_sec",
        round(loader::per_sec(report.window_requests, report.window), 1),
    );
    row.set("connections", connections);
    row.set("acked_events", report.acked);
    row.set("queued_events", queued);
    if report.failed() > 0 {
        row.set("failures", report.failure_summary());
    }
    if (queued as u64) < report.acked {
        row.error = Some(format!(
            "{} events were acknowledged but only {queued} are queued",
            report.acked
        ));
    }
    note_log(&mut row, &switchyard);
    row.peak_rss_mb = switchyard.stop().await?;
    Ok(row)
}
