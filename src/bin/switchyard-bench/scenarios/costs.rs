//! With/without rows: what a feature costs the pipeline, as the rate with it over the rate of
//! the same pipeline without it, measured back to back in one run.
//!
//! Each comparison runs `deliver-batched`'s pipeline (ingest → archive and queue → webhook with
//! `batch_size` 100 → sink, closed loop): it moves the most events per second through every
//! stage, so a cost paid per event (an archive row, a script call, a trail record) is the
//! largest share of the work there; in `deliver-e2e` one HTTP request per event would hide it.
//! The two configurations alternate with, without, without, with, with, without (so a drift
//! of the machine's load falls on both), each on a fresh database, for [`PLAN`]'s window. Other
//! work on a shared machine only ever slows a run down, so the ratio is taken between the best
//! run of each side; the row also gives every run, the mean rates, and the ratio of the least CPU
//! per event of each side, which moves much less with other load.
//!
//! - `archive-cost`: `[archive] retention` at its default (`"7d"`) against `"0s"`;
//! - `transform-cost`: a small `transform` ([`SCRIPT`]) against none;
//! - `trail-cost`: `[server] event_trail` at its default against `0` (off).

use std::time::Duration;

use super::deliver::{saturate, Plan};
use super::Env;
use crate::procfs::CpuSplit;
use crate::report::{round, Row};
use crate::sink::Sink;
use crate::switchyard::{self, Role, Webhook};

const PLAN: Plan = Plan {
    saturate_for: Duration::from_secs(14),
    warmup: Duration::from_secs(4),
    max_outstanding: 60_000,
    rate: 0.0,
    rate_for: Duration::ZERO,
};
/// with, without, without, with, with, without.
const ORDER: [bool; 6] = [true, false, false, true, true, false];

/// The transform of `transform-cost`: one property set on every event.
const SCRIPT: &str = "function transformEvent(e) { e.properties.x = 1; return e; }\n";

/// One side of a comparison: the config's top-level tables and whether the webhook transforms.
struct Setup {
    head: &'static str,
    transform: bool,
}

const PLAIN: Setup = Setup {
    head: "",
    transform: false,
};

pub async fn archive(env: &Env) -> anyhow::Result<Row> {
    let without = Setup {
        head: "[archive]\nretention = \"0s\"\n",
        transform: false,
    };
    compare(env, "archive-cost", PLAIN, without).await
}

pub async fn transform(env: &Env) -> anyhow::Result<Row> {
    let with = Setup {
        head: "",
        transform: true,
    };
    compare(env, "transform-cost", with, PLAIN).await
}

pub async fn trail(env: &Env) -> anyhow::Result<Row> {
    let without = Setup {
        head: "[server]\nevent_trail = 0\n",
        transform: false,
    };
    compare(env, "trail-cost", PLAIN, without).await
}

/// One measured run.
struct Run {
    events_per_sec: f64,
    cpu: CpuSplit,
}

impl Run {
    /// Switchyard's and Postgres's CPU per delivered event, in microseconds.
    fn cpu_us_per_event(&self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        (self.cpu.switchyard + self.cpu.postgres) / 100.0 * cores / self.events_per_sec.max(1.0)
            * 1e6
    }
}

async fn compare(env: &Env, scenario: &str, with: Setup, without: Setup) -> anyhow::Result<Row> {
    let mut row = Row::new(scenario);
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for (i, on) in ORDER.into_iter().enumerate() {
        let setup = if on { &with } else { &without };
        let label = format!("{scenario}-{}-{i}", if on { "with" } else { "without" });
        let run = match once(env, &label, setup).await {
            Ok(run) => run,
            Err(error) if !on && error.to_string().contains("unknown key") => {
                row.error = Some(format!(
                    "pending: this build does not take the key that turns it off ({error:#})"
                ));
                return Ok(row);
            }
            Err(error) => return Err(error.context(label)),
        };
        runs[usize::from(!on)].push(run);
    }
    let [with_runs, without_runs] = &runs;
    let best = |runs: &[Run]| runs.iter().map(|r| r.events_per_sec).fold(0.0, f64::max);
    let least_cpu = |runs: &[Run]| {
        runs.iter()
            .map(Run::cpu_us_per_event)
            .fold(f64::INFINITY, f64::min)
    };
    let mean = |runs: &[Run]| {
        runs.iter().map(|r| r.events_per_sec).sum::<f64>() / runs.len().max(1) as f64
    };
    row.events_per_sec = best(with_runs);
    row.cpu = with_runs
        .iter()
        .max_by(|a, b| a.events_per_sec.total_cmp(&b.events_per_sec))
        .map(|r| r.cpu);
    row.set("without_events_per_sec", round(best(without_runs), 1));
    let rates =
        |runs: &[Run]| -> Vec<f64> { runs.iter().map(|r| r.events_per_sec.round()).collect() };
    row.set("with_runs", rates(with_runs));
    row.set("without_runs", rates(without_runs));
    row.set(
        "mean_ratio",
        round(mean(with_runs) / mean(without_runs).max(1.0), 3),
    );
    let cpu_with = least_cpu(with_runs);
    let cpu_without = least_cpu(without_runs);
    row.set("cpu_us_per_event_with", round(cpu_with, 1));
    row.set("cpu_us_per_event_without", round(cpu_without, 1));
    // The rate the CPU cost alone allows, with over without.
    row.set("cpu_ratio", round(cpu_without / cpu_with.max(0.001), 3));
    row.set("pipeline", "deliver-batched");
    Ok(row)
}

async fn once(env: &Env, label: &str, setup: &Setup) -> anyhow::Result<Run> {
    let database = env.database(label).await?;
    let sink = Sink::start(1)?;
    let mut webhook = Webhook::new("sink", sink.url(0)).batch_size(100);
    let mut files = Vec::new();
    if setup.transform {
        webhook = webhook.transform("transform.js");
        files.push(("transform.js", SCRIPT));
    }
    let config = switchyard::config_with(setup.head, &[webhook]);
    let switchyard = env
        .switchyard_with(label, &database, Role::All, &config, &files)
        .await?;
    let saturation = saturate(
        env,
        &switchyard,
        &sink,
        &database,
        &["Order Completed"],
        PLAN,
    )
    .await;
    switchyard.stop().await?;
    anyhow::ensure!(
        saturation.load.failed() == 0,
        "failed requests: {}",
        saturation.load.failure_summary()
    );
    Ok(Run {
        events_per_sec: saturation.delivered_per_sec,
        cpu: saturation.cpu,
    })
}
