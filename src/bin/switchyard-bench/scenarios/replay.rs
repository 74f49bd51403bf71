//! `replay` (archive and replay): N events (1,000,000 unless `--replay-events` says less) are
//! archived through a `--role ingest` process that has no destination at all, so nothing is
//! queued. A `--role all` process then starts with a destination added, `target` (a webhook with
//! `batch_size` 100, like `backlog-drain`'s), and `POST /admin/v1/replays` sends it the whole
//! archived range, twice.
//!
//! - **Rate:** the first replay, with no live traffic (as `backlog-drain` drains): replayed
//!   events over the time from the POST to the last of them at the sink, compared with the same
//!   run's `backlog-drain`. A replay makes way for live traffic, so one timed while live events
//!   flow measures how far it stands back, not how fast it streams; that pace is reported too.
//! - **Memory:** the process's peak RSS (it is the one that streams the archive).
//! - **Live traffic first:** single `/v1/track` events to `target` on a fixed schedule
//!   ([`LIVE_RATE`] for [`LIVE_FOR`]), once before the second replay (after [`WARM_UP`]
//!   unmeasured) and once while it runs, timed from the scheduled send to the sink; `p99_ms` is
//!   during the replay, the increase is over the p99 without it; `live_ack_p99_ms` (and
//!   `_without_ms`) time the same events to their `200`, the commit's share. The replay's pace
//!   while they flow is `replay_beside_live_events_per_sec`. A third phase, after the replay,
//!   gives `live_p99_after_ms`: how far two phases without a replay differ on this machine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context as _};
use hyper::Method;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{note_log, wait_until, Env};
use crate::events::EventMaker;
use crate::loader::{self, per_sec, Endpoint, Load};
use crate::procfs;
use crate::report::{round, Row};
use crate::sink::Sink;
use crate::switchyard::{self, Role, Switchyard, Webhook};
use crate::timing::{self, Latencies};

const FILL_BATCH: usize = 500;
const FILL_CONNECTIONS: usize = 8;
const FILL_LIMIT: Duration = Duration::from_secs(150);
/// Live events per second to the replay's destination, and for how long, with and without it.
const LIVE_RATE: f64 = 1_000.0;
const LIVE_FOR: Duration = Duration::from_secs(10);
/// Live events sent, and not measured, before either phase.
const WARM_UP: Duration = Duration::from_secs(3);
const LIVE_CONNECTIONS: usize = 16;
/// How long live events may take to reach the sink after their phase.
const SETTLE: Duration = Duration::from_secs(20);
/// The replay is given up on after this long (the rate is then what it got through).
const REPLAY_LIMIT: Duration = Duration::from_secs(300);

