//! The config file: sources, destinations, limits and security, with every error located.
//!
//! Loading parses the TOML once for values and once (with `toml_edit`) for positions, so that
//! `switchyard check` can print each problem as `file:line:col: message`.

pub mod env_vars;
pub mod redact;

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use toml_edit::{ImDocument, Item, Key, TableLike};
use url::Url;

use crate::destination::{Built, Destination, Kind, RetryAfterCap, SettingError, Settings};
use crate::destinations;
use crate::destinations::webhook::parse_http_url;

/// A whole, valid config.
#[derive(Clone, Default)]
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
    /// `where`, `consent` and `sample`: decided at ingest routing.
    pub gate: crate::filter::Gate,
    /// `transform`, `drop_properties` and `allow_properties`: applied at delivery (the plugin
    /// below already runs behind them).
    pub shaping: Arc<crate::filter::Shaping>,
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

/// Parses a duration such as `"10s"`, `"500ms"`, `"10m"` or `"4h"`; zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(s).map_err(|e| format!("bad duration `{s}`: {e}"))?;
    if duration.is_zero() {
        return Err(format!("bad duration `{s}`: must be longer than zero"));
    }
    Ok(duration)
}

const TOP_LEVEL_KEYS: &[&str] = &[
    "sources",
    "destinations",
    "limits",
    "security",
    "server",
    "archive",
];
const ARCHIVE_KEYS: &[&str] = &["retention"];
const SOURCE_KEYS: &[&str] = &["name", "write_key", "allowed_origins"];
/// The keys every destination takes; the rest of its table belongs to its kind.
const DESTINATION_KEYS: &[&str] = &[
    "name",
    "kind",
    "sources",
    "events",
    "rate_limit",
    "rate_limit_key",
    "max_in_flight",
    "batch_size",
    "timeout",
    "retry",
    "ordering",
    "endpoint",
    "enabled",
    "where",
    "drop_properties",
    "allow_properties",
    "sample",
    "transform",
    "transform_timeout",
    "consent",
];
const RETRY_KEYS: &[&str] = &["max_attempts", "max_age", "initial_backoff", "max_backoff"];
const LIMITS_KEYS: &[&str] = &[
    "max_queued",
    "max_queued_per_source",
    "max_concurrent_deliveries",
];
const SECURITY_KEYS: &[&str] = &["deny_private_networks", "allow_networks", "ca_file"];
const SERVER_KEYS: &[&str] = &["public_url", "trusted_proxies", "event_trail"];

const DEFAULT_MAX_IN_FLIGHT: usize = 32;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_TRANSFORM_TIMEOUT: Duration = Duration::from_millis(50);
const A_DURATION: &str = "a duration such as \"10s\"";

/// The file's values, and the same file parsed with positions; or the syntax error, located.
fn parse_toml(text: &str) -> Result<(toml::Table, ImDocument<&str>), (usize, String)> {
    let syntax = |span: Option<std::ops::Range<usize>>, message: &str| {
        let message = message.trim().replace('\n', "; ");
        (span.map_or(0, |span| span.start), message)
    };
    let values = toml::from_str::<toml::Table>(text).map_err(|e| syntax(e.span(), e.message()))?;
    let document = ImDocument::parse(text).map_err(|e| syntax(e.span(), e.message()))?;
    Ok((values, document))
}

/// Where byte `decoded` of a string value sits in the file, relative to the value's start
/// (`raw`, from its opening quote on): past the quotes, and past each escape in a basic string.
fn string_offset(raw: &str, decoded: usize) -> usize {
    let (quote, literal) = if raw.starts_with("'''") || raw.starts_with("\"\"\"") {
        let skip = if raw[3..].starts_with('\n') { 4 } else { 3 };
        (skip, raw.starts_with('\''))
    } else {
        (1, raw.starts_with('\''))
    };
    let body = &raw[quote.min(raw.len())..];
    if literal {
        return quote + decoded;
    }
    let (mut read, mut written) = (0, 0);
    let mut chars = body.char_indices();
    while written < decoded {
        let Some((at, c)) = chars.next() else {
            break;
        };
        read = at + c.len_utf8();
        if c == '\\' {
            // `\uXXXX` and `\UXXXXXXXX` stand for one character; other escapes for one byte.
            let width = match chars.next() {
                Some((_, 'u')) => 4,
                Some((_, 'U')) => 8,
                Some((at, escaped)) => {
                    read = at + escaped.len_utf8();
                    written += 1;
                    continue;
                }
                None => break,
            };
            let mut code = String::new();
            for _ in 0..width {
                if let Some((at, hex)) = chars.next() {
                    code.push(hex);
                    read = at + 1;
                }
            }
            written += u32::from_str_radix(&code, 16)
                .ok()
                .and_then(char::from_u32)
                .map_or(1, char::len_utf8);
        } else {
            written += c.len_utf8();
        }
    }
    quote + read
}

/// 1-based line and character column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// Where one table sits in the file, to locate its problems.
#[derive(Clone, Copy)]
struct Place<'d> {
    /// The table as parsed with positions; `None` if it is not one there (every problem is then
    /// reported at `start`).
    table: Option<&'d dyn TableLike>,
    /// Where the table starts (its `[header]`, or its key when dotted or inline); a missing key
    /// is reported here.
    start: usize,
}

