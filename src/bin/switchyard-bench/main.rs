//! `switchyard-bench`: the benchmark harness of issue 4.
//!
//! For each scenario it creates a database of its own on a real Postgres, starts the release
//! `switchyard` binary next to this one as a child process with a generated config, drives it
//! over real HTTP from keep-alive connections, receives its deliveries in local sinks, and
//! reports events/s, latency percentiles, the child's peak RSS, the CPU split between
//! Switchyard, Postgres and the harness, and the ratio to raw COPY measured in the same run.
//!
//! - [`events`]: the Segment-shaped events; [`loader`]: the load generator;
//! - [`sink`]: the webhook receivers; [`switchyard`]: the child process and its config;
//! - [`database`]: bench databases; [`procfs`]: RSS and CPU from `/proc`;
//! - [`scenarios`]: what each scenario does; [`report`]: the table and the JSON.

mod balancing;
mod database;
mod events;
mod loader;
mod procfs;
mod report;
mod scenarios;
mod sink;
mod switchyard;
mod timing;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::Parser;

use crate::database::Server;
use crate::report::Row;
use crate::scenarios::{Env, Scenario};

#[derive(Parser)]
#[command(
    name = "switchyard-bench",
    about = "Benchmarks Switchyard against a real Postgres and local sinks"
)]
struct Cli {
    /// A scenario to run (repeatable); without one, every default scenario. `soak`, `scale`,
    /// `balancing` and `graphile-worker` run only when named (the last also with
    /// `--peer-graphile`). `postgres-baseline` always runs first: every
    /// ratio needs it.
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Also write the results here as JSON: {"SCENARIO": {"events_per_sec": .., ...}}.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The Postgres server to use (its database part is ignored: each scenario makes its own).
    /// Without it, the bench starts a private server with PostgreSQL's default settings
    /// (autovacuum on) in `target/bench-postgres`, as a real deployment would run.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Minutes of the `soak` scenario.
    #[arg(long, default_value_t = 10)]
    soak_minutes: u64,
    /// Events per second the `soak` offers, instead of 70% of `deliver-e2e`'s rate (above
    /// capacity, it shows what overload does: delivery should hold at capacity).
    #[arg(long)]
    soak_rate: Option<f64>,
    /// Events the `replay` scenario archives and replays (fewer for a quick run).
    #[arg(long, default_value_t = 1_000_000)]
    replay_events: u64,
    /// A folder with graphile-worker's `bench.mjs` and its `node_modules`: adds the
    /// `graphile-worker` peer row, run right after `backlog-drain` on the same server.
    #[arg(long)]
    peer_graphile: Option<PathBuf>,
    /// Exit non-zero when a scenario fails or a soak is not flat (for CI).
    #[arg(long)]
    check: bool,
}

/// The private server's port, off the standard ones.
const PRIVATE_PORT: u16 = 54330;

