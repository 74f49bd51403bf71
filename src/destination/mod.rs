//! The plugin interface: what a destination kind in `destinations/` implements.
//!
//! A plugin turns a batch of events into one vendor request and classifies the vendor's answer.
//! It never touches the database, the scheduler or the HTTP server: batching, rate limits,
//! retries, timeouts, leases and dead letters are the engine's. Most kinds only map events to
//! an [`HttpRequest`] ([`HttpDestination`]); a kind that is not HTTP (the `postgres` warehouse)
//! implements [`Destination::deliver`] itself.
//!
//! It owns the delivery vocabulary every kind shares: [`Outcome`] and [`Verdict`] (with
//! [`Verdict::per_event`], the one way a verdict becomes an outcome per event), [`Call`], the
//! HTTP types and [`SendError`] in [`http`], and [`Plan`] for a batch sent as several requests.

mod http;
mod plan;

pub use http::{
    classify_status, parse_retry_after, HttpRequest, HttpResponse, HttpSender, SendError,
    MAX_RETRY_AFTER,
};
pub use plan::{Part, Plan};

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use url::Url;

/// One stored event as a plugin sees it: the enriched Segment message, exactly as committed.
#[derive(Debug, Clone)]
pub struct Event {
    pub message_id: String,
    pub payload: Box<RawValue>,
    /// The name of the source it came from (a transform's `metadata(event).sourceName`), when
    /// known.
    pub source: Option<std::sync::Arc<str>>,
}

impl Event {
    /// The message parsed into a JSON value, for kinds that map fields.
    pub fn json(&self) -> serde_json::Value {
        // The payload was produced by the ingest serializer, so it always parses.
        serde_json::from_str(self.payload.get()).unwrap_or(serde_json::Value::Null)
    }
}

/// What became of one event of a delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The vendor accepted it.
    Delivered,
    /// Try again later: 408, 429, 5xx, timeouts and connection errors.
    Retry {
        status: Option<u16>,
        /// The vendor's `Retry-After`, when it gave one.
        retry_after: Option<Duration>,
        /// The vendor said "slow down" (429, or a 503 with `Retry-After`): counts for backoff.
        throttled: bool,
        message: String,
    },
    /// Never going to work: dead-letter it now, keeping what the vendor said.
    Failed {
        status: Option<u16>,
        message: String,
    },
    /// A filter applied at delivery dropped it (a transform returned `null`): done, not sent.
    Filtered { reason: crate::filter::Reason },
}

impl Outcome {
    pub fn retry(message: impl Into<String>) -> Outcome {
        Outcome::Retry {
            status: None,
            retry_after: None,
            throttled: false,
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Outcome {
        Outcome::Failed {
            status: None,
            message: message.into(),
        }
    }
}

/// The outcome of a whole request: one verdict for every event, or one per event (vendors such
/// as Amplitude reject single events of a batch and ingest the rest).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    All(Outcome),
    PerEvent(Vec<Outcome>),
}

impl Verdict {
    /// One outcome for each of the `count` events it judges. A `PerEvent` list of the wrong
    /// length is a plugin's bug: every event is retried, with `mismatch(length)` as the reason.
    pub fn per_event(self, count: usize, mismatch: impl FnOnce(usize) -> String) -> Vec<Outcome> {
        match self {
            Verdict::All(outcome) => vec![outcome; count],
            Verdict::PerEvent(outcomes) if outcomes.len() == count => outcomes,
            Verdict::PerEvent(outcomes) => vec![Outcome::retry(mismatch(outcomes.len())); count],
        }
    }
}

/// The Segment calls: what ingest accepts and what a kind maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl Call {
    pub const ALL: [Call; 6] = [
        Call::Track,
        Call::Identify,
        Call::Page,
        Call::Screen,
        Call::Group,
        Call::Alias,
    ];

