//! The scenarios of issue 4, each sized so that the default set runs in under 10 minutes on
//! two cores, and what they share: a database and a Switchyard per run, and waiting.

mod backlog;
mod baseline;
mod costs;
mod deliver;
mod ingest;
mod peer;
mod replay;
mod soak;
mod traffic;
mod waits;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::database::{Database, Server};
use crate::procfs::{CpuMeter, Watched};
use crate::report::Row;
use crate::sink::Sink;
use crate::switchyard::{self, Role, Switchyard, Webhook};
use crate::timing::Latencies;

/// What every scenario runs with.
pub struct Env {
    pub server: Server,
    /// The `switchyard` release binary.
    pub binary: PathBuf,
    /// Configs and logs, one folder per run.
    pub work_dir: PathBuf,
    /// The Postgres server's main process, if it runs here (for the CPU split).
    pub postmaster: Option<u32>,
    /// Length of the `soak` scenario.
    pub soak_minutes: u64,
    /// The `soak`'s offered rate, when given.
    pub soak_rate: Option<f64>,
    /// Events archived and replayed by the `replay` scenario.
    pub replay_events: u64,
    /// graphile-worker's `bench.mjs` folder, for the `graphile-worker` peer row.
    pub peer_dir: Option<PathBuf>,
}

impl Env {
    /// A fresh database for one run (dropped when the scenario ends).
    pub async fn database(&self, label: &str) -> anyhow::Result<Database> {
        self.server.create(label).await
    }

    /// Starts measuring the CPU split of `switchyard`, `database` and the bench process.
    pub fn meter(&self, switchyard: &[u32], database: &Database, sink: Option<&Sink>) -> CpuMeter {
        CpuMeter::start(Watched {
            switchyard: switchyard.to_vec(),
            postmaster: self.postmaster,
            database: database.name.clone(),
            sink_tid: sink.and_then(|s| s.tid),
        })
    }

    /// Starts Switchyard on `database` with one webhook per entry of `webhooks`.
    pub async fn switchyard(
        &self,
        label: &str,
        database: &Database,
        role: Role,
        webhooks: &[Webhook],
    ) -> anyhow::Result<Switchyard> {
        self.switchyard_with(label, database, role, &switchyard::config(webhooks), &[])
            .await
    }

    /// Starts Switchyard on `database` with the config `config`, and `files` (name, text) next
    /// to it.
    pub async fn switchyard_with(
        &self,
        label: &str,
        database: &Database,
        role: Role,
        config: &str,
        files: &[(&str, &str)],
    ) -> anyhow::Result<Switchyard> {
        let dir = self.work_dir.join(label);
        std::fs::create_dir_all(&dir)?;
        for (name, text) in files {
            std::fs::write(dir.join(name), text)?;
        }
        Switchyard::start(&self.binary, &dir, config, database, role).await
    }
}

/// A scenario's name on the command line and in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    PostgresBaseline,
    IngestSingle,
    IngestBatch,
    DeliverE2e,
    DeliverBatched,
    NoisyNeighbor,
    RateLimitAccuracy,
    BacklogDrain,
    GraphileWorker,
    Replay,
    ArchiveCost,
    TransformCost,
    TrailCost,
    Soak,
    Scale,
    Balancing,
}

impl Scenario {
    /// What runs without `--scenario`.
    pub const DEFAULT: [Scenario; 12] = [
        Scenario::PostgresBaseline,
        Scenario::IngestSingle,
        Scenario::IngestBatch,
        Scenario::DeliverE2e,
        Scenario::DeliverBatched,
        Scenario::NoisyNeighbor,
        Scenario::RateLimitAccuracy,
        Scenario::BacklogDrain,
        Scenario::Replay,
        Scenario::ArchiveCost,
        Scenario::TransformCost,
        Scenario::TrailCost,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::PostgresBaseline => "postgres-baseline",
            Scenario::IngestSingle => "ingest-single",
            Scenario::IngestBatch => "ingest-batch",
            Scenario::DeliverE2e => "deliver-e2e",
            Scenario::DeliverBatched => "deliver-batched",
            Scenario::NoisyNeighbor => "noisy-neighbor",
            Scenario::RateLimitAccuracy => "rate-limit-accuracy",
            Scenario::BacklogDrain => "backlog-drain",
            Scenario::GraphileWorker => crate::report::PEER_ROW,
            Scenario::Replay => "replay",
            Scenario::ArchiveCost => "archive-cost",
            Scenario::TransformCost => "transform-cost",
            Scenario::TrailCost => "trail-cost",
            Scenario::Soak => "soak",
            Scenario::Scale => "scale",
            Scenario::Balancing => "balancing",
        }
    }

    /// Runs it; `done` holds the rows measured before it in this run.
    pub async fn run(self, env: &Env, done: &[Row]) -> anyhow::Result<Vec<Row>> {
        let rows = match self {
            Scenario::PostgresBaseline => vec![baseline::run(env).await?],
            Scenario::IngestSingle => vec![ingest::single(env).await?],
            Scenario::IngestBatch => vec![ingest::batch(env).await?],
            Scenario::DeliverE2e => vec![deliver::e2e(env).await?],
            Scenario::DeliverBatched => vec![deliver::batched(env).await?],
            Scenario::NoisyNeighbor => vec![traffic::noisy_neighbor(env).await?],
            Scenario::RateLimitAccuracy => vec![traffic::rate_limit_accuracy(env).await?],
            Scenario::BacklogDrain => vec![backlog::run(env).await?],
            Scenario::GraphileWorker => vec![peer::run(env).await?],
            Scenario::Replay => vec![replay::run(env).await?],
            Scenario::ArchiveCost => vec![costs::archive(env).await?],
            Scenario::TransformCost => vec![costs::transform(env).await?],
            Scenario::TrailCost => vec![costs::trail(env).await?],
            Scenario::Soak => vec![soak::run(env, done).await?],
            Scenario::Scale => deliver::scale(env).await?,
            Scenario::Balancing => vec![crate::balancing::run(env).await?],
        };
        Ok(rows)
    }
}

/// Polls `done` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts events acknowledged but never seen at the sink as arriving `lower_bound` late (they
/// were still missing after that long), so a stuck queue shows in the percentiles.
pub fn count_missing(latencies: &mut Latencies, missing: u64, lower_bound: Duration) {
    for _ in 0..missing {
        latencies.push(lower_bound);
    }
}

/// Notes, in a row, what the Switchyard process logged at warn level or above.
pub fn note_log(row: &mut Row, switchyard: &Switchyard) {
    let lines = switchyard.log_lines();
    if lines > 0 {
        row.set("switchyard_log_lines", lines);
        let first: String = switchyard.first_log_line().chars().take(160).collect();
        row.set("switchyard_log_first", first);
    }
}