/// The port of the private server already running in `data_dir` (its `postmaster.pid` says),
/// else [`PRIVATE_PORT`], or any free port when something else holds that (another checkout's
/// bench, say).
fn private_port(data_dir: &std::path::Path) -> u16 {
    use std::net::TcpListener;
    let running = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|pid_file| pid_file.lines().nth(3)?.trim().parse().ok());
    if let Some(port) = running {
        return port;
    }
    if TcpListener::bind(("127.0.0.1", PRIVATE_PORT)).is_ok() {
        return PRIVATE_PORT;
    }
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map_or(PRIVATE_PORT, |address| address.port())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("switchyard-bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("switchyard-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    timing::anchor();
    let binary = std::env::current_exe()
        .context("locating this binary")?
        .with_file_name("switchyard");
    if !binary.exists() {
        bail!(
            "{} is missing: build it first with `cargo build --release --bins`",
            binary.display()
        );
    }
    let mut private = None;
    let database_url = match cli.database_url.clone() {
        Some(url) => url,
        None => {
            let data_dir = binary
                .parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("."))
                .join("bench-postgres");
            let port = private_port(&data_dir);
            private = ::switchyard::cli::bootstrap::start_private_in(
                data_dir,
                port,
                "DATABASE_URL was not set: the bench runs on a server with default settings",
            )
            .await?;
            format!("postgres://postgres@127.0.0.1:{port}/postgres")
        }
    };
    let server = Server::new(Some(&database_url))?;
    let version = server.version().await?;
    let settings = server.settings().await?;
    let postmaster = server.postmaster().await?;
    let work_dir = std::env::temp_dir().join(format!("switchyard-bench-{}", std::process::id()));
    let env = Env {
        server,
        binary,
        work_dir: work_dir.clone(),
        postmaster,
        soak_minutes: cli.soak_minutes.max(1),
        soak_rate: cli.soak_rate.filter(|rate| *rate > 0.0),
        replay_events: cli.replay_events.max(1),
        peer_dir: cli.peer_graphile.clone(),
    };
    if postmaster.is_none() {
        eprintln!("Postgres does not run on this machine: its CPU share is not measured");
    }
    println!("{}", machine(&version));
    println!("postgres settings: {settings}");

    let mut plan = if cli.scenarios.is_empty() {
        Scenario::DEFAULT.to_vec()
    } else {
        cli.scenarios.clone()
    };
    let mut seen = vec![Scenario::PostgresBaseline];
    plan.retain(|s| {
        let first = !seen.contains(s);
        seen.push(*s);
        first
    });
    plan.insert(0, Scenario::PostgresBaseline);
    if env.peer_dir.is_some() && !plan.contains(&Scenario::GraphileWorker) {
        let after = plan.iter().position(|s| *s == Scenario::BacklogDrain);
        plan.insert(
            after.map_or(plan.len(), |i| i + 1),
            Scenario::GraphileWorker,
        );
    }

    let started = Instant::now();
    let rows = tokio::select! {
        rows = run_all(&env, &plan) => rows,
        _ = tokio::signal::ctrl_c() => {
            env.server.drop_all().await;
            bail!("interrupted; the bench databases were dropped");
        }
    };
    println!("{}", report::table(&rows));
    println!("total time: {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report::json(&rows))?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if rows.iter().any(|r| r.error.is_some()) {
        println!("logs and configs: {}", work_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    if let Some(private) = private {
        private.stop().await;
    }
    if cli.check {
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| r.error.is_some() || r.extra.get("flat") == Some(&false.into()))
            .map(|r| r.scenario.clone())
            .collect();
        if !failed.is_empty() {
            bail!("--check: {} did not pass", failed.join(", "));
        }
    }
    Ok(())
}

/// Runs each scenario in turn, each with its own databases, dropped when it ends.
async fn run_all(env: &Env, plan: &[Scenario]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for scenario in plan {
        eprintln!("running {} ...", scenario.name());
        let started = Instant::now();
        let result = scenario.run(env, &rows).await;
        env.server.drop_all().await;
        match result {
            Ok(new) => {
                for row in &new {
                    let error = row.error.as_deref().map(|e| format!(" (error: {e})"));
                    eprintln!(
                        "  {}: {:.0} events/s{}",
                        row.scenario,
                        row.events_per_sec,
                        error.unwrap_or_default()
                    );
                }
                eprintln!("  took {:.0} s", started.elapsed().as_secs_f64());
                rows.extend(new);
            }
            Err(error) => {
                eprintln!("  {} failed: {error:#}", scenario.name());
                rows.push(Row::failed(scenario.name(), &error));
            }
        }
    }
    rows
}

/// The header: cores, CPU model, memory, Postgres.
fn machine(postgres_version: &str) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU", str::trim);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gb = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "machine: {cores} cores, {model}, {memory_gb:.0} GB; PostgreSQL {postgres_version}; \
         load average at start {}",
        load.join(" ")
    )
}
