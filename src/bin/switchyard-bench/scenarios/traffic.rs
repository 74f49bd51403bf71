//! Traffic control: `noisy-neighbor` (one rate-limit key's backlog must not delay another key)
//! and `rate-limit-accuracy` (limits hold in total across two processes on one database).

use std::time::Duration;

use anyhow::ensure;

use super::{count_missing, note_log, wait_until, Env};
use crate::events::EventMaker;
use crate::loader::{self, per_sec, Endpoint, Load};
use crate::report::{round, Row};
use crate::sink::Sink;
use crate::switchyard::{Role, Webhook};
use crate::timing;

/// The noisy key's backlog and limit, and the quiet key's offered load.
const NOISY_BACKLOG: u64 = 100_000;
const NOISY_LIMIT: &str = "100/s";
const QUIET_LIMIT: &str = "1000/s";
const QUIET_RATE: f64 = 20.0;
const QUIET_FOR: Duration = Duration::from_secs(20);
/// How long a quiet event may take to arrive before it counts as stuck.
const QUIET_SETTLE: Duration = Duration::from_secs(15);

/// Backlogs are filled with batches of this many events.
const FILL_BATCH: usize = 500;
const FILL_CONNECTIONS: usize = 8;
const FILL_LIMIT: Duration = Duration::from_secs(120);

/// The keys of `rate-limit-accuracy`, in requests (= events, batch size 1) per second.
const LIMITS: [u64; 3] = [50, 200, 1_000];
/// Steady state begins this long after the backlog is in, and is measured for this long.
const RAMP: Duration = Duration::from_secs(3);
const STEADY: Duration = Duration::from_secs(30);
/// Each key's backlog lasts this many seconds at its limit (more than ramp + steady + fill).
const BACKLOG_SECONDS: u64 = 48;

pub async fn noisy_neighbor(env: &Env) -> anyhow::Result<Row> {
    let scenario = "noisy-neighbor";
    let database = env.database(scenario).await?;
    let sink = Sink::start(2)?;
    let webhooks = [
        Webhook::new("noisy", sink.url(0))
            .events(&["Noisy Event"])
            .rate_limit(NOISY_LIMIT),
        Webhook::new("quiet", sink.url(1))
            .events(&["Quiet Event"])
            .rate_limit(QUIET_LIMIT),
    ];
    let switchyard = env
        .switchyard(scenario, &database, Role::All, &webhooks)
        .await?;
    let mut row = Row::new(scenario);

    let fill = Load::fill(
        Endpoint::Batch(FILL_BATCH),
        FILL_CONNECTIONS,
        NOISY_BACKLOG,
        FILL_LIMIT,
    )
    .events(EventMaker::single("Noisy Event"));
    let fill = loader::run(switchyard.addr, fill).await;
    ensure!(
        fill.acked == NOISY_BACKLOG,
        "the noisy backlog was not accepted: {} of {NOISY_BACKLOG} ({})",
        fill.acked,
        fill.failure_summary()
    );
    row.set("fill_events_per_sec", round(fill.events_per_sec(), 1));

    let from = timing::now_ns();
    let meter = env.meter(&[switchyard.pid], &database, Some(&sink));
    let quiet = Load::open(Endpoint::Track, 2, QUIET_RATE, QUIET_FOR)
        .events(EventMaker::single("Quiet Event"));
    let quiet = loader::run(switchyard.addr, quiet).await;
    let to = timing::now_ns();
    row.cpu = Some(meter.finish());
    let window = Duration::from_nanos(to - from);
    let noisy_delivered = sink.arrived_between(0, from, to);
    let quiet_delivered = sink.arrived_between(1, from, to);

    let acked = quiet.acked;
    wait_until(QUIET_SETTLE, || {
        sink.latencies(1, from, to).len() as u64 >= acked
    })
    .await;
    let mut latencies = sink.latencies(1, from, to);
    let missing = acked.saturating_sub(latencies.len() as u64);
    if missing > 0 {
        row.set("quiet_undelivered", missing);
        count_missing(&mut latencies, missing, QUIET_SETTLE);
    }
    (row.p50_ms, row.p99_ms) = latencies.p50_p99();
    row.events_per_sec = per_sec(noisy_delivered + quiet_delivered, window);
    row.set("noisy_backlog", NOISY_BACKLOG);
    row.set(
        "noisy_events_per_sec",
        round(per_sec(noisy_delivered, window), 1),
    );
    row.set(
        "quiet_events_per_sec",
        round(per_sec(quiet_delivered, window), 1),
    );
    row.set("quiet_samples", latencies.len());
    if quiet.failed() > 0 {
        row.set("failures", quiet.failure_summary());
    }
    note_log(&mut row, &switchyard);
    row.peak_rss_mb = switchyard.stop().await?;
    Ok(row)
}

