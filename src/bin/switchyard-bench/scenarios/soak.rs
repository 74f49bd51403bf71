//! `soak` (not in the default set): `--soak-minutes` (default ten) at 70% of `deliver-e2e`'s
//! sustained rate, with throughput, latency, table sizes and RSS per minute. Flat means:
//! - every minute's delivered rate within 10% of the offered rate;
//! - every minute's p99 under 5 s after the first (warm-up: it also delivers what the probe
//!   left queued), and the backlog at each minute's end under 5 s of load;
//! - the queue (`jobs`) at the end no more than 25% (or 8 MB) above its size after the first
//!   minute: finished work is reclaimed (the archive grows by design, and is reported);
//! - RSS at the end within 5 MB of the second minute's (after warm-up).
//!
//! Each minute also says what Postgres was waiting on ([`Waits`]), so a spike can be traced.

use std::time::Duration;

use serde_json::Value;

use super::deliver::{self, Plan};
use super::waits::Waits;
use super::{note_log, wait_until, Env};
use crate::events::EventMaker;
use crate::loader::{self, per_sec, Endpoint, Load};
use crate::procfs;
use crate::report::{self, round, Row};
use crate::sink::Sink;
use crate::switchyard::{Role, Webhook};
use crate::timing;

const SHARE_OF_E2E: f64 = 0.7;
/// Measures `deliver-e2e`'s rate first when this run has not.
const PROBE: Plan = Plan {
    saturate_for: Duration::from_secs(14),
    warmup: Duration::from_secs(4),
    max_outstanding: 10_000,
    rate: 2_000.0,
    rate_for: Duration::ZERO,
};
/// Events per request, and connections, of the soak's fixed-rate load.
const SOAK_BATCH: usize = 100;
const SOAK_CONNECTIONS: usize = 16;

/// Live and dead rows of the queue (dead ones are what claims must skip over).
const JOBS_ROWS: &str = r#"
SELECT coalesce(sum(n_live_tup), 0)::bigint, coalesce(sum(n_dead_tup), 0)::bigint
FROM pg_stat_user_tables WHERE relname = 'jobs'
"#;

/// A table's size with its partitions, indexes and TOAST.
const TABLE_BYTES: &str = r#"
SELECT pg_total_relation_size($1::regclass)
     + coalesce((SELECT sum(pg_total_relation_size(i.inhrelid))
                 FROM pg_inherits i WHERE i.inhparent = $1::regclass), 0)::bigint
"#;

