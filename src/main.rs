//! The `switchyard` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use switchyard::cli::serve::{self, Role};
use switchyard::cli::{bootstrap, OutputClosed};
use switchyard::config::{self, Config};
use switchyard::say;
use switchyard::store::Store;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A Segment-compatible event router"
)]
struct Cli {
    /// The config file (default: ./switchyard.toml if it exists).
    #[arg(long, env = "SWITCHYARD_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest API, worker pool, admin API and metrics in one process.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        /// Postgres URL (the database is created if missing).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// Which stages to run.
        #[arg(long, env = "SWITCHYARD_ROLE", value_enum, default_value_t = Role::All)]
        role: Role,
    },
    /// Apply migrations and exit.
    Migrate {
        /// Postgres URL (the database is created if missing).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
    },
    /// Validate a config file: exit 0, or print every error as file:line:col: message and exit 2.
    Check {
        /// The file to check (default: --config, then ./switchyard.toml).
        #[arg(value_name = "PATH")]
        path: Option<PathBuf>,
    },
    /// Replay archived events received in [--from, --to) to one destination (a running
    /// `switchyard serve` on the same database delivers them; follow with --wait). A --to
    /// still ahead counts as now.
    Replay {
        /// The destination to deliver to.
        #[arg(long)]
        destination: String,
        #[command(flatten)]
        range: ArchiveRange,
        /// Print progress until the replay is done.
        #[arg(long)]
        wait: bool,
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
    },
    /// The event archive.
    Archive {
        #[command(subcommand)]
        command: ArchiveCommand,
    },
    /// A self-contained tour: a demo config, a local sink, sample events, then what arrived.
    Demo {
        /// Keep serving after the tour until Ctrl-C (to open the dashboard).
        #[arg(long)]
        keep: bool,
        /// The PostgreSQL server to make the throwaway database on.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
    },
}

/// Which archived events: received in [--from, --to), of some sources or all.
#[derive(clap::Args)]
struct ArchiveRange {
    /// Start of the range (RFC 3339), inclusive.
    #[arg(long)]
    from: String,
    /// End of the range (RFC 3339), exclusive.
    #[arg(long)]
    to: String,
    /// Only events of these sources (repeatable; default: every source).
    #[arg(long = "source")]
    sources: Vec<String>,
}

impl ArchiveRange {
    /// The time range, checked, and the sources' ids (`None`: every source).
    async fn resolve(
        &self,
        store: &Store,
    ) -> anyhow::Result<(
        (time::OffsetDateTime, time::OffsetDateTime),
        Option<Vec<i32>>,
    )> {
        let range = (rfc3339(&self.from, "--from")?, rfc3339(&self.to, "--to")?);
        anyhow::ensure!(range.0 < range.1, "--from must be before --to");
        Ok((range, source_ids(store, &self.sources).await?))
    }
}