pub async fn rate_limit_accuracy(env: &Env) -> anyhow::Result<Row> {
    let scenario = "rate-limit-accuracy";
    let database = env.database(scenario).await?;
    let sink = Sink::start(LIMITS.len())?;
    let webhooks: Vec<Webhook> = LIMITS
        .iter()
        .enumerate()
        .map(|(i, limit)| {
            let name = format!("Rate {limit}");
            Webhook::new(format!("key-{limit}"), sink.url(i))
                .events(&[name.as_str()])
                .rate_limit(&format!("{limit}/s"))
        })
        .collect();
    let first = env
        .switchyard("rate-limit-accuracy-a", &database, Role::All, &webhooks)
        .await?;
    let second = env
        .switchyard("rate-limit-accuracy-b", &database, Role::All, &webhooks)
        .await?;
    let mut row = Row::new(scenario);

    // Names repeat in proportion to the limits, so each key's backlog lasts as long.
    let unit = LIMITS[0];
    let names: Vec<String> = LIMITS
        .iter()
        .flat_map(|limit| std::iter::repeat_n(format!("Rate {limit}"), (limit / unit) as usize))
        .collect();
    let total = LIMITS.iter().sum::<u64>() * BACKLOG_SECONDS;
    let fill = Load::fill(Endpoint::Batch(names.len() * 10), 4, total, FILL_LIMIT)
        .events(EventMaker::new(names));
    let fill = loader::run(first.addr, fill).await;
    ensure!(
        fill.acked == total,
        "the backlog was not accepted: {} of {total} ({})",
        fill.acked,
        fill.failure_summary()
    );

    tokio::time::sleep(RAMP).await;
    let from = timing::now_ns();
    let meter = env.meter(&[first.pid, second.pid], &database, Some(&sink));
    tokio::time::sleep(STEADY).await;
    let to = timing::now_ns();
    row.cpu = Some(meter.finish());

    let mut max_error: f64 = 0.0;
    let mut delivered = 0;
    for (i, limit) in LIMITS.iter().enumerate() {
        let count = sink.arrived_between(i, from, to);
        delivered += count;
        let measured = per_sec(count, STEADY);
        let error = (measured - *limit as f64).abs() / *limit as f64 * 100.0;
        max_error = max_error.max(error);
        row.set(&format!("key_{limit}_per_sec"), round(measured, 2));
        row.set(&format!("key_{limit}_error_pct"), round(error, 2));
        let backlog = total * limit / LIMITS.iter().sum::<u64>();
        if sink.channel_delivered(i) >= backlog {
            row.error = Some(format!(
                "key {limit}/s ran out of backlog during the window"
            ));
        }
    }
    row.events_per_sec = per_sec(delivered, STEADY);
    row.set("max_error_pct", round(max_error, 2));
    row.set("steady_seconds", STEADY.as_secs());
    row.set("processes", 2);
    let lines = first.log_lines() + second.log_lines();
    if lines > 0 {
        row.set("switchyard_log_lines", lines);
    }
    let peaks = [first.stop().await?, second.stop().await?];
    row.peak_rss_mb = peaks.iter().flatten().copied().reduce(f64::max);
    row.set(
        "peak_rss_mb_each",
        peaks
            .iter()
            .map(|p| p.map_or(serde_json::Value::Null, |mb| round(mb, 1)))
            .collect::<Vec<_>>(),
    );
    Ok(row)
}
