//! Reading a parsed file into a [`Config`]: every key checked, every problem located and
//! collected rather than stopping at the first. One reader, one pass over the file: long, but
//! one thing (the config's grammar, table by table).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use super::position::{line_col, string_offset, Section};
use super::*;
use crate::destination::{Built, Kind, SettingError, Settings};
use crate::destinations;
use crate::destinations::webhook::parse_http_url;

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

/// The most requests `max_in_flight` and `limits.max_concurrent_deliveries` may allow at once:
/// far past what one process can hold open, and below what a semaphore can count (a larger
/// value passed `switchyard check`, then made `serve` panic at start).
const MAX_CONCURRENCY: i64 = 100_000;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

const DEFAULT_TRANSFORM_TIMEOUT: Duration = Duration::from_millis(50);

const A_DURATION: &str = "a duration such as \"10s\"";

/// Reads a parsed file into a [`Config`], collecting every problem on the way.
pub(super) struct Reader<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
    pub(super) errors: Vec<ConfigError>,
}

impl Reader<'_> {
    pub(super) fn error(&mut self, at: usize, message: impl Into<String>) {
        let (line, col) = line_col(self.text, at);
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line,
            col,
            // Errors are logged and answered by the reload API: no URL's secrets in them.
            message: crate::config::redact::urls_in(&message.into()),
        });
    }

    pub(super) fn config(&mut self, root: Section) -> Config {
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
        let retention = self.parsed(table, "retention", A_DURATION, parse_duration_or_zero);
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
        let max_in_flight = self.positive_up_to(table, "max_in_flight", MAX_CONCURRENCY);
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
        let (own, built) =
            self.check_kind(table, kind, name.unwrap_or_default(), endpoint.as_ref())?;
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
            shaping,
            settings: KindSettings(own),
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

    /// Checks the keys that belong to the destination's kind by building its plugin once
    /// (the pipeline builds the one that runs); returns those keys, and what the kind says.
    fn check_kind(
        &mut self,
        table: Section,
        kind: &Kind,
        name: &str,
        endpoint: Option<&Url>,
    ) -> Option<(toml::Table, Built)> {
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
            Ok(built) => return Some((own, built)),
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
                .positive_up_to(table, "max_concurrent_deliveries", MAX_CONCURRENCY)
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
        self.positive_up_to(table, key, i64::MAX)
    }

    /// An integer from 1 to `max` that fits `T`.
    fn positive_up_to<T: TryFrom<i64>>(
        &mut self,
        table: Section,
        key: &str,
        max: i64,
    ) -> Option<T> {
        let number = self.get(table, key, "an integer", toml::Value::as_integer)?;
        let checked = if number < 1 {
            Err("must be at least 1".to_owned())
        } else if number > max {
            Err(format!("must be at most {max}"))
        } else {
            T::try_from(number).map_err(|_| "is too large".to_owned())
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