pub async fn run(env: &Env, done: &[Row]) -> anyhow::Result<Row> {
    let scenario = "soak";
    let minutes = env.soak_minutes;
    let database = env.database(scenario).await?;
    let sink = Sink::start(1)?;
    let switchyard = env
        .switchyard(
            scenario,
            &database,
            Role::All,
            &[Webhook::new("sink", sink.url(0))],
        )
        .await?;
    let mut row = Row::new(scenario);

    let e2e = done
        .iter()
        .find(|r| r.scenario == "deliver-e2e" && r.error.is_none())
        .map(|r| r.events_per_sec);
    let rate = match (env.soak_rate, e2e) {
        (Some(rate), _) => rate,
        (None, Some(e2e)) => e2e * SHARE_OF_E2E,
        (None, None) => {
            let probe = deliver::saturate(
                env,
                &switchyard,
                &sink,
                &database,
                &["Order Completed"],
                PROBE,
            )
            .await;
            let acked = probe.load.acked;
            wait_until(Duration::from_secs(30), || sink.delivered() >= acked).await;
            probe.delivered_per_sec * SHARE_OF_E2E
        }
    }
    .max(1.0);
    row.set("offered_events_per_sec", round(rate, 1));

    let load = Load::open(
        Endpoint::Batch(SOAK_BATCH),
        SOAK_CONNECTIONS,
        rate,
        Duration::from_secs(minutes * 60),
    )
    .events(EventMaker::single("Order Completed"));
    let started = timing::now_ns();
    let load_start = tokio::time::Instant::now();
    // What the probe delivered to the same sink is not the soak's.
    let delivered_before = sink.delivered();
    let meter = env.meter(&[switchyard.pid], &database, Some(&sink));
    // Each minute's CPU per event too: over an hour, a falling rate at a rising cost per event
    // is Switchyard or Postgres doing more per event; at the same cost, the machine giving less.
    let mut minute_meter = env.meter(&[switchyard.pid], &database, Some(&sink));
    let mut costs = Vec::new();
    let mut busy = Vec::new();
    let running = tokio::spawn(loader::run(switchyard.addr, load));
    let mut connection = database.connect().await?;
    let mut rates = Vec::new();
    let mut p99s = Vec::new();
    let mut events_mb = Vec::new();
    let mut jobs_mb = Vec::new();
    let mut rss = Vec::new();
    let mut live_jobs = Vec::new();
    let mut dead_jobs = Vec::new();
    let mut backlogs = Vec::new();
    let mut waits = Vec::new();
    let mut sampler = Waits::start(&database).await?;
    // Minutes are counted from the load's start, not from the end of the last minute's
    // sampling: otherwise each minute's queries push the next window later, and the last one
    // runs past the end of the load (an hour-long soak's last minute read as a stall).
    let minute = Duration::from_secs(60);
    let mut from = started;
    for index in 1..=minutes as u32 {
        tokio::time::sleep_until(load_start + minute * index).await;
        let to = timing::now_ns();
        let split = minute_meter.finish();
        minute_meter = env.meter(&[switchyard.pid], &database, Some(&sink));
        let delivered = sink.all_arrived_between(from, to);
        rates.push(per_sec(delivered, Duration::from_nanos(to - from)));
        let cost = report::cost_per_event(&split, rates.last().copied().unwrap_or_default());
        costs.push(cost.map_or((0.0, 0.0), |c| (c.switchyard, c.postgres)));
        busy.push(split.switchyard + split.postgres + split.loader + split.sink + split.other);
        p99s.push(sink.all_latencies(from, to).percentile_ms(0.99));
        from = to;
        for (table, sizes) in [("events", &mut events_mb), ("jobs", &mut jobs_mb)] {
            let bytes: i64 = sqlx::query_scalar(TABLE_BYTES)
                .bind(table)
                .fetch_one(&mut connection)
                .await?;
            sizes.push(bytes as f64 / (1024.0 * 1024.0));
        }
        let (live, dead): (i64, i64) = sqlx::query_as(JOBS_ROWS).fetch_one(&mut connection).await?;
        live_jobs.push(live);
        dead_jobs.push(dead);
        rss.push(procfs::rss_mb(switchyard.pid).unwrap_or(0.0));
        let sent = behind(
            &sink,
            delivered_before,
            rate,
            started,
            minute * minutes as u32,
        );
        backlogs.push(sent);
        waits.push(sampler.minute(6).await);
        eprintln!(
            "  soak minute {}: {:.0} events/s, p99 {:.0} ms, backlog {:.0} events, rss {:.1} MB, events {:.1} MB, jobs {:.1} MB ({} live, {} dead rows)",
            rates.len(),
            rates.last().copied().unwrap_or_default(),
            p99s.last().copied().flatten().unwrap_or_default(),
            backlogs.last().copied().unwrap_or_default(),
            rss.last().copied().unwrap_or_default(),
            events_mb.last().copied().unwrap_or_default(),
            jobs_mb.last().copied().unwrap_or_default(),
            live_jobs.last().copied().unwrap_or_default(),
            dead_jobs.last().copied().unwrap_or_default()
        );
        if let (Some((sy, pg)), Some(busy)) = (costs.last(), busy.last()) {
            eprintln!(
                "    cpu that minute: {sy:.1} µs/event Switchyard, {pg:.1} Postgres; machine {busy:.0}% busy"
            );
        }
        if let Some(last) = waits.last() {
            eprintln!("    postgres that minute: {last}");
        }
    }
    drop(sampler);
    let report = running.await?;
    row.cpu = Some(meter.finish());
    let ended = timing::now_ns();
    let acked = report.acked;
    wait_until(Duration::from_secs(30), || sink.delivered() >= acked).await;

    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    let mut broken = Vec::new();
    for (minute, r) in rates.iter().enumerate() {
        if (r - rate).abs() > rate * 0.10 {
            broken.push(format!(
                "minute {}: {r:.0}/s is not within 10% of {rate:.0}/s",
                minute + 1
            ));
        }
    }
    // The first minute is warm-up: it also delivers what the probe left queued, whose latency
    // counts from the probe's send. From the second minute on, p99 is the soak's own.
    for (minute, p99) in p99s.iter().enumerate().skip(1) {
        if p99.is_none_or(|p| p > 5_000.0) {
            broken.push(format!("minute {}: p99 {p99:?} ms is over 5 s", minute + 1));
        }
    }
    for (minute, backlog) in backlogs.iter().enumerate() {
        if *backlog > rate * 5.0 {
            broken.push(format!(
                "minute {}: {backlog:.0} events behind (over 5 s of load)",
                minute + 1
            ));
        }
    }
    let growth = |sizes: &[f64]| match (sizes.first(), sizes.last()) {
        (Some(first), Some(last)) if *first > 0.0 => (last - first) / first * 100.0,
        _ => 0.0,
    };
    let (events_growth, jobs_growth) = (growth(&events_mb), growth(&jobs_mb));
    if let (Some(first), Some(last)) = (jobs_mb.first(), jobs_mb.last()) {
        if jobs_growth > 25.0 && last - first > 8.0 {
            broken.push(format!("jobs grew from {first:.1} MB to {last:.1} MB"));
        }
    }
    if let (Some(warm), Some(last)) = (rss.get(1).or(rss.first()), rss.last()) {
        if last - warm > 5.0 {
            broken.push(format!("RSS grew from {warm:.1} MB to {last:.1} MB"));
        }
    }
    row.events_per_sec = mean;
    (row.p50_ms, row.p99_ms) = sink.all_latencies(started, ended).p50_p99();
    row.set("per_minute_events_per_sec", series(&rates, 0));
    row.set(
        "per_minute_p99_ms",
        p99s.iter()
            .map(|p| p.map_or(Value::Null, |v| round(v, 1)))
            .collect::<Vec<_>>(),
    );
    row.set("per_minute_events_mb", series(&events_mb, 1));
    row.set("per_minute_jobs_mb", series(&jobs_mb, 1));
    row.set("per_minute_rss_mb", series(&rss, 0));
    row.set("per_minute_jobs_live_rows", live_jobs);
    row.set("per_minute_jobs_dead_rows", dead_jobs);
    row.set("events_size_growth_pct", round(events_growth, 1));
    row.set("jobs_size_growth_pct", round(jobs_growth, 1));
    row.set("per_minute_backlog_events", series(&backlogs, 0));
    row.set("per_minute_postgres", waits);
    row.set(
        "per_minute_cpu_us_per_event_switchyard",
        series(&costs.iter().map(|c| c.0).collect::<Vec<_>>(), 1),
    );
    row.set(
        "per_minute_cpu_us_per_event_postgres",
        series(&costs.iter().map(|c| c.1).collect::<Vec<_>>(), 1),
    );
    row.set("per_minute_machine_busy_pct", series(&busy, 0));
    row.set("minutes", minutes);
    for rule in &broken {
        eprintln!("  soak not flat: {rule}");
    }
    row.set("flat", broken.is_empty());
    row.set("not_flat", broken);
    if report.failed() > 0 {
        row.set("failures", report.failure_summary());
    }
    note_log(&mut row, &switchyard);
    row.peak_rss_mb = switchyard.stop().await?;
    Ok(row)
}

/// Events sent by now (at the offered rate since `started`, for at most the load's `length`)
/// that the sink has not seen yet: the backlog. `before` is what the sink had seen when the
/// load began.
fn behind(sink: &Sink, before: u64, rate: f64, started: u64, length: Duration) -> f64 {
    let elapsed = Duration::from_nanos(timing::now_ns().saturating_sub(started)).min(length);
    let delivered = sink.delivered().saturating_sub(before);
    (rate * elapsed.as_secs_f64() - delivered as f64).max(0.0)
}

fn series(values: &[f64], digits: i32) -> Vec<Value> {
    values.iter().map(|v| round(*v, digits)).collect()
}