impl<'d> Place<'d> {
    fn item(&self, key: &str) -> Option<&'d Item> {
        self.table?.get(key)
    }

    fn key(&self, key: &str) -> usize {
        self.table
            .and_then(|table| table.key(key))
            .and_then(Key::span)
            .map_or(self.start, |span| span.start)
    }

    fn value(&self, key: &str) -> usize {
        self.item(key)
            .and_then(Item::span)
            .map_or_else(|| self.key(key), |span| span.start)
    }

    fn table(&self, key: &str) -> Place<'d> {
        Place {
            table: self.item(key).and_then(Item::as_table_like),
            start: self.value(key),
        }
    }

    /// Element `index` of the array (of tables, or of values) at `key`.
    fn element(&self, key: &str, index: usize) -> Place<'d> {
        let element = match self.item(key) {
            Some(Item::ArrayOfTables(tables)) => tables
                .get(index)
                .map(|table| (Some(table as &dyn TableLike), table.span())),
            Some(Item::Value(toml_edit::Value::Array(array))) => array.get(index).map(|value| {
                let table = value.as_inline_table().map(|t| t as &dyn TableLike);
                (table, value.span())
            }),
            _ => None,
        };
        let (table, span) = element.unwrap_or((None, None));
        Place {
            table,
            start: span.map_or_else(|| self.value(key), |span| span.start),
        }
    }
}

/// One table of the file: its values, where it sits, and the name of its keys in messages.
#[derive(Clone, Copy)]
struct Section<'v, 'd> {
    values: &'v toml::Table,
    place: Place<'d>,
    /// The key of a nested table (`retry`, `limits`), which prefixes its keys in messages.
    path: Option<&'static str>,
}

impl Section<'_, '_> {
    fn name(&self, key: &str) -> String {
        match self.path {
            Some(path) => format!("{path}.{key}"),
            None => key.to_owned(),
        }
    }
}

