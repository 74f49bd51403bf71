//! `graphile-worker`: the peer `backlog-drain` is compared with, a leading Postgres job queue,
//! measured on the same server in the same run. `--peer-graphile DIR` names a folder holding
//! its `bench.mjs` with `npm install` done; the bench runs it (`node`, on `PATH`) in its
//! batched configurations — no-op jobs with ~400-byte payloads, each run on a fresh database —
//! and the row's rate is the best `process` rate among them.

use std::path::Path;
use std::process::Stdio;

use anyhow::{bail, Context as _};
use tokio::process::Command;
use url::Url;

use super::Env;
use crate::report::{Row, PEER_ROW};

/// Jobs per run.
const JOBS: u64 = 200_000;
/// The batched configurations tried: the documentation's (local queue 500, completions at
/// once), the fastest found on its own README (local queue 1,000, 20 ms batching), and that
/// with one runner process per core.
const CONFIGS: [&[&str]; 3] = [
    &["--config=batched"],
    &[
        "--config=batched",
        "--lq=1000",
        "--cdelay=20",
        "--fdelay=20",
    ],
    &[
        "--config=batched",
        "--lq=1000",
        "--cdelay=20",
        "--fdelay=20",
        "--procs=2",
    ],
];

pub async fn run(env: &Env) -> anyhow::Result<Row> {
    let Some(dir) = &env.peer_dir else {
        bail!("--peer-graphile DIR is needed: a folder with bench.mjs and its node_modules");
    };
    let mut row = Row::new(PEER_ROW);
    let mut best: f64 = 0.0;
    let mut runs = Vec::new();
    for (i, args) in CONFIGS.iter().enumerate() {
        let database = env.database(&format!("peer-{i}")).await?;
        let (process, enqueue) = once(dir, &database.url, &database.name, args).await?;
        best = best.max(process);
        runs.push(serde_json::json!({
            "args": args.join(" "),
            "process_jobs_per_sec": process,
            "enqueue_jobs_per_sec": enqueue,
        }));
    }
    row.events_per_sec = best;
    row.set("runs", runs);
    row.set("jobs_per_run", JOBS);
    Ok(row)
}

/// One `node bench.mjs` run: its `process` and `enqueue` rates.
async fn once(dir: &Path, url: &str, database: &str, args: &[&str]) -> anyhow::Result<(f64, f64)> {
    let url = Url::parse(url).context("the database URL")?;
    let mut command = Command::new("node");
    command
        .current_dir(dir)
        .arg("bench.mjs")
        .args(args)
        .arg(format!("--n={JOBS}"))
        .arg(format!("--db={database}"))
        .env("PGHOST", url.host_str().unwrap_or("127.0.0.1"))
        .env("PGPORT", url.port().unwrap_or(5432).to_string())
        .env("PGUSER", url.username())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(password) = url.password() {
        command.env("PGPASSWORD", password);
    }
    let output = command
        .output()
        .await
        .with_context(|| format!("running node bench.mjs in {}", dir.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "node bench.mjs {} exited with {}: {}{}",
            args.join(" "),
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let rate = |word: &str| {
        stdout
            .split(&format!("{word} "))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    match (rate("process"), rate("enqueue")) {
        (Some(process), Some(enqueue)) => Ok((process, enqueue)),
        _ => bail!("no `process N jobs/s` in the output of bench.mjs: {stdout}"),
    }
}