    /// Its name in a message's `type` and in the API's paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Track => "track",
            Call::Identify => "identify",
            Call::Page => "page",
            Call::Screen => "screen",
            Call::Group => "group",
            Call::Alias => "alias",
        }
    }

    pub fn parse(name: &str) -> Option<Call> {
        Call::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The one-letter paths of the browser and mobile SDKs (`/v1/t`, `/v1/i`, ...).
    pub fn parse_short(letter: &str) -> Option<Call> {
        Call::ALL
            .into_iter()
            .find(|t| t.as_str().get(..1) == Some(letter))
    }
}

/// Caps every `Retry-After` a plugin reports at the destination's `retry.max_backoff`, so a
/// vendor asking for a pause of years pauses its key for at most that long.
pub struct RetryAfterCap {
    pub inner: Arc<dyn Destination>,
    pub max: Duration,
}

impl RetryAfterCap {
    pub fn wrap(inner: Arc<dyn Destination>, max: Duration) -> Arc<dyn Destination> {
        Arc::new(RetryAfterCap { inner, max })
    }

    fn cap(&self, outcome: Outcome) -> Outcome {
        match outcome {
            Outcome::Retry {
                status,
                retry_after,
                throttled,
                message,
            } => Outcome::Retry {
                status,
                retry_after: retry_after.map(|after| after.min(self.max)),
                throttled,
                message,
            },
            other => other,
        }
    }
}

impl Destination for RetryAfterCap {
    fn deliver<'a>(
        &'a self,
        ctx: &'a DeliveryContext<'a>,
        events: &'a [Event],
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            match self.inner.deliver(ctx, events).await {
                Verdict::All(outcome) => Verdict::All(self.cap(outcome)),
                Verdict::PerEvent(outcomes) => {
                    Verdict::PerEvent(outcomes.into_iter().map(|o| self.cap(o)).collect())
                }
            }
        })
    }

    fn endpoints(&self) -> Vec<EndpointStats> {
        self.inner.endpoints()
    }

    fn learned(&self) -> Option<&(dyn Any + Send + Sync)> {
        self.inner.learned()
    }

    fn take_over(&self, previous: &dyn Destination) {
        self.inner.take_over(previous)
    }
}

/// What a delivery attempt has at hand besides its events.
pub struct DeliveryContext<'a> {
    pub http: &'a dyn HttpSender,
}

/// A destination kind, configured. One instance serves every delivery of one destination and
/// may be called concurrently.
pub trait Destination: Send + Sync + 'static {
    /// Delivers one batch (at most the destination's batch size) and says how it went.
    fn deliver<'a>(
        &'a self,
        ctx: &'a DeliveryContext<'a>,
        events: &'a [Event],
    ) -> BoxFuture<'a, Verdict>;

    /// Per-endpoint state, for a destination that spreads its requests over several endpoints
    /// (a webhook's `urls`); the admin API and the metrics show it.
    fn endpoints(&self) -> Vec<EndpointStats> {
        Vec::new()
    }

    /// What this plugin has learned that the plugin replacing it at a reload may take over (a
    /// webhook's statistics per endpoint); `None` for most kinds.
    fn learned(&self) -> Option<&(dyn Any + Send + Sync)> {
        None
    }

    /// At a reload, takes over what `previous` (this destination's plugin until now) learned,
    /// where it still holds. The pipeline calls it once, before the first delivery.
    fn take_over(&self, _previous: &dyn Destination) {}
}

/// One endpoint of a destination with several, as this process sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[schema(as = EndpointStatus)]
pub struct EndpointStats {
    /// The URL with its credentials and query masked.
    pub url: String,
    /// This process's requests to it not answered yet.
    #[schema(value_type = u64)]
    pub in_flight: usize,
    /// Rolling share of failed requests (connection errors, timeouts, 5xx), fading with time.
    pub error_rate: f64,
    /// What it last reported in `X-Server-Utilization` (0.0 to 1.0), fading with time and
    /// adjusted for this process's requests sent since; null without a report or when
    /// `use_utilization` is off.
    pub utilization: Option<f64>,
    /// New or recovering: one request at a time until it answers with a 2xx.
    pub probation: bool,
    /// Its share of the draw while it ramps up: 0.1 growing to 1.
    pub weight: f64,
    /// Requests sent to it by this process since it started.
    pub requests: u64,
    /// Of those, the ones that failed (connection errors, timeouts, 5xx, 408).
    pub failures: u64,
}