pub async fn run(env: &Env) -> anyhow::Result<Row> {
    let scenario = "replay";
    let events = env.replay_events;
    let database = env.database(scenario).await?;
    let sink = Sink::start(1)?;
    let mut row = Row::new(scenario);

    // Archive: a process without destinations keeps every event and queues nothing.
    let from = SystemTime::now() - Duration::from_secs(5);
    let ingest = env
        .switchyard_with(
            scenario,
            &database,
            Role::Ingest,
            &switchyard::config(&[]),
            &[],
        )
        .await?;
    let fill = Load::fill(
        Endpoint::Batch(FILL_BATCH),
        FILL_CONNECTIONS,
        events,
        FILL_LIMIT,
    )
    .events(EventMaker::single("Order Completed"));
    let fill = loader::run(ingest.addr, fill).await;
    ensure!(
        fill.acked == events,
        "the archive was not filled in {FILL_LIMIT:?}: {} of {events} ({})",
        fill.acked,
        fill.failure_summary()
    );
    row.set("fill_events_per_sec", round(fill.events_per_sec(), 1));
    ingest.stop().await?;
    // What autovacuum and the checkpointer do within minutes of the fill, done now, so that
    // neither lands in a measured phase: they ran in the live phase before the replay, whose
    // p99 was then 200 to 320 ms instead of 9 to 13.
    let mut connection = database.connect().await?;
    for statement in ["VACUUM (ANALYZE) events", "CHECKPOINT"] {
        sqlx::query(statement).execute(&mut connection).await?;
    }
    drop(connection);
    let archived_ns = timing::now_ns();
    let to = SystemTime::now() + Duration::from_secs(1);
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // The destination is added: a new config, a new process.
    let webhooks = [Webhook::new("target", sink.url(0)).batch_size(100)];
    let switchyard = env
        .switchyard(scenario, &database, Role::All, &webhooks)
        .await?;
    let range = json!({"destination": "target", "from": rfc3339(from)?, "to": rfc3339(to)?});
    let sampling = Arc::new(AtomicBool::new(true));
    let largest = tokio::spawn(sample_rss(switchyard.pid, sampling.clone()));

    // Rate and memory: the whole archive with no live traffic, as `backlog-drain` drains.
    let meter = env.meter(&[switchyard.pid], &database, Some(&sink));
    let (alone, _) = replay(&switchyard, &sink, &range, archived_ns, async { None }).await?;
    row.cpu = Some(meter.finish());
    row.events_per_sec = alone.events_per_sec();
    row.set("replay_events", alone.selected);
    row.set("replayed", alone.arrived);
    row.set("replay_seconds", round(alone.took.as_secs_f64(), 2));
    row.set("replay_state", alone.state.clone());
    row.set("replay_delivered", alone.delivered.clone());

    // Live traffic first: live events before a second replay of it all and while it runs.
    // Warm up first (connections, the sink's and Postgres's caches): the first second of a
    // new process is slower than either phase and would stand for "without" in the p99.
    let failed = live(&switchyard, &sink, WARM_UP).await.failed;
    ensure!(failed == 0, "{failed} live events failed warming up");
    let mut without = live(&switchyard, &sink, LIVE_FOR).await;
    let failed = without.failed;
    ensure!(failed == 0, "{failed} live events failed before the replay");
    let (shared, during) = replay(&switchyard, &sink, &range, archived_ns, async {
        Some(live(&switchyard, &sink, LIVE_FOR).await)
    })
    .await?;
    let mut during = during.context("no live phase ran during the replay")?;
    let mut after = live(&switchyard, &sink, LIVE_FOR).await;
    sampling.store(false, Ordering::Relaxed);
    let failed = after.failed;
    ensure!(failed == 0, "{failed} live events failed after the replay");
    if let (_, Some(p99)) = after.delivered.p50_p99() {
        row.set("live_p99_after_ms", round(p99, 2));
    }
    // The replay's own pace while it makes way for live traffic.
    row.set(
        "replay_with_live_events_per_sec",
        round(shared.events_per_sec(), 1),
    );
    if let Some(pace) = shared.beside_live {
        row.set("replay_beside_live_events_per_sec", round(pace, 1));
    }
    row.set(
        "replay_with_live_seconds",
        round(shared.took.as_secs_f64(), 2),
    );
    row.set("live_events_per_sec", LIVE_RATE);
    row.set("live_events_during_replay", during.accepted);
    (row.p50_ms, row.p99_ms) = during.delivered.p50_p99();
    let (_, p99_without) = without.delivered.p50_p99();
    // How much of the live latency is the commit: under a replay that takes the machine, the
    // clients' acknowledgements wait, not the deliveries behind the replay.
    for (name, phase) in [
        ("live_ack_p99_without_ms", &mut without),
        ("live_ack_p99_ms", &mut during),
    ] {
        if let (_, Some(p99)) = phase.acked.p50_p99() {
            row.set(name, round(p99, 2));
        }
    }
    if let (Some(with), Some(without)) = (row.p99_ms, p99_without) {
        row.set("live_p99_without_ms", round(without, 2));
        row.set(
            "live_p99_increase_pct",
            round((with / without.max(0.001) - 1.0) * 100.0, 1),
        );
    }
    if during.failed > 0 {
        row.set("live_failures_during_replay", during.failed);
    }
    row.set("max_rss_mb_sampled", round(largest.await.unwrap_or(0.0), 1));
    for (name, run) in [("alone", &alone), ("with live traffic", &shared)] {
        if !run.finished || run.arrived < events || run.selected != events {
            row.error = Some(format!(
                "archived {events}, the replay {name} selected {} and {} arrived within \
                 {REPLAY_LIMIT:?}",
                run.selected, run.arrived
            ));
        }
    }
    // The live phase must fall within the replay, or "during" is partly without one.
    if shared.took < LIVE_FOR {
        row.set("replay_ended_before_live_phase", true);
    }
    note_log(&mut row, &switchyard);
    row.peak_rss_mb = switchyard.stop().await?;
    Ok(row)
}

/// One replay of the archive, as its destination saw it.
struct Replayed {
    selected: u64,
    /// Archived events that reached the sink after the replay was asked for.
    arrived: u64,
    /// From the `POST` to the last of them at the sink.
    took: Duration,
    finished: bool,
    state: serde_json::Value,
    delivered: serde_json::Value,
    /// Its events a second at the sink while the live phase ran, if one did.
    beside_live: Option<f64>,
}

