//! The config file: sources, destinations, limits and security, with every error located.
//!
//! Loading parses the TOML once for values and once (with `toml_edit`) for positions, so that
//! `switchyard check` can print each problem as `file:line:col: message`.

//!
//! This file is the config's data (plain values: what each key means is in the doc comments
//! here); [`read`] holds the grammar that fills it, and [`position`] finds where each key is.

pub mod env_vars;
mod position;
mod read;
pub mod redact;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use position::{parse_toml, Place, Section};
use read::Reader;

/// A whole, valid config.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub sources: Vec<SourceConfig>,
    pub destinations: Vec<DestinationConfig>,
    pub limits: LimitsConfig,
    pub security: SecurityConfig,
    pub server: ServerConfig,
    pub archive: ArchiveConfig,
}

/// `[archive]`: every accepted event is kept this long, whether or not it was delivered, so
/// that history can be looked at again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveConfig {
    /// How long (`"7d"`); `"0s"` keeps events only until their deliveries are done.
    pub retention: Duration,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            retention: Duration::from_secs(7 * 86_400),
        }
    }
}

/// `[[sources]]`: an app or service that sends events with its write key.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub write_key: String,
    /// Browser origins that may send with this key (`allowed_origins`); empty: none.
    pub allowed_origins: crate::http::browser::AllowedOrigins,
}

/// `[[destinations]]`: where events go, and how.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub name: String,
    pub kind: String,
    /// Names of the sources it receives from; `None`: every source.
    pub sources: Option<Vec<String>>,
    /// Only these event names (track) or call types (`identify`, `page`, ...); `None`: all.
    pub events: Option<Vec<String>>,
    /// Requests to the vendor per rate-limit key.
    pub rate_limit: Option<RateLimit>,
    /// Destinations with the same key share one limit.
    pub rate_limit_key: String,
    pub max_in_flight: usize,
    /// Events per request, already capped at the kind's maximum.
    pub batch_size: usize,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub ordering: Ordering,
    pub endpoint: Option<Url>,
    pub enabled: bool,
    /// `where`, `consent` and `sample`: decided at ingest routing.
    pub gate: crate::filter::Gate,
    /// `transform`, `drop_properties` and `allow_properties`: applied at delivery.
    pub shaping: Arc<crate::filter::Shaping>,
    /// The kind's own keys, checked: the pipeline builds the plugin from them.
    pub settings: KindSettings,
}

/// A destination's own keys (the table minus the keys every destination takes). They hold
/// credentials, so `Debug` shows their names only.
#[derive(Clone, Default, PartialEq)]
pub struct KindSettings(pub toml::Table);

impl fmt::Debug for KindSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// `"N/s"`, `"N/m"` or `"N/h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
}

/// The retry budget: past it, a delivery is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub max_age: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            max_age: Duration::from_secs(4 * 3600),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    #[default]
    None,
    PerUser,
}

/// `[limits]`: bounds past which ingest sheds load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Queued deliveries in total past which ingest answers 429.
    pub max_queued: Option<u64>,
    /// Queued deliveries of one source past which its ingest answers 429.
    pub max_queued_per_source: Option<u64>,
    /// Deliveries in flight at once across every destination (the shared pool's size).
    pub max_concurrent_deliveries: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_queued: None,
            max_queued_per_source: None,
            max_concurrent_deliveries: 512,
        }
    }
}

/// `[security]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityConfig {
    /// Refuse loopback and private addresses too (link-local and metadata always are).
    pub deny_private_networks: bool,
    /// Networks deliveries may reach even when the rules above refuse them (`"10.1.0.0/16"`,
    /// `"169.254.169.254"`).
    pub allow_networks: Vec<ipnet::IpNet>,
    /// Extra PEM roots outbound HTTPS trusts besides the system store (`ca_file`, relative to
    /// the config file).
    pub ca_file: Option<std::path::PathBuf>,
}

/// `[server]`: how clients reach this service, and what it keeps in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The address browsers and apps reach (`https://events.example.com`), used in the
    /// analytics.js settings; unset: the address each request came to.
    pub public_url: Option<Url>,
    /// Proxies whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Events whose path this process keeps for `GET /admin/v1/events` (0: none, recording
    /// off), at most [`MAX_EVENT_TRAIL`].
    pub event_trail: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            public_url: None,
            trusted_proxies: Vec::new(),
            event_trail: crate::trail::DEFAULT_CAPACITY,
        }
    }
}

/// The largest `[server] event_trail`: about 5 GB of memory at ≈ 460 bytes an event.
pub const MAX_EVENT_TRAIL: usize = 10_000_000;

/// One problem in the file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every problem found in a file (never empty), in the order they appear in it.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and checks the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &file),
        Err(error) => Err(ConfigErrors(vec![ConfigError {
            file,
            line: 1,
            col: 1,
            message: format!("cannot read the config file: {error}"),
        }])),
    }
}

/// Checks the text of a config file; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let mut reader = Reader {
        file,
        text,
        errors: Vec::new(),
    };
    let config = match parse_toml(text) {
        Ok((mut values, document)) => {
            for (at, message) in crate::config::env_vars::expand_table(&mut values, &document, text)
            {
                reader.error(at, message);
            }
            let root = Section {
                values: &values,
                place: Place {
                    table: Some(document.as_table()),
                    start: 0,
                },
                path: None,
            };
            reader.config(root)
        }
        Err((at, message)) => {
            reader.error(at, message);
            Config::default()
        }
    };
    if reader.errors.is_empty() {
        return Ok(config);
    }
    // Stable, so problems found at one place keep the order they were found in.
    reader.errors.sort_by_key(|error| (error.line, error.col));
    Err(ConfigErrors(reader.errors))
}

/// Parses `"N/s"`, `"N/m"` or `"N/h"`, N a positive integer.
pub fn parse_rate(s: &str) -> Result<RateLimit, String> {
    let expected = || format!("bad rate `{s}`: expected \"N/s\", \"N/m\" or \"N/h\"");
    let (count, unit) = s.split_once('/').ok_or_else(expected)?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(expected()),
    };
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected());
    }
    let requests = count
        .parse::<u32>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad rate `{s}`: N must be from 1 to {}", u32::MAX))?;
    Ok(RateLimit {
        requests,
        per: Duration::from_secs(seconds),
    })
}

/// Writes a rate the way the config does (`"N/s"`, `"N/m"`, `"N/h"`).
pub fn format_rate(rate: &RateLimit) -> String {
    match rate.per.as_secs() {
        1 => format!("{}/s", rate.requests),
        60 => format!("{}/m", rate.requests),
        3600 => format!("{}/h", rate.requests),
        _ => format!(
            "{} per {}",
            rate.requests,
            humantime::format_duration(rate.per)
        ),
    }
}

/// The longest duration any key takes. Times computed from a longer one (`now() + timeout`
/// for a claim's lease) leave Postgres's range, and the claim that hits one fails for every
/// destination at once; no real setting comes near it.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses a duration such as `"10s"`, `"500ms"`, `"10m"` or `"4h"`; zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let duration = parse_duration_or_zero(s)?;
    if duration.is_zero() {
        return Err(format!("bad duration `{s}`: must be longer than zero"));
    }
    Ok(duration)
}

/// [`parse_duration`] that takes zero (`[archive] retention = "0s"` turns the archive off).
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(s).map_err(|e| format!("bad duration `{s}`: {e}"))?;
    if duration > MAX_DURATION {
        return Err(format!("bad duration `{s}`: longer than 100 years"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests;
