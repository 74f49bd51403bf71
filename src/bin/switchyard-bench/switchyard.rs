//! Switchyard under test: a child process of the release binary next to this one, started with
//! a generated config and stopped with SIGTERM, as an operator would run it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

use crate::database::Database;
use crate::events::WRITE_KEY;
use crate::loader;
use crate::procfs;

/// The admin token every bench instance gets.
const ADMIN_TOKEN: &str = "bench-admin-token";
/// How long a start (migrations, a large config) may take.
const READY_WITHIN: Duration = Duration::from_secs(120);
/// How long a SIGTERM'd process may take to finish its deliveries and exit.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// `SWITCHYARD_ROLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    All,
    Ingest,
    Worker,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Ingest => "ingest",
            Role::Worker => "worker",
        }
    }
}

/// One `[[destinations]]` entry: a webhook to a sink channel.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub name: String,
    pub url: String,
    pub batch_size: usize,
    pub events: Option<Vec<String>>,
    pub rate_limit: Option<String>,
    pub rate_limit_key: Option<String>,
    /// A transform script's file name, next to the config.
    pub transform: Option<String>,
}

impl Webhook {
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Webhook {
        Webhook {
            name: name.into(),
            url: url.into(),
            batch_size: 1,
            events: None,
            rate_limit: None,
            rate_limit_key: None,
            transform: None,
        }
    }

    pub fn batch_size(self, batch_size: usize) -> Webhook {
        Webhook { batch_size, ..self }
    }

    pub fn events(self, names: &[&str]) -> Webhook {
        Webhook {
            events: Some(names.iter().map(|n| n.to_string()).collect()),
            ..self
        }
    }

    pub fn rate_limit(self, limit: &str) -> Webhook {
        Webhook {
            rate_limit: Some(limit.into()),
            ..self
        }
    }

    pub fn transform(self, file: &str) -> Webhook {
        Webhook {
            transform: Some(file.into()),
            ..self
        }
    }

    pub fn rate_limit_key(self, key: impl Into<String>) -> Webhook {
        Webhook {
            rate_limit_key: Some(key.into()),
            ..self
        }
    }
}

/// The config file: one source (the bench's write key) and webhooks.
pub fn config(webhooks: &[Webhook]) -> String {
    config_with("", webhooks)
}

/// [`config`] after `head`, top-level tables such as `[archive]`.
pub fn config_with(head: &str, webhooks: &[Webhook]) -> String {
    let mut toml = format!("{head}\n[[sources]]\nname = \"bench\"\nwrite_key = \"{WRITE_KEY}\"\n");
    for webhook in webhooks {
        let _ = write!(
            toml,
            "\n[[destinations]]\nname = {:?}\nkind = \"webhook\"\nurl = {:?}\nbatch_size = {}\n",
            webhook.name, webhook.url, webhook.batch_size
        );
        if let Some(events) = &webhook.events {
            let _ = writeln!(toml, "events = {events:?}");
        }
        if let Some(limit) = &webhook.rate_limit {
            let _ = writeln!(toml, "rate_limit = {limit:?}");
        }
        if let Some(key) = &webhook.rate_limit_key {
            let _ = writeln!(toml, "rate_limit_key = {key:?}");
        }
        if let Some(file) = &webhook.transform {
            let _ = writeln!(toml, "transform = {file:?}");
        }
    }
    toml
}

/// A running `switchyard serve`.
pub struct Switchyard {
    pub addr: SocketAddr,
    pub pid: u32,
    child: Child,
    log: PathBuf,
}

impl Switchyard {
    /// Writes `config` into `dir`, starts `binary serve` on a free port, and waits for
    /// `/readyz`.
    pub async fn start(
        binary: &Path,
        dir: &Path,
        config: &str,
        database: &Database,
        role: Role,
    ) -> anyhow::Result<Switchyard> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("switchyard.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log = dir.join(format!("switchyard-{}.log", role.as_str()));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let addr = free_port()?;
        let child = Command::new(binary)
            .arg("serve")
            .env("SWITCHYARD_CONFIG", &config_path)
            .env("SWITCHYARD_LISTEN", addr.to_string())
            .env("DATABASE_URL", &database.url)
            .env("SWITCHYARD_ROLE", role.as_str())
            .env("SWITCHYARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().context("the child has no pid")?;
        let mut switchyard = Switchyard {
            addr,
            pid,
            child,
            log,
        };
        switchyard.wait_ready().await?;
        Ok(switchyard)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "switchyard exited with {status} before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(200) = loader::get_status(self.addr, "/readyz").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "switchyard was not ready within {READY_WITHIN:?}:\n{}",
            self.log_tail()
        )
    }

    /// Peak RSS so far, in MB.
    pub fn peak_rss_mb(&self) -> Option<f64> {
        procfs::peak_rss_mb(self.pid)
    }

    /// Calls the admin API: `method path` with a JSON body; the status and the JSON answer.
    pub async fn admin(
        &self,
        method: hyper::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut connection = loader::Connection::bearer(self.addr, ADMIN_TOKEN);
        let body = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body)?
        };
        let (status, answer) = connection.send(method, path, body.into()).await?;
        let value = serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null);
        Ok((status, value))
    }

    /// How many lines it logged (at `RUST_LOG=warn`: its warnings and errors).
    pub fn log_lines(&self) -> u64 {
        std::fs::read_to_string(&self.log).map_or(0, |text| text.lines().count() as u64)
    }

    /// The first line it logged, without terminal colors.
    pub fn first_log_line(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        strip_colors(text.lines().next().unwrap_or_default())
    }

    /// The last lines it logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then waits for the exit (SIGKILL after [`EXIT_WITHIN`]). Returns the peak RSS
    /// read just before the signal.
    pub async fn stop(mut self) -> anyhow::Result<Option<f64>> {
        let peak = self.peak_rss_mb();
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        match tokio::time::timeout(EXIT_WITHIN, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(peak),
            Ok(Ok(status)) => bail!("switchyard exited with {status}:\n{}", self.log_tail()),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "switchyard did not exit within {EXIT_WITHIN:?} of SIGTERM:\n{}",
                    self.log_tail()
                )
            }
        }
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_colors(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_valid_toml_and_colors_are_stripped() {
        let toml = config(&[Webhook::new("a", "http://127.0.0.1:1/c/0")
            .batch_size(100)
            .events(&["Order Completed"])
            .rate_limit("50/s")]);
        let value: toml::Value = toml.parse().expect("valid TOML");
        assert_eq!(
            value["destinations"][0]["batch_size"].as_integer(),
            Some(100)
        );
        assert_eq!(
            value["destinations"][0]["events"][0].as_str(),
            Some("Order Completed")
        );
        assert_eq!(strip_colors("\u{1b}[33m WARN\u{1b}[0m slow"), " WARN slow");
    }
}