/// Reads a parsed file into a [`Config`], collecting every problem on the way.
struct Reader<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Reader<'_> {
    fn error(&mut self, at: usize, message: impl Into<String>) {
        let (line, col) = line_col(self.text, at);
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line,
            col,
            // Errors are logged and answered by the reload API: no URL's secrets in them.
            message: crate::config::redact::urls_in(&message.into()),
        });
    }

    fn config(&mut self, root: Section) -> Config {
        self.unknown_keys(root, TOP_LEVEL_KEYS);
        let mut source_names = HashSet::new();
        let sources = self.sources(root, &mut source_names);
        let mut destination_names = HashSet::new();
        let destinations = self
            .tables(root, "destinations")
            .into_iter()
            .filter_map(|table| self.destination(table, &source_names, &mut destination_names))
            .collect();
        Config {
            sources,
            destinations,
            limits: self.limits(root),
            security: self.security(root),
            server: self.server(root),
            archive: self.archive(root),
        }
    }

    fn archive(&mut self, root: Section) -> ArchiveConfig {
        let defaults = ArchiveConfig::default();
        let Some(table) = self.table(root, "archive") else {
            return defaults;
        };
        self.unknown_keys(table, ARCHIVE_KEYS);
        // Zero is allowed here: it turns the archive off.
        let retention = self.parsed(table, "retention", A_DURATION, |text| {
            humantime::parse_duration(text).map_err(|e| format!("bad duration `{text}`: {e}"))
        });
        ArchiveConfig {
            retention: retention.unwrap_or(defaults.retention),
        }
    }

    /// The `[[sources]]`; `names` gets the name of every one that has one.
    fn sources<'v>(
        &mut self,
        root: Section<'v, '_>,
        names: &mut HashSet<&'v str>,
    ) -> Vec<SourceConfig> {
        let mut write_keys = HashSet::new();
        let mut sources = Vec::new();
        for table in self.tables(root, "sources") {
            self.unknown_keys(table, SOURCE_KEYS);
            let name = self.required_text(table, "name");
            let write_key = self.required_text(table, "write_key");
            if let Some(name) = name {
                if !names.insert(name) {
                    let message = format!("duplicate source name `{name}`");
                    self.error(table.place.value("name"), message);
                }
            }
            if let Some(write_key) = write_key {
                if !write_keys.insert(write_key) {
                    // The key itself is a secret: the position says which one it is.
                    let message = "duplicate write_key: another source uses it".to_owned();
                    self.error(table.place.value("write_key"), message);
                }
            }
            let allowed_origins = self.allowed_origins(table);
            if let (Some(name), Some(write_key)) = (name, write_key) {
                sources.push(SourceConfig {
                    name: name.to_owned(),
                    write_key: write_key.to_owned(),
                    allowed_origins,
                });
            }
        }
        sources
    }

    /// One `[[destinations]]` table; `None` when it has problems (they are recorded).
    fn destination<'v>(
        &mut self,
        table: Section<'v, '_>,
        source_names: &HashSet<&str>,
        names: &mut HashSet<&'v str>,
    ) -> Option<DestinationConfig> {
        let name = self.required_text(table, "name");
        if let Some(name) = name {
            if !names.insert(name) {
                let message = format!("duplicate destination name `{name}`");
                self.error(table.place.value("name"), message);
            }
        }
        let kind = self
            .required_text(table, "kind")
            .and_then(|kind| self.known_kind(table, kind));
        let sources = self.strings(table, "sources");
        for (index, source) in sources.iter().flatten().enumerate() {
            if !source_names.contains(source.as_str()) {
                let at = table.place.element("sources", index).start;
                self.error(at, format!("unknown source `{source}`"));
            }
        }
        let events = self.strings(table, "events");
        let rate_limit = self.parsed(table, "rate_limit", "a rate such as \"10/s\"", parse_rate);
        let rate_limit_key = self.text(table, "rate_limit_key");
        let max_in_flight = self.positive(table, "max_in_flight");
        let batch_size = self.positive::<usize>(table, "batch_size");
        let timeout = self.parsed(table, "timeout", A_DURATION, parse_duration);
        let retry = self.retry(table);
        let ordering = self.get(
            table,
            "ordering",
            "\"none\" or \"per_user\"",
            |value| match value.as_str()? {
                "none" => Some(Ordering::None),
                "per_user" => Some(Ordering::PerUser),
                _ => None,
            },
        );
        let endpoint = self.parsed(table, "endpoint", "a URL", parse_http_url);
        let enabled = self.get(table, "enabled", "a boolean", toml::Value::as_bool);
        let gate = self.gate(table);
        let shaping = Arc::new(self.shaping(table));

        let kind = kind?;
        let built = self.build(table, kind, name.unwrap_or_default(), endpoint.as_ref())?;
        let name = name?;
        let rate_limit_key = match (rate_limit_key, built.credential) {
            (Some(key), _) => key.to_owned(),
            (None, Some(credential)) => format!("{}:{credential}", kind.name),
            (None, None) => name.to_owned(),
        };
        let defaults = kind.defaults;
        let batch_size = batch_size
            .unwrap_or(defaults.batch_size)
            .min(defaults.max_batch_size);
        let metadata = crate::filter::Metadata {
            destination_name: name.to_owned(),
            destination_kind: kind.name.to_owned(),
        };
        let plugin = RetryAfterCap::wrap(built.plugin, retry.max_backoff);
        Some(DestinationConfig {
            name: name.to_owned(),
            kind: kind.name.to_owned(),
            sources,
            events,
            rate_limit: rate_limit.or_else(|| {
                let (requests, per) = defaults.rate_limit?;
                Some(RateLimit { requests, per })
            }),
            rate_limit_key,
            max_in_flight: max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            batch_size,
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
            retry,
            ordering: ordering.unwrap_or_default(),
            endpoint,
            enabled: enabled.unwrap_or(true),
            gate,
            plugin: crate::filter::Shaped::wrap(plugin, shaping.clone(), metadata, batch_size),
            shaping,
        })
    }

    /// `where`, `consent` and `sample`.
    fn gate(&mut self, table: Section) -> crate::filter::Gate {
        let condition = self.text(table, "where").and_then(|text| {
            match crate::filter::fql::Expr::parse(text) {
                Ok(expr) => Some(crate::filter::Where {
                    text: text.to_owned(),
                    expr,
                }),
                Err(error) => {
                    let start = table.place.value("where");
                    let at = start + string_offset(&self.text[start..], error.offset);
                    self.error(at, format!("`where`: {}", error.message));
                    None
                }
            }
        });
        let sample = self.get(table, "sample", "a number from 0 to 1", |value| {
            let fraction = value
                .as_float()
                .or_else(|| value.as_integer().map(|n| n as f64))?;
            (0.0..=1.0).contains(&fraction).then_some(fraction)
        });
        crate::filter::Gate {
            condition,
            consent: self.strings(table, "consent").unwrap_or_default(),
            sample,
        }
    }

    /// `transform`, `transform_timeout`, `drop_properties` and `allow_properties`.
    fn shaping(&mut self, table: Section) -> crate::filter::Shaping {
        let mut drop = Vec::new();
        let paths = self.strings(table, "drop_properties").unwrap_or_default();
        for (index, text) in paths.iter().enumerate() {
            match crate::filter::parse_path(text) {
                Some(path) => drop.push(path),
                None => {
                    let at = table.place.element("drop_properties", index).start;
                    self.error(at, format!("`drop_properties`: `{text}` is not a dotted path such as \"context.ip\""));
                }
            }
        }
        let timeout = self
            .parsed(table, "transform_timeout", A_DURATION, parse_duration)
            .unwrap_or(DEFAULT_TRANSFORM_TIMEOUT);
        let transform = self.text(table, "transform").and_then(|text| {
            let base = Path::new(self.file).parent().unwrap_or(Path::new(""));
            let path = base.join(text);
            let loaded = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read `{}`: {e}", path.display()))
                .and_then(|source| {
                    crate::filter::transform::Transform::compile(&path, source, timeout)
                });
            loaded
                .map_err(|message| {
                    self.error(
                        table.place.value("transform"),
                        format!("`transform`: {message}"),
                    )
                })
                .ok()
        });
        crate::filter::Shaping {
            transform,
            drop,
            allow: self.strings(table, "allow_properties"),
        }
    }

    fn known_kind(&mut self, table: Section, name: &str) -> Option<&'static Kind> {
        let kind = destinations::kind(name);
        if kind.is_none() {
            let known: Vec<&str> = destinations::KINDS.iter().map(|kind| kind.name).collect();
            let message = format!("unknown kind `{name}` (known: {})", known.join(", "));
            self.error(table.place.value("kind"), message);
        }
        kind
    }

    /// Builds the destination's plugin from the keys that belong to its kind.
    fn build(
        &mut self,
        table: Section,
        kind: &Kind,
        name: &str,
        endpoint: Option<&Url>,
    ) -> Option<Built> {
        let own: toml::Table = table
            .values
            .iter()
            .filter(|(key, _)| !DESTINATION_KEYS.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let settings = Settings {
            name,
            table: &own,
            endpoint,
        };
        let errors = match (kind.build)(&settings) {
            Ok(built) => return Some(built),
            Err(errors) => errors,
        };
        for error in errors {
            let at = match &error.key {
                Some(key) => table.place.key(key),
                None => table.place.start,
            };
            self.error(at, kind_message(kind, &error));
        }
        None
    }

    fn retry(&mut self, destination: Section) -> RetryPolicy {
        let defaults = RetryPolicy::default();
        let Some(table) = self.table(destination, "retry") else {
            return defaults;
        };
        self.unknown_keys(table, RETRY_KEYS);
        let duration =
            |reader: &mut Self, key| reader.parsed(table, key, A_DURATION, parse_duration);
        let policy = RetryPolicy {
            max_attempts: self
                .positive(table, "max_attempts")
                .unwrap_or(defaults.max_attempts),
            max_age: duration(self, "max_age").unwrap_or(defaults.max_age),
            initial_backoff: duration(self, "initial_backoff").unwrap_or(defaults.initial_backoff),
            max_backoff: duration(self, "max_backoff").unwrap_or(defaults.max_backoff),
        };
        if policy.initial_backoff > policy.max_backoff {
            let key = if table.values.contains_key("initial_backoff") {
                "initial_backoff"
            } else {
                "max_backoff"
            };
            let message = format!(
                "`retry.initial_backoff` ({}) is longer than `retry.max_backoff` ({})",
                humantime::format_duration(policy.initial_backoff),
                humantime::format_duration(policy.max_backoff),
            );
            self.error(table.place.value(key), message);
        }
        policy
    }

    fn limits(&mut self, root: Section) -> LimitsConfig {
        let defaults = LimitsConfig::default();
        let Some(table) = self.table(root, "limits") else {
            return defaults;
        };
        self.unknown_keys(table, LIMITS_KEYS);
        LimitsConfig {
            max_queued: self.positive(table, "max_queued"),
            max_queued_per_source: self.positive(table, "max_queued_per_source"),
            max_concurrent_deliveries: self
                .positive(table, "max_concurrent_deliveries")
                .unwrap_or(defaults.max_concurrent_deliveries),
        }
    }

    fn security(&mut self, root: Section) -> SecurityConfig {
        let defaults = SecurityConfig::default();
        let Some(table) = self.table(root, "security") else {
            return defaults;
        };
        self.unknown_keys(table, SECURITY_KEYS);
        SecurityConfig {
            deny_private_networks: self
                .get(
                    table,
                    "deny_private_networks",
                    "a boolean",
                    toml::Value::as_bool,
                )
                .unwrap_or(defaults.deny_private_networks),
            allow_networks: self.networks(table, "allow_networks"),
            ca_file: self.ca_file(table),
        }
    }

    /// `ca_file`: a readable PEM file with at least one certificate.
    fn ca_file(&mut self, table: Section) -> Option<std::path::PathBuf> {
        let text = self.text(table, "ca_file")?;
        let base = Path::new(self.file).parent().unwrap_or(Path::new(""));
        let path = base.join(text);
        match crate::delivery::sender::read_roots(&path) {
            Ok(_) => Some(path),
            Err(message) => {
                self.error(
                    table.place.value("ca_file"),
                    format!("`ca_file`: {message}"),
                );
                None
            }
        }
    }

    fn server(&mut self, root: Section) -> ServerConfig {
        let Some(table) = self.table(root, "server") else {
            return ServerConfig::default();
        };
        self.unknown_keys(table, SERVER_KEYS);
        let public_url = self.parsed(table, "public_url", "a URL", |text| {
            let url =
                Url::parse(text).map_err(|e| format!("`public_url`: bad URL `{text}`: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(format!(
                    "`public_url` must be an http:// or https:// URL with a host, not `{text}`"
                ));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err("`public_url` must not have a query or a fragment".into());
            }
            Ok(url)
        });
        ServerConfig {
            public_url,
            trusted_proxies: self.networks(table, "trusted_proxies"),
            event_trail: self.event_trail(table),
        }
    }

    /// `event_trail`: a whole number of events, 0 to [`MAX_EVENT_TRAIL`].
    fn event_trail(&mut self, table: Section) -> usize {
        let default = crate::trail::DEFAULT_CAPACITY;
        let Some(number) = self.get(table, "event_trail", "an integer", toml::Value::as_integer)
        else {
            return default;
        };
        match usize::try_from(number) {
            Ok(events) if events <= MAX_EVENT_TRAIL => events,
            _ => {
                let message = format!(
                    "`server.event_trail` must be 0 (off) to {MAX_EVENT_TRAIL} events, not {number}"
                );
                self.error(table.place.value("event_trail"), message);
                default
            }
        }
    }

    /// A source's `allowed_origins`: `"*"` or origins such as `"https://shop.example"`.
    fn allowed_origins(&mut self, table: Section) -> crate::http::browser::AllowedOrigins {
        let mut origins = Vec::new();
        for (index, text) in self
            .strings(table, "allowed_origins")
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            match crate::http::browser::parse_origin(text) {
                Ok(origin) => origins.push(origin),
                Err(message) => {
                    let at = table.place.element("allowed_origins", index).start;
                    self.error(at, format!("`allowed_origins`: {message}"));
                }
            }
        }
        crate::http::browser::AllowedOrigins::new(origins)
    }

    /// An array of networks (`"10.0.0.0/8"`) or single addresses.
    fn networks(&mut self, table: Section, key: &str) -> Vec<ipnet::IpNet> {
        let mut networks = Vec::new();
        for (index, text) in self
            .strings(table, key)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(network) => networks.push(network),
                Err(_) => {
                    let at = table.place.element(key, index).start;
                    let message = format!(
                        "`{}`: `{text}` is not a network (\"10.0.0.0/8\") or an address",
                        table.name(key)
                    );
                    self.error(at, message);
                }
            }
        }
        networks
    }

    fn unknown_keys(&mut self, table: Section, allowed: &[&str]) {
        for key in table.values.keys() {
            if !allowed.contains(&key.as_str()) {
                let message = format!(
                    "unknown key `{}` (allowed: {})",
                    table.name(key),
                    allowed.join(", ")
                );
                self.error(table.place.key(key), message);
            }
        }
    }

    /// The value at `key` converted by `convert`; a value it refuses is reported as not being
    /// `expected`. `None` also when the key is absent.
    fn get<'v, T>(
        &mut self,
        table: Section<'v, '_>,
        key: &str,
        expected: &str,
        convert: impl FnOnce(&'v toml::Value) -> Option<T>,
    ) -> Option<T> {
        let converted = convert(table.values.get(key)?);
        if converted.is_none() {
            let message = format!("`{}` must be {expected}", table.name(key));
            self.error(table.place.value(key), message);
        }
        converted
    }

    /// A string read by `parse`, whose message is reported at the value.
    fn parsed<T>(
        &mut self,
        table: Section,
        key: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.get(table, key, expected, toml::Value::as_str)?;
        parse(text)
            .map_err(|message| self.error(table.place.value(key), message))
            .ok()
    }

    /// A non-empty string.
    fn text<'v>(&mut self, table: Section<'v, '_>, key: &str) -> Option<&'v str> {
        let text = self.get(table, key, "a string", toml::Value::as_str)?;
        if text.is_empty() {
            let message = format!("`{}` must not be empty", table.name(key));
            self.error(table.place.value(key), message);
            return None;
        }
        Some(text)
    }

    fn required_text<'v>(&mut self, table: Section<'v, '_>, key: &str) -> Option<&'v str> {
        if !table.values.contains_key(key) {
            let message = format!("missing key `{}`", table.name(key));
            self.error(table.place.start, message);
        }
        self.text(table, key)
    }

    fn strings(&mut self, table: Section, key: &str) -> Option<Vec<String>> {
        self.get(table, key, "an array of strings", |value| {
            value
                .as_array()?
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
    }

    /// An integer of at least 1 that fits `T`.
    fn positive<T: TryFrom<i64>>(&mut self, table: Section, key: &str) -> Option<T> {
        let number = self.get(table, key, "an integer", toml::Value::as_integer)?;
        let checked = if number < 1 {
            Err("must be at least 1")
        } else {
            T::try_from(number).map_err(|_| "is too large")
        };
        checked
            .map_err(|problem| {
                let message = format!("`{}` {problem}", table.name(key));
                self.error(table.place.value(key), message);
            })
            .ok()
    }

    /// The table at `key`, its keys named `key.*` in messages.
    fn table<'v, 'd>(
        &mut self,
        parent: Section<'v, 'd>,
        key: &'static str,
    ) -> Option<Section<'v, 'd>> {
        let values = self.get(parent, key, "a table", toml::Value::as_table)?;
        Some(Section {
            values,
            place: parent.place.table(key),
            path: Some(key),
        })
    }

    /// The tables of the array of tables (`[[key]]`) at `key`.
    fn tables<'v, 'd>(&mut self, parent: Section<'v, 'd>, key: &str) -> Vec<Section<'v, 'd>> {
        let expected = format!("an array of tables ([[{key}]])");
        let Some(array) = self.get(parent, key, &expected, toml::Value::as_array) else {
            return Vec::new();
        };
        let mut tables = Vec::new();
        for (index, value) in array.iter().enumerate() {
            let place = parent.place.element(key, index);
            match value.as_table() {
                Some(values) => tables.push(Section {
                    values,
                    place,
                    path: None,
                }),
                None => self.error(place.start, format!("each of `{key}` must be a table")),
            }
        }
        tables
    }
}

/// A kind's complaint as a user should read it. An unknown key is called that, since it may as
/// well be a misspelt key every destination takes as one of the kind's own.
fn kind_message(kind: &Kind, error: &SettingError) -> String {
    let unknown = error.key.as_deref().and_then(|key| {
        let expected = error
            .message
            .strip_prefix(&format!("unknown field `{key}`, "))?;
        Some((key, expected))
    });
    match unknown {
        Some((key, expected)) => format!(
            "unknown key `{key}` for a `{}` destination ({expected}, or a key every destination takes)",
            kind.name
        ),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(text, "switchyard.toml") {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn destination(text: &str) -> DestinationConfig {
        let config = parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        config
            .destinations
            .into_iter()
            .next()
            .expect("one destination")
    }

    #[test]
    fn the_smallest_file_gets_the_documented_defaults() {
        let text = r#"
[[sources]]
name = "web"
write_key = "wk_web_123"

[[destinations]]
name = "orders"
kind = "webhook"
url = "http://127.0.0.1:9000/in"
"#;
        let config = parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.sources.len(), 1);
        assert_eq!(config.sources[0].name, "web");
        assert_eq!(config.sources[0].write_key, "wk_web_123");
        let [orders] = &config.destinations[..] else {
            panic!("one destination expected");
        };
        assert_eq!(orders.name, "orders");
        assert_eq!(orders.kind, "webhook");
        assert_eq!(orders.sources, None);
        assert_eq!(orders.events, None);
        assert_eq!(orders.rate_limit, None);
        assert_eq!(orders.rate_limit_key, "orders");
        assert_eq!(orders.max_in_flight, 32);
        assert_eq!(orders.batch_size, 1);
        assert_eq!(orders.timeout, Duration::from_secs(10));
        assert_eq!(orders.retry, RetryPolicy::default());
        assert_eq!(orders.ordering, Ordering::None);
        assert_eq!(orders.endpoint, None);
        assert!(orders.enabled);
        assert_eq!(config.limits, LimitsConfig::default());
        assert_eq!(config.limits.max_concurrent_deliveries, 512);
        assert_eq!(config.security, SecurityConfig::default());
    }

    #[test]
    fn an_empty_file_is_an_empty_config() {
        let config = parse("", "t.toml").unwrap_or_else(|e| panic!("{e}"));
        assert!(config.sources.is_empty() && config.destinations.is_empty());
    }

    #[test]
    fn every_error_is_reported_where_it_is() {
        let text = r#"colour = "blue"

[[sources]]
name = "web"
write_key = "wk_web"

[[destinations]]
name = "orders"
kind = "webhook"
url = "ftp://example.com/in"
retries = 3
rate_limit = "5 per s"
sources = ["web", "app"]

[[destinations]]
name = "orders"
kind = "carrier-pigeon"
timeout = "soon"
"#;
        let known: Vec<&str> = destinations::KINDS.iter().map(|k| k.name).collect();
        let unknown_kind = format!(
            "switchyard.toml:17:8: unknown kind `carrier-pigeon` (known: {})",
            known.join(", ")
        );
        assert_eq!(
            errors(text),
            [
                "switchyard.toml:1:1: unknown key `colour` \
                 (allowed: sources, destinations, limits, security, server, archive)",
                "switchyard.toml:10:1: `url`: `ftp://example.com/***` must be an http:// or https:// URL",
                "switchyard.toml:11:1: unknown key `retries` for a `webhook` destination \
                 (expected one of `url`, `urls`, `secret`, `headers`, `balance`, \
                 `use_utilization`, `ramp_up`, `stats_decay`, or a key every destination takes)",
                "switchyard.toml:12:14: bad rate `5 per s`: expected \"N/s\", \"N/m\" or \"N/h\"",
                "switchyard.toml:13:19: unknown source `app`",
                "switchyard.toml:16:8: duplicate destination name `orders`",
                &unknown_kind,
                "switchyard.toml:18:11: bad duration `soon`: expected number at 0",
            ]
        );
    }

    #[test]
    fn missing_and_ill_typed_keys_are_located() {
        let text = r#"[[sources]]
write_key = "wk"

[[sources]]
name = "app"
write_key = "wk"

[[destinations]]
kind = "webhook"
url = "http://localhost/in"
max_in_flight = "many"
batch_size = 0
retry = { max_attempts = 3, jitter = true }

[limits]
max_queued = -1

[security]
deny_private_networks = "yes"
"#;
        assert_eq!(
            errors(text),
            [
                "switchyard.toml:1:1: missing key `name`",
                "switchyard.toml:6:13: duplicate write_key: another source uses it",
                "switchyard.toml:8:1: missing key `name`",
                "switchyard.toml:11:17: `max_in_flight` must be an integer",
                "switchyard.toml:12:14: `batch_size` must be at least 1",
                "switchyard.toml:13:29: unknown key `retry.jitter` \
                 (allowed: max_attempts, max_age, initial_backoff, max_backoff)",
                "switchyard.toml:16:14: `limits.max_queued` must be at least 1",
                "switchyard.toml:19:25: `security.deny_private_networks` must be a boolean",
            ]
        );
    }

    #[test]
    fn dotted_retry_keys_are_the_retry_table() {
        let orders = destination(
            r#"
[[destinations]]
name = "orders"
kind = "webhook"
url = "http://localhost/in"
retry.max_attempts = 3
retry.max_backoff = "30s"
"#,
        );
        let expected = RetryPolicy {
            max_attempts: 3,
            max_backoff: Duration::from_secs(30),
            ..RetryPolicy::default()
        };
        assert_eq!(orders.retry, expected);

        let text = "[[destinations]]\nname = \"o\"\nkind = \"webhook\"\nurl = \"http://x/\"\n\
                    retry.max_attempts = 0\nretry.tries = 2\nretry.initial_backoff = \"1h\"\n";
        assert_eq!(
            errors(text),
            [
                "switchyard.toml:5:22: `retry.max_attempts` must be at least 1",
                "switchyard.toml:6:7: unknown key `retry.tries` \
                 (allowed: max_attempts, max_age, initial_backoff, max_backoff)",
                "switchyard.toml:7:25: `retry.initial_backoff` (1h) is longer than \
                 `retry.max_backoff` (10m)",
            ]
        );
    }

    #[test]
    fn batch_size_is_capped_at_the_kind_maximum() {
        let orders = destination(
            r#"
[[destinations]]
name = "orders"
kind = "webhook"
url = "http://localhost/in"
batch_size = 5000
"#,
        );
        assert_eq!(orders.batch_size, 1000, "webhook's max_batch_size");
    }

    #[test]
    fn common_keys_are_read() {
        let orders = destination(
            r#"
[[sources]]
name = "web"
write_key = "wk"

[[destinations]]
name = "orders"
kind = "webhook"
url = "http://localhost/in"
sources = ["web"]
events = ["Order Completed", "identify"]
rate_limit = "100/m"
rate_limit_key = "shared"
max_in_flight = 4
timeout = "500ms"
ordering = "per_user"
endpoint = "https://api.example.com"
enabled = false
"#,
        );
        assert_eq!(orders.sources, Some(vec!["web".to_owned()]));
        assert_eq!(
            orders.events,
            Some(vec!["Order Completed".to_owned(), "identify".to_owned()])
        );
        let per_minute = RateLimit {
            requests: 100,
            per: Duration::from_secs(60),
        };
        assert_eq!(orders.rate_limit, Some(per_minute));
        assert_eq!(orders.rate_limit_key, "shared");
        assert_eq!(orders.max_in_flight, 4);
        assert_eq!(orders.timeout, Duration::from_millis(500));
        assert_eq!(orders.ordering, Ordering::PerUser);
        assert_eq!(
            orders.endpoint.as_ref().map(Url::as_str),
            Some("https://api.example.com/")
        );
        assert!(!orders.enabled);
    }

    #[test]
    fn browser_and_server_keys_are_read_and_located() {
        let text = r#"
[[sources]]
name = "web"
write_key = "wk"
allowed_origins = ["https://Shop.example/", "shop.example"]

[server]
public_url = "ftp://events.example.com"
trusted_proxies = ["10.0.0.0/8"]
event_trail = -1

[security]
ca_file = "no-such-file.pem"
"#;
        let found = errors(text);
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(found[0].starts_with("switchyard.toml:5:45: `allowed_origins`: `shop.example`"));
        assert!(found[1].starts_with("switchyard.toml:8:14: `public_url` must be"));
        assert_eq!(
            found[2],
            "switchyard.toml:10:15: `server.event_trail` must be 0 (off) to 10000000 events, not -1"
        );
        assert!(found[3].starts_with("switchyard.toml:13:11: `ca_file`: cannot read"));
        assert!(errors(&text.replace("-1", "\"many\""))[2].contains("event_trail"));
        assert!(errors(&text.replace("-1", "10000001"))[2].contains("event_trail"));
        let default = parse(
            "[[sources]]\nname = \"web\"\nwrite_key = \"wk\"\n",
            "switchyard.toml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(default.server.event_trail, 50_000);
        let good = text
            .replace(", \"shop.example\"", "")
            .replace("ftp://", "https://")
            .replace("event_trail = -1", "event_trail = 0")
            .replace("ca_file = \"no-such-file.pem\"", "");
        let config = parse(&good, "switchyard.toml").unwrap_or_else(|e| panic!("{e}"));
        assert!(config.sources[0]
            .allowed_origins
            .allows("https://shop.example"));
        assert!(!config.sources[0]
            .allowed_origins
            .allows("https://other.example"));
        let server = &config.server;
        assert_eq!(
            server.public_url.as_ref().unwrap().as_str(),
            "https://events.example.com/"
        );
        assert_eq!(
            server.trusted_proxies,
            ["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
        );
        assert_eq!(server.event_trail, 0);
    }

    #[test]
    fn environment_references_are_expanded_or_located() {
        // PATH is set wherever tests run; the other name is nowhere.
        let path = std::env::var("PATH").unwrap();
        let text = "[[sources]]\nname = \"web\"\nwrite_key = \"wk_${PATH}\"\n\
                    [[destinations]]\nname = \"d\"\nkind = \"webhook\"\n\
                    url = \"http://127.0.0.1:9/in\"\nheaders = { x = \"$${PATH}\" }\n";
        let config = parse(text, "switchyard.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.sources[0].write_key, format!("wk_{path}"));
        let unset = text.replace("wk_${PATH}", "wk_${SWITCHYARD_SURELY_UNSET_42}");
        assert_eq!(
            errors(&unset),
            ["switchyard.toml:3:17: environment variable `SWITCHYARD_SURELY_UNSET_42` is not set"]
        );
    }

    #[test]
    fn filter_keys_are_read_and_their_errors_located() {
        let dir = std::env::temp_dir().join(format!("switchyard-filters-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ok.js"),
            "function transformEvent(e) { return e; }",
        )
        .unwrap();
        std::fs::write(dir.join("bad.js"), "function transformEvent(e) { return e;").unwrap();
        let file = dir.join("switchyard.toml");
        let text = r#"[[destinations]]
name = "d"
kind = "webhook"
url = "http://127.0.0.1:9/in"
where = "type = 'track' and properties.revenue > 100"
consent = ["Advertising"]
sample = 0.5
drop_properties = ["context.ip"]
allow_properties = ["revenue"]
transform = "ok.js"
transform_timeout = "20ms"
"#;
        std::fs::write(&file, text).unwrap();
        let config = load(&file).unwrap_or_else(|e| panic!("{e}"));
        let d = &config.destinations[0];
        assert_eq!(
            d.gate.condition.as_ref().unwrap().text,
            "type = 'track' and properties.revenue > 100"
        );
        assert_eq!(d.gate.consent, ["Advertising"]);
        assert_eq!(d.gate.sample, Some(0.5));
        assert_eq!(
            d.shaping.drop,
            [vec!["context".to_owned(), "ip".to_owned()]]
        );
        assert_eq!(d.shaping.allow, Some(vec!["revenue".to_owned()]));
        assert!(d.shaping.transform.is_some());

        let bad = r#"[[destinations]]
name = "d"
kind = "webhook"
url = "http://127.0.0.1:9/in"
where = "type = 'track' and"
sample = 1.5
drop_properties = ["a..b"]
transform = "bad.js"
[[destinations]]
name = "e"
kind = "webhook"
url = "http://127.0.0.1:9/in"
where = "frobnicate(event) = 1"
[[destinations]]
name = "f"
kind = "webhook"
url = "http://127.0.0.1:9/in"
where = 'match(event, "x") or contains(\'
"#;
        std::fs::write(&file, bad).unwrap();
        let errors: Vec<String> = load(&file)
            .err()
            .expect("errors")
            .0
            .iter()
            .map(ToString::to_string)
            .collect();
        let name = file.display();
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert_eq!(
            errors[0],
            format!("{name}:5:28: `where`: the expression ends where a value, a field or `(` was expected")
        );
        assert_eq!(
            errors[1],
            format!("{name}:6:10: `sample` must be a number from 0 to 1")
        );
        assert!(errors[2].starts_with(&format!("{name}:7:20: `drop_properties`: `a..b`")));
        assert!(
            errors[3].starts_with(&format!(
                "{name}:8:13: `transform`: {}",
                dir.join("bad.js").display()
            )),
            "{}",
            errors[3]
        );
        assert!(errors[3].contains("SyntaxError"), "{}", errors[3]);
        assert!(errors[4].starts_with(&format!(
            "{name}:13:10: `where`: unknown function `frobnicate`"
        )));
        assert!(
            errors[5].starts_with(&format!("{name}:18:40: `where`: `\\` at the end")),
            "{}",
            errors[5]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_syntax_error_is_located() {
        let text = "[[sources]]\nname = \"web\nwrite_key = \"wk\"\n";
        assert_eq!(errors(text), ["switchyard.toml:2:12: invalid basic string"]);
    }

    #[test]
    fn columns_count_characters() {
        let text = "[[sources]]\nname = \"wéb\"\nwrite_key = \"wk\"\nbogus = 1 # «x»\n\
                    [[sources]]\nname = \"wéb\"\n   write_key = \"k2\"";
        assert_eq!(
            errors(text),
            [
                "switchyard.toml:4:1: unknown key `bogus` (allowed: name, write_key, allowed_origins)",
                "switchyard.toml:6:8: duplicate source name `wéb`",
            ]
        );
    }

    #[test]
    fn an_unreadable_file_is_one_error() {
        let path = Path::new("/nonexistent/switchyard.toml");
        let errors = load(path).err().expect("an error");
        assert_eq!(errors.0.len(), 1);
        assert_eq!((errors.0[0].line, errors.0[0].col), (1, 1));
        assert!(errors.0[0]
            .message
            .starts_with("cannot read the config file"));
    }

    #[test]
    fn rates() {
        let rate = |requests, seconds| RateLimit {
            requests,
            per: Duration::from_secs(seconds),
        };
        assert_eq!(parse_rate("10/s"), Ok(rate(10, 1)));
        assert_eq!(parse_rate("600/m"), Ok(rate(600, 60)));
        assert_eq!(parse_rate("1/h"), Ok(rate(1, 3600)));
        for bad in [
            "", "10", "10/d", "/s", "+5/s", "5 /s", "5/sec", "-1/s", "1.5/s",
        ] {
            assert_eq!(
                parse_rate(bad),
                Err(format!(
                    "bad rate `{bad}`: expected \"N/s\", \"N/m\" or \"N/h\""
                ))
            );
        }
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("99999999999/s").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert_eq!(
            parse_duration("0s"),
            Err("bad duration `0s`: must be longer than zero".to_owned())
        );
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