/// The common shape of HTTP vendors: map a batch to one request, classify the answer.
pub trait HttpDestination: Send + Sync + 'static {
    /// Maps the batch to the vendor's request. An error fails the whole batch permanently
    /// (an event the vendor can never accept).
    fn request(&self, events: &[Event]) -> Result<HttpRequest, String>;

    /// Classifies the vendor's answer; the default is [`classify_status`] for every event.
    fn classify(&self, response: &HttpResponse, _events: &[Event]) -> Verdict {
        Verdict::All(classify_status(response))
    }
}

impl<T: HttpDestination> Destination for T {
    fn deliver<'a>(
        &'a self,
        ctx: &'a DeliveryContext<'a>,
        events: &'a [Event],
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            let request = match self.request(events) {
                Ok(request) => request,
                Err(message) => return Verdict::All(Outcome::failed(message)),
            };
            match ctx.http.send(request).await {
                Ok(response) => self.classify(&response, events),
                Err(error) => Verdict::All(error.outcome()),
            }
        })
    }
}

/// A problem with one of a kind's own keys (`key: None` is about the table as a whole).
#[derive(Debug, Clone, PartialEq)]
pub struct SettingError {
    pub key: Option<String>,
    pub message: String,
}

impl SettingError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> SettingError {
        SettingError {
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "`{key}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// What a kind is given to build a destination.
pub struct Settings<'a> {
    /// The destination's name (for messages).
    pub name: &'a str,
    /// The kind's own keys: the destination table minus the keys every destination takes.
    pub table: &'a toml::Table,
    /// `endpoint`: base URL override (tests point vendor kinds at a local mock).
    pub endpoint: Option<&'a Url>,
}

impl Settings<'_> {
    /// Deserializes the kind's own keys into its config struct, pushing every bad key onto
    /// `errors`: an unknown or ill-typed key is reported and left out, and the rest is tried
    /// again, so the kind can go on to check the values that did parse.
    pub fn parse<T: DeserializeOwned>(&self, errors: &mut Vec<SettingError>) -> Option<T> {
        let mut table = self.table.clone();
        loop {
            let value = toml::Value::Table(table.clone());
            match serde_path_to_error::deserialize::<_, T>(value) {
                Ok(parsed) => return Some(parsed),
                Err(error) => {
                    let message = error.inner().to_string();
                    let key = error_key(&error, &message).filter(|k| table.contains_key(k));
                    match key {
                        Some(key) => {
                            table.remove(&key);
                            errors.push(SettingError {
                                key: Some(key),
                                message: clean_serde_message(&message),
                            });
                        }
                        None => {
                            errors.push(SettingError {
                                key: None,
                                message: clean_serde_message(&message),
                            });
                            return None;
                        }
                    }
                }
            }
        }
    }
}

fn error_key(error: &serde_path_to_error::Error<toml::de::Error>, message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return rest.split('`').next().map(str::to_owned);
    }
    error
        .path()
        .iter()
        .next()
        .and_then(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            _ => None,
        })
}

fn clean_serde_message(message: &str) -> String {
    message.trim().replace('\n', " ")
}

/// A destination kind: its name in the config and how to build it from its own keys.
pub struct Kind {
    pub name: &'static str,
    /// The name Segment's catalog gives this integration (`"Amplitude"`, `"Google Analytics 4"`):
    /// a message's `integrations` object may name it.
    pub catalog_name: &'static str,
    /// The kind's defaults, which the config may lower but not raise (batch size) or override.
    pub defaults: KindDefaults,
    pub build: fn(&Settings) -> Result<Built, Vec<SettingError>>,
}

