//! `deliver-e2e`, `deliver-batched` and `scale`: ingest → queue → webhook → sink, measured two
//! ways in one run.
//!
//! Sustained throughput: batches go in closed-loop over the whole pipeline (the loader holds
//! back while too many acknowledged events have not reached the sink), so ingest runs exactly
//! as fast as delivery and the figure is the delivered rate over the window, not a backlog
//! being filled. Latency: once the queue is empty, single `/v1/track` events on a fixed
//! schedule (2,000 events/s), each timed from its scheduled send to its arrival at the sink.

use std::time::Duration;

use super::{count_missing, note_log, wait_until, Env};
use crate::database::Database;
use crate::events::EventMaker;
use crate::loader::{self, Endpoint, Load, LoadReport, Throttle};
use crate::procfs::CpuSplit;
use crate::report::{round, Row};
use crate::sink::Sink;
use crate::switchyard::{Role, Switchyard, Webhook};
use crate::timing::{self, Latencies};

/// How one delivery run is sized.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub saturate_for: Duration,
    pub warmup: Duration,
    /// Acknowledged events allowed to be on their way to the sink at once.
    pub max_outstanding: u64,
    /// Events per second of the latency phase.
    pub rate: f64,
    pub rate_for: Duration,
}

impl Plan {
    const E2E: Plan = Plan {
        saturate_for: Duration::from_secs(20),
        warmup: Duration::from_secs(4),
        max_outstanding: 10_000,
        rate: 2_000.0,
        rate_for: Duration::from_secs(12),
    };
    const BATCHED: Plan = Plan {
        max_outstanding: 60_000,
        ..Plan::E2E
    };
    const SCALE: Plan = Plan {
        saturate_for: Duration::from_secs(14),
        warmup: Duration::from_secs(4),
        rate_for: Duration::from_secs(8),
        ..Plan::E2E
    };
}

/// Batches of this many events feed the saturation phase, from this many connections.
const INGEST_BATCH: usize = 100;
const INGEST_CONNECTIONS: usize = 4;
/// Connections of the fixed-rate phase (enough that the schedule never waits for one).
const RATE_CONNECTIONS: usize = 32;
/// How long acknowledged events may take to show up at the sink after a phase.
const SETTLE: Duration = Duration::from_secs(20);

pub async fn e2e(env: &Env) -> anyhow::Result<Row> {
    let webhooks = |sink: &Sink| vec![Webhook::new("sink", sink.url(0))];
    measure(
        env,
        "deliver-e2e",
        webhooks,
        &["Order Completed"],
        Plan::E2E,
    )
    .await
}

pub async fn batched(env: &Env) -> anyhow::Result<Row> {
    let webhooks = |sink: &Sink| vec![Webhook::new("sink", sink.url(0)).batch_size(100)];
    measure(
        env,
        "deliver-batched",
        webhooks,
        &["Order Completed"],
        Plan::BATCHED,
    )
    .await
}

/// `deliver-e2e` with 1, 10, 100 and 1,000 destinations (each event matches one of them by
/// its name), and with 10,000 destinations on 10,000 distinct rate-limit keys.
pub async fn scale(env: &Env) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (label, count, limited) in [
        ("scale-1", 1, false),
        ("scale-10", 10, false),
        ("scale-100", 100, false),
        ("scale-1000", 1_000, false),
        ("scale-10000-keys", 10_000, true),
    ] {
        let names: Vec<String> = (0..count).map(|i| format!("Scale {i}")).collect();
        let webhooks = |sink: &Sink| {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let webhook =
                        Webhook::new(format!("dest-{i}"), sink.url(0)).events(&[name.as_str()]);
                    if limited {
                        webhook
                            .rate_limit("1000/s")
                            .rate_limit_key(format!("key-{i}"))
                    } else {
                        webhook
                    }
                })
                .collect()
        };
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut row = match measure(env, label, webhooks, &names, Plan::SCALE).await {
            Ok(row) => row,
            Err(error) => Row::failed(label, &error),
        };
        row.set("destinations", count);
        row.set("rate_limit_keys", if limited { count } else { 0 });
        rows.push(row);
    }
    Ok(rows)
}