impl Replayed {
    fn events_per_sec(&self) -> f64 {
        per_sec(self.arrived, self.took)
    }
}

/// Replays `range` (every archived event, received before `archived_ns`) to its destination
/// and waits until all of them reached the sink, with the live phase `meanwhile` (if any)
/// running as it starts.
async fn replay(
    switchyard: &Switchyard,
    sink: &Sink,
    range: &serde_json::Value,
    archived_ns: u64,
    meanwhile: impl std::future::Future<Output = Option<Live>>,
) -> anyhow::Result<(Replayed, Option<Live>)> {
    let before = sink.delivered();
    let posted_ns = timing::now_ns();
    let (status, answer) = switchyard
        .admin(Method::POST, "/admin/v1/replays", range)
        .await?;
    ensure!(
        status == 202,
        "POST /admin/v1/replays answered {status}: {answer}"
    );
    let id = answer["id"].as_i64().context("the replay has no id")?;
    let selected = answer["events"].as_u64().unwrap_or(0);
    let live = meanwhile.await;
    let others = live.as_ref().map_or(0, |phase| phase.accepted);
    let finished = wait_until(REPLAY_LIMIT, || {
        sink.delivered() >= before + selected + others
    })
    .await;
    let arrivals: Vec<u64> = sink
        .arrivals(0)
        .iter()
        .filter(|a| a.at_ns >= posted_ns && a.sent_ns < archived_ns)
        .map(|a| a.at_ns)
        .collect();
    let last_ns = arrivals.iter().copied().max().unwrap_or(posted_ns);
    let beside_live = live.as_ref().map(|phase| {
        let (from, to) = phase.window_ns;
        let arrived = arrivals.iter().filter(|&&at| at >= from && at < to).count();
        per_sec(
            arrived as u64,
            Duration::from_nanos(to.saturating_sub(from)),
        )
    });
    // Done once its outcomes are written too: until then its work would fall in what follows.
    let deadline = tokio::time::Instant::now() + SETTLE;
    let path = format!("/admin/v1/replays/{id}");
    let (state, delivered) = loop {
        let (state, delivered) = match switchyard.admin(Method::GET, &path, &json!(null)).await {
            Ok((200, state)) => (state["state"].clone(), state["delivered"].clone()),
            _ => (json!(null), json!(null)),
        };
        if state == "done" || tokio::time::Instant::now() >= deadline {
            break (state, delivered);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let replayed = Replayed {
        selected,
        arrived: arrivals.len() as u64,
        took: Duration::from_nanos(last_ns.saturating_sub(posted_ns)),
        finished,
        state,
        delivered,
        beside_live,
    };
    Ok((replayed, live))
}

/// What one phase of live events saw.
struct Live {
    /// From the scheduled send to the sink (an event still missing after [`SETTLE`] counts as
    /// that late).
    delivered: Latencies,
    /// From the scheduled send to the `200`: the commit's share.
    acked: Latencies,
    accepted: u64,
    failed: u64,
    /// When it began and ended sending.
    window_ns: (u64, u64),
}

/// Live single events to the sink at [`LIVE_RATE`] for `duration`.
async fn live(switchyard: &Switchyard, sink: &Sink, duration: Duration) -> Live {
    let from = timing::now_ns();
    let load = Load::open(Endpoint::Track, LIVE_CONNECTIONS, LIVE_RATE, duration)
        .events(EventMaker::single("Live Event"));
    let report = loader::run(switchyard.addr, load).await;
    let to = timing::now_ns();
    // Counting means a pass over every arrival (a million during a replay): 4 times a second.
    let deadline = tokio::time::Instant::now() + SETTLE;
    while sink.sent_between(0, from, to) < report.acked && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut latencies = sink.latencies(0, from, to);
    let missing = report.acked.saturating_sub(latencies.len() as u64);
    super::count_missing(&mut latencies, missing, SETTLE);
    Live {
        failed: report.failed(),
        delivered: latencies,
        acked: report.latencies,
        accepted: report.acked,
        window_ns: (from, to),
    }
}

/// The largest RSS of `pid`, sampled every 200 ms while `running`.
async fn sample_rss(pid: u32, running: Arc<AtomicBool>) -> f64 {
    let mut largest: f64 = 0.0;
    while running.load(Ordering::Relaxed) {
        largest = largest.max(procfs::rss_mb(pid).unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    largest
}

fn rfc3339(at: SystemTime) -> anyhow::Result<String> {
    Ok(OffsetDateTime::from(at).format(&Rfc3339)?)
}