/// A built destination plus what the engine needs to know about it.
pub struct Built {
    pub plugin: Arc<dyn Destination>,
    /// The credential that identifies the vendor account, for the default `rate_limit_key`
    /// (two destinations with one API key share the vendor's per-key limit).
    pub credential: Option<String>,
}

/// Vendor limits a kind documents: they are its defaults.
#[derive(Debug, Clone, Copy)]
pub struct KindDefaults {
    pub batch_size: usize,
    /// The vendor's maximum events per request: `batch_size` is capped at it.
    pub max_batch_size: usize,
    /// The vendor's documented request rate per credential, as (requests, per).
    pub rate_limit: Option<(u32, Duration)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        url: String,
        count: Option<u32>,
    }

    fn settings(table: &toml::Table) -> Settings<'_> {
        Settings {
            name: "t",
            table,
            endpoint: None,
        }
    }

    #[test]
    fn parse_reports_every_bad_key() {
        let table: toml::Table = toml::from_str("url = 'x'\ncount = 'many'\nbogus = 1").unwrap();
        let mut errors = Vec::new();
        let parsed = settings(&table).parse::<Sample>(&mut errors);
        assert!(parsed.is_some(), "what is left parses");
        let keys: Vec<_> = errors.iter().map(|e| e.key.clone()).collect();
        assert_eq!(keys.len(), 2, "{errors:?}");
        assert!(keys.contains(&Some("count".into())), "{errors:?}");
        assert!(keys.contains(&Some("bogus".into())), "{errors:?}");
    }

    #[test]
    fn parse_reports_missing_key_on_the_table() {
        let table: toml::Table = toml::from_str("count = 3").unwrap();
        let mut errors = Vec::new();
        assert!(settings(&table).parse::<Sample>(&mut errors).is_none());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, None);
        assert!(errors[0].message.contains("url"), "{errors:?}");
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn retry_after_never_overflows_and_ignores_nonsense() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for huge in [
            "99999999999",
            "9300000000000000000",
            "18446744073709551616",
            "999999999999999999999999999999999999",
        ] {
            assert_eq!(
                parse_retry_after(huge, now),
                Some(MAX_RETRY_AFTER),
                "{huge}"
            );
        }
        let past = httpdate::fmt_http_date(now - Duration::from_secs(3600));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        let far = httpdate::fmt_http_date(now + Duration::from_secs(300 * 24 * 3600));
        assert_eq!(parse_retry_after(&far, now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        for garbage in [
            "-5",
            "+5",
            "1.5",
            "",
            "0x10",
            "7 s",
            "Tue, 99 Foo 2024",
            "\u{0}",
        ] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
    }

    #[test]
    fn retry_after_is_capped_at_the_destinations_max_backoff() {
        let cap = RetryAfterCap {
            inner: Arc::new(NeverCalled),
            max: Duration::from_secs(2),
        };
        let asked = |after| Outcome::Retry {
            status: Some(429),
            retry_after: Some(after),
            throttled: true,
            message: "HTTP 429".into(),
        };
        assert_eq!(
            cap.cap(asked(MAX_RETRY_AFTER)),
            asked(Duration::from_secs(2))
        );
        assert_eq!(
            cap.cap(asked(Duration::from_secs(1))),
            asked(Duration::from_secs(1))
        );
        assert_eq!(cap.cap(Outcome::Delivered), Outcome::Delivered);
    }

    struct NeverCalled;

    impl Destination for NeverCalled {
        fn deliver<'a>(
            &'a self,
            _: &'a DeliveryContext<'a>,
            _: &'a [Event],
        ) -> BoxFuture<'a, Verdict> {
            unreachable!("the cap is tested without delivering")
        }
    }
}