#[derive(Subcommand)]
enum ArchiveCommand {
    /// Write archived events received in [--from, --to) as NDJSON (gzip when the output file
    /// ends in .gz), oldest first, to --output or stdout.
    Export {
        #[command(flatten)]
        range: ArchiveRange,
        /// The file to write (default: stdout).
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

/// mimalloc rather than the system allocator: every request allocates and frees many small
/// buffers across threads, where glibc's malloc spent about a seventh of the process's CPU
/// (`perf`, `switchyard-bench --scenario ingest-single`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; the service's info lines would bury it.
    let quiet = matches!(cli.command, Command::Demo { .. });
    init_logging(cli.log_format, if quiet { "warn" } else { "info" });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("switchyard: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(code) => code,
        // Once, on stderr, ending with a newline (the log would repeat it).
        Err(error) if error.is::<OutputClosed>() => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("switchyard: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, like `{:#}`, but without a cause that only repeats
/// the text of the one before it (sqlx's database errors carry their message twice).
fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain().map(ToString::to_string) {
        if !line.ends_with(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_path = cli.config.clone().or_else(|| {
        let default = PathBuf::from("switchyard.toml");
        default.exists().then_some(default)
    });
    match cli.command {
        Command::Check { path } => {
            let path = path
                .or(config_path)
                .unwrap_or_else(|| PathBuf::from("switchyard.toml"));
            match config::load(&path) {
                Ok(config) => {
                    say!(
                        "{}: ok ({} sources, {} destinations)",
                        path.display(),
                        config.sources.len(),
                        config.destinations.len()
                    )?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    // Exit 2 says it even to a reader that has gone.
                    let _ = say!("{errors}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::Demo { keep, database_url } => {
            switchyard::cli::demo::run_with(switchyard::cli::demo::Options {
                database_url,
                keep_running: keep,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            destination,
            range,
            wait,
            database_url,
        } => {
            let store = open_store(database_url).await?;
            let (range, sources) = range.resolve(&store).await?;
            let destination_id = store
                .destination_id(&destination)
                .await?
                .with_context(|| format!("no destination `{destination}` in this database"))?;
            let replay = store
                .create_replay(destination_id, range.0, range.1, sources.as_deref())
                .await?;
            say!(
                "{}",
                serde_json::json!({ "id": replay.id, "events": replay.events })
            )?;
            if wait {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let Some(now) = store.replay(replay.id).await? else {
                        break;
                    };
                    say!("{}", switchyard::http::server::replay_json(&now))?;
                    if matches!(now.state.as_str(), "done" | "cancelled") {
                        break;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Archive {
            command:
                ArchiveCommand::Export {
                    range,
                    output,
                    database_url,
                },
        } => {
            let store = open_store(database_url).await?;
            let (range, sources) = range.resolve(&store).await?;
            let written = switchyard::cli::archive::export(
                &store,
                range,
                sources.as_deref(),
                output.as_deref(),
            )
            .await?;
            eprintln!("exported {written} events");
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { database_url } => {
            let database = bootstrap::resolve(database_url).await?;
            bootstrap::create_database_if_missing(&database.url).await?;
            let store = Store::connect(&database.url, 2).await?;
            store.migrate().await?;
            store.prepare_today().await?;
            say!("migrations applied")?;
            if let Some(private) = database.private {
                private.stop().await;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            listen,
            database_url,
            role,
        } => {
            let config = load_config(config_path.as_deref())?;
            let running = serve::start(serve::Settings {
                listen,
                database_url,
                config,
                config_path,
                role,
                admin_token: std::env::var("SWITCHYARD_ADMIN_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty()),
                grace: Duration::from_secs(10),
                timeouts: Default::default(),
            })
            .await?;
            let stop = running.stopper();
            tokio::spawn(async move {
                wait_for_signal().await;
                stop.cancel();
            });
            let reloader = running.reloader.clone();
            tokio::spawn(async move {
                let Ok(mut hangups) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hangups.recv().await.is_some() {
                    if let Err(error) = reloader.reload().await {
                        tracing::error!("SIGHUP reload rejected: {error}");
                    }
                }
            });
            running.wait().await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(path) => {
            config::load(path).map_err(|errors| anyhow::anyhow!("the config has errors:\n{errors}"))
        }
        None => {
            tracing::warn!(
                "no config file (./switchyard.toml or --config): no sources, no destinations"
            );
            Ok(Config::default())
        }
    }
    .context("loading the config")
}

async fn wait_for_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // Postgres's notices ("relation … already exists, skipping" from partition upkeep) are
        // not news; they show with RUST_LOG=sqlx=info.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!(
                "{default_level},sqlx::postgres::notice=warn"
            ))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The store of `database_url` (or the default database), migrated.
async fn open_store(database_url: Option<String>) -> anyhow::Result<Store> {
    let database = bootstrap::resolve(database_url).await?;
    let store = Store::connect(&database.url, 2).await?;
    store.migrate().await?;
    Ok(store)
}

fn rfc3339(text: &str, flag: &str) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{flag} `{text}` is not an RFC 3339 time (2026-11-01T00:00:00Z)"))
}

async fn source_ids(store: &Store, names: &[String]) -> anyhow::Result<Option<Vec<i32>>> {
    if names.is_empty() {
        return Ok(None);
    }
    let mut ids = Vec::with_capacity(names.len());
    for name in names {
        let id = store
            .source_id(name)
            .await?
            .with_context(|| format!("no source `{name}` in this database"))?;
        ids.push(id);
    }
    Ok(Some(ids))
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("error returned from database: {0}")]
    struct Wrapped(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("password authentication failed for user \"postgres\"")]
    struct Inner;

    #[test]
    fn a_cause_that_repeats_the_one_before_is_said_once() {
        let error = anyhow::Error::new(Wrapped(Inner)).context("the database refused us");
        assert_eq!(
            describe(&error),
            "the database refused us: error returned from database: password authentication \
             failed for user \"postgres\""
        );
        let plain = anyhow::anyhow!("no such file").context("cannot read switchyard.toml");
        assert_eq!(
            describe(&plain),
            "cannot read switchyard.toml: no such file"
        );
    }
}
