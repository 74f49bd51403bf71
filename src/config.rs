//! The config file: sources, destinations, limits and security, with every error located.
//!
//! Loading parses the TOML once for values and once (with `toml_edit`) for positions, so that
//! `switchyard check` can print each problem as `file:line:col: message`.

use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::destination::Destination;

/// A whole, valid config.
#[derive(Clone, Default)]
pub struct Config {
    pub sources: Vec<SourceConfig>,
    pub destinations: Vec<DestinationConfig>,
    pub limits: LimitsConfig,
    pub security: SecurityConfig,
}

/// `[[sources]]`: an app or service that sends events with its write key.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub write_key: String,
}

/// `[[destinations]]`: where events go, and how.
#[derive(Clone)]
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
    /// The plugin, built from the kind's own keys.
    pub plugin: Arc<dyn Destination>,
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
}