async fn measure(
    env: &Env,
    scenario: &str,
    webhooks: impl Fn(&Sink) -> Vec<Webhook>,
    names: &[&str],
    plan: Plan,
) -> anyhow::Result<Row> {
    let database = env.database(scenario).await?;
    let sink = Sink::start(1)?;
    let switchyard = env
        .switchyard(scenario, &database, Role::All, &webhooks(&sink))
        .await?;
    let mut row = Row::new(scenario);

    let saturation = saturate(env, &switchyard, &sink, &database, names, plan).await;
    row.events_per_sec = saturation.delivered_per_sec;
    row.cpu = Some(saturation.cpu);
    row.set(
        "ingest_events_per_sec",
        round(saturation.load.events_per_sec(), 1),
    );
    if saturation.load.failed() > 0 {
        row.set("failures", saturation.load.failure_summary());
    }
    let requests = sink.channel_requests(0);
    if requests > 0 {
        row.set(
            "events_per_sink_request",
            round(sink.delivered() as f64 / requests as f64, 1),
        );
    }
    let acked = saturation.load.acked;
    if !wait_until(SETTLE, || sink.delivered() >= acked).await {
        row.set(
            "undelivered_after_saturation",
            acked.saturating_sub(sink.delivered()),
        );
    }
    let delivered_before = sink.delivered();

    let (mut latencies, mut report) = at_rate(&switchyard, &sink, names, plan).await;
    let missing = report
        .acked
        .saturating_sub(sink.delivered().saturating_sub(delivered_before));
    if missing > 0 {
        row.set("undelivered_at_rate", missing);
        count_missing(&mut latencies, missing, SETTLE);
    }
    (row.p50_ms, row.p99_ms) = latencies.p50_p99();
    row.set("latency_at_events_per_sec", plan.rate);
    row.set("latency_samples", latencies.len());
    if let Some(p99) = report.latencies.percentile_ms(0.99) {
        row.set("ingest_p99_ms_at_rate", round(p99, 2));
    }
    if report.failed() > 0 {
        row.set("failures_at_rate", report.failure_summary());
    }
    note_log(&mut row, &switchyard);
    row.peak_rss_mb = switchyard.stop().await?;
    Ok(row)
}

/// What the saturation phase measured.
pub struct Saturation {
    pub delivered_per_sec: f64,
    pub cpu: CpuSplit,
    pub load: LoadReport,
}

/// Runs ingest closed-loop over the pipeline for `plan.saturate_for`; the delivered rate is
/// counted at the sink after the warmup.
pub async fn saturate(
    env: &Env,
    switchyard: &Switchyard,
    sink: &Sink,
    database: &Database,
    names: &[&str],
    plan: Plan,
) -> Saturation {
    let load = Load::closed(
        Endpoint::Batch(INGEST_BATCH),
        INGEST_CONNECTIONS,
        plan.saturate_for,
    )
    .warmup(plan.warmup)
    .events(EventMaker::new(names.iter().copied()))
    .throttle(Throttle {
        delivered: sink.delivered_counter(),
        max_outstanding: plan.max_outstanding,
    });
    let running = tokio::spawn(loader::run(switchyard.addr, load));
    tokio::time::sleep(plan.warmup).await;
    let from = timing::now_ns();
    let meter = env.meter(&[switchyard.pid], database, Some(sink));
    tokio::time::sleep(plan.saturate_for.saturating_sub(plan.warmup)).await;
    let to = timing::now_ns();
    let cpu = meter.finish();
    let load = running.await.unwrap_or_else(|error| {
        let mut report = LoadReport::default();
        report.failures.insert(format!("task: {error}"), 1);
        report
    });
    let delivered = sink.all_arrived_between(from, to);
    Saturation {
        delivered_per_sec: loader::per_sec(delivered, Duration::from_nanos(to - from)),
        cpu,
        load,
    }
}

/// Single events at `plan.rate` for `plan.rate_for`; their ingest-to-sink latencies once they
/// arrived (or [`SETTLE`] passed).
async fn at_rate(
    switchyard: &Switchyard,
    sink: &Sink,
    names: &[&str],
    plan: Plan,
) -> (Latencies, LoadReport) {
    let delivered_before = sink.delivered();
    let from = timing::now_ns();
    let load = Load::open(Endpoint::Track, RATE_CONNECTIONS, plan.rate, plan.rate_for)
        .events(EventMaker::new(names.iter().copied()));
    let report = loader::run(switchyard.addr, load).await;
    let to = timing::now_ns();
    let acked = report.acked;
    wait_until(SETTLE, || {
        sink.delivered().saturating_sub(delivered_before) >= acked
    })
    .await;
    (sink.all_latencies(from, to), report)
}
