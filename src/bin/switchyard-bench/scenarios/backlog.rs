//! `backlog-drain`: 1,000,000 events queued while no worker runs (`--role ingest`, batches
//! through the API), then one `--role worker` process drains them to a webhook with
//! `batch_size` 100. The drain is timed from the worker's start to the last event at the sink;
//! peak RSS is the worker's.

use std::time::{Duration, Instant};

use anyhow::ensure;

use super::{note_log, wait_until, Env};
use crate::events::EventMaker;
use crate::loader::{self, per_sec, Endpoint, Load};
use crate::procfs;
use crate::report::{round, Row};
use crate::sink::Sink;
use crate::switchyard::{Role, Switchyard, Webhook};

const BACKLOG: u64 = 1_000_000;
const FILL_BATCH: usize = 500;
const FILL_CONNECTIONS: usize = 8;
const FILL_LIMIT: Duration = Duration::from_secs(150);
/// The drain is given up on after this long (the rate is then what it got through).
const DRAIN_LIMIT: Duration = Duration::from_secs(200);

pub async fn run(env: &Env) -> anyhow::Result<Row> {
    let scenario = "backlog-drain";
    let database = env.database(scenario).await?;
    let sink = Sink::start(1)?;
    let webhooks = [Webhook::new("sink", sink.url(0)).batch_size(100)];
    let mut row = Row::new(scenario);

    let ingest = env
        .switchyard(scenario, &database, Role::Ingest, &webhooks)
        .await?;
    let fill = Load::fill(
        Endpoint::Batch(FILL_BATCH),
        FILL_CONNECTIONS,
        BACKLOG,
        FILL_LIMIT,
    )
    .events(EventMaker::single("Order Completed"));
    let fill = loader::run(ingest.addr, fill).await;
    ensure!(
        fill.acked == BACKLOG,
        "the backlog was not accepted in {FILL_LIMIT:?}: {} of {BACKLOG} ({})",
        fill.acked,
        fill.failure_summary()
    );
    row.set("fill_events_per_sec", round(fill.events_per_sec(), 1));
    let ingest_peak = ingest.stop().await?;
    row.set(
        "fill_peak_rss_mb",
        ingest_peak.map_or(0.0, |mb| (mb * 10.0).round() / 10.0),
    );

    let started = Instant::now();
    let worker = env
        .switchyard(scenario, &database, Role::Worker, &webhooks)
        .await?;
    let meter = env.meter(&[worker.pid], &database, Some(&sink));
    let rss = track_rss(&worker, || sink.delivered() >= BACKLOG).await;
    let drained = sink.delivered();
    let took = started.elapsed();
    row.cpu = Some(meter.finish());
    row.events_per_sec = per_sec(drained, took);
    row.set("drained", drained);
    row.set("drain_seconds", round(took.as_secs_f64(), 2));
    row.set("max_rss_mb_sampled", round(rss, 1));
    if drained < BACKLOG {
        row.error = Some(format!(
            "drained {drained} of {BACKLOG} within {DRAIN_LIMIT:?}"
        ));
    }
    note_log(&mut row, &worker);
    row.peak_rss_mb = worker.stop().await?;
    Ok(row)
}

/// Waits until `done` (or [`DRAIN_LIMIT`]), sampling the worker's RSS; returns the largest
/// sample in MB.
async fn track_rss(worker: &Switchyard, mut done: impl FnMut() -> bool) -> f64 {
    let mut largest: f64 = 0.0;
    let deadline = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < deadline {
        largest = largest.max(procfs::rss_mb(worker.pid).unwrap_or(0.0));
        if wait_until(Duration::from_millis(500), &mut done).await {
            break;
        }
    }
    largest
}
