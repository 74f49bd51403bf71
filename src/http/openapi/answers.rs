//! The answers' schemas.

use serde::Serialize;
use utoipa::ToSchema;

pub use crate::destination::EndpointStats;
pub use crate::filter::Preview as DestinationTestResult;
pub use crate::http::server::ReplayRequest;
pub use crate::ingest::Rejection;
pub use crate::pipeline::ReloadReport;

/// What the SDKs report about themselves at `/v1/m`.
#[derive(ToSchema)]
pub struct Telemetry {
    /// Counters such as `analytics_js.invoke`.
    pub series: Option<Vec<serde_json::Value>>,
}

/// The analytics.js settings document.
#[derive(ToSchema)]
pub struct SdkSettings {
    /// `{"Segment.io": {"apiKey", "apiHost": "<host>/v1", "protocol": "http" | "https"}}`.
    pub integrations: serde_json::Value,
    /// Every call type enabled.
    pub plan: serde_json::Value,
    /// SDK telemetry settings (`sampleRate` 0: off).
    pub metrics: serde_json::Value,
}

/// The answer to an accepted ingest request.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// Always true.
    pub success: bool,
    /// Messages of a batch that were refused (absent when none was).
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Vec<Rejection>>,
}

impl Accepted {
    /// `{"success": true}`, with the messages of a batch that were refused, if any.
    pub fn new(rejected: Vec<Rejection>) -> Accepted {
        Accepted {
            success: true,
            rejected: (!rejected.is_empty()).then_some(rejected),
        }
    }
}

/// Every error: a stable `code` and a message for people.
#[derive(ToSchema)]
pub struct Failure {
    /// e.g. `invalid_json`, `unauthorized`, `too_large`, `overloaded`, `unavailable`.
    pub code: String,
    pub message: String,
    /// With `invalid_batch`: why each message was refused.
    #[schema(nullable = false)]
    pub rejected: Option<Vec<Rejection>>,
}

/// One destination, as `GET /admin/v1/destinations` shows it.
#[derive(Serialize, ToSchema)]
pub struct DestinationStatus {
    pub name: String,
    /// `webhook`, `amplitude`, ...
    pub kind: String,
    /// Paused by `POST /admin/v1/destinations/{name}/pause`: nothing is delivered.
    pub paused: bool,
    /// Jobs waiting, at the last count (counted every second or so).
    pub queued: i64,
    /// Requests under way now.
    pub in_flight: u64,
    /// Events delivered since this process started.
    pub delivered: u64,
    /// Jobs waiting for a retry, at the last count.
    pub retrying: i64,
    /// Dead letters kept.
    pub dead: i64,
    /// `N/s`, `N/m` or `N/h`; null when unlimited.
    pub rate_limit: Option<String>,
    /// The last failure, if any (secrets masked).
    pub last_error: Option<String>,
    /// The in-flight limit in force (adaptive, at most `max_in_flight`).
    pub concurrency_limit: u64,
    /// The share of the rate limit in force (below 1 after the vendor throttled).
    pub rate_factor: f64,
    /// Per endpoint of a webhook with several `urls` (empty otherwise).
    pub endpoints: Vec<EndpointStats>,
    /// Its filters and shaping in words, one a line (`where: ...`, `sample: 0.1`, ...).
    pub filters: Vec<String>,
}

/// A message that could not be delivered, with the last answer.
#[derive(Serialize, ToSchema)]
pub struct DeadLetter {
    pub id: i64,
    pub message_id: String,
    pub destination: String,
    pub attempts: i32,
    /// The vendor's last HTTP status; null when there was no answer (timeout, connection).
    pub last_status: Option<i32>,
    pub last_error: String,
    #[schema(format = DateTime)]
    pub failed_at: String,
    /// The event as it was stored.
    #[schema(value_type = Option<Object>, required = true)]
    pub event: Option<serde_json::Value>,
}

impl From<crate::store::DeadLetter> for DeadLetter {
    fn from(letter: crate::store::DeadLetter) -> DeadLetter {
        DeadLetter {
            id: letter.id,
            message_id: letter.message_id,
            destination: letter.destination,
            attempts: letter.attempts,
            last_status: letter.last_status,
            last_error: letter.last_error,
            failed_at: crate::ingest::format_time(letter.failed_at),
            event: Some(serde_json::from_slice(&letter.payload).unwrap_or(serde_json::Value::Null)),
        }
    }
}

/// `GET /admin/v1/dead-letters`.
#[derive(Serialize, ToSchema)]
pub struct DeadLetters {
    pub items: Vec<DeadLetter>,
}

/// The answer to a replay.
#[derive(Serialize, ToSchema)]
pub struct Replayed {
    /// Dead letters queued for delivery again.
    pub requeued: u64,
}

/// The answer to `POST /admin/v1/replays`.
#[derive(Serialize, ToSchema)]
pub struct ArchiveReplayStarted {
    pub id: i64,
    /// Archived events in range (the destination's filters may select fewer).
    pub events: i64,
}

/// A replay's progress.
#[derive(Serialize, ToSchema)]
pub struct ArchiveReplay {
    pub id: i64,
    pub destination: String,
    /// `queued`, `running`, `done` or `cancelled`.
    pub state: String,
    pub from: String,
    pub to: String,
    /// Archived events in range until selection is done, then the events selected.
    pub events: i64,
    /// Events selected so far.
    pub selected: i64,
    pub delivered: i64,
    pub failed: i64,
    pub created_at: String,
    pub finished_at: Option<String>,
}

impl From<&crate::store::Replay> for ArchiveReplay {
    fn from(replay: &crate::store::Replay) -> ArchiveReplay {
        ArchiveReplay {
            id: replay.id,
            destination: replay.destination.clone(),
            state: replay.state.clone(),
            from: crate::ingest::format_time(replay.from_at),
            to: crate::ingest::format_time(replay.to_at),
            events: replay.events,
            selected: replay.selected,
            delivered: replay.delivered,
            failed: replay.failed,
            created_at: crate::ingest::format_time(replay.created_at),
            finished_at: replay.finished_at.map(crate::ingest::format_time),
        }
    }
}

/// `GET /admin/v1/replays`.
#[derive(Serialize, ToSchema)]
pub struct ArchiveReplays {
    pub replays: Vec<ArchiveReplay>,
}

/// Per-second counts from this process's ring (`GET /admin/v1/stats/series`), oldest first.
#[derive(Serialize, ToSchema)]
pub struct StatsSeries {
    /// Always `process`: the answer is this process's memory only.
    pub scope: String,
    /// The newest second counted, in seconds since the Unix epoch.
    pub until: u32,
    /// Always 1.
    pub step_seconds: u32,
    pub sources: Vec<StatsSource>,
    pub destinations: Vec<StatsDestination>,
}

/// A source's counts per second.
#[derive(Serialize, ToSchema)]
pub struct StatsSource {
    pub name: String,
    pub accepted: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// A destination's counts per second; null in seconds with nothing to measure.
#[derive(Serialize, ToSchema)]
pub struct StatsDestination {
    pub name: String,
    pub delivered: Vec<u32>,
    pub retried: Vec<u32>,
    pub dead: Vec<u32>,
    /// Null in seconds the queue was not counted.
    pub queue_depth: Vec<Option<u32>>,
    /// Null in seconds with no delivery.
    pub p50_ms: Vec<Option<u32>>,
    pub p99_ms: Vec<Option<u32>>,
}

/// A destination's pause state.
#[derive(Serialize, ToSchema)]
pub struct PauseState {
    pub name: String,
    pub paused: bool,
}

/// One event's path (`GET /admin/v1/events/{messageId}`).
#[derive(Serialize, ToSchema)]
pub struct EventPath {
    pub message_id: String,
    /// Null when the source is no longer configured.
    #[schema(required = true)]
    pub source: Option<String>,
    pub received_at: String,
    /// Always `process`: the answer is this process's memory only.
    pub scope: String,
    pub routes: Vec<EventRoute>,
}

/// A user's recent events (`GET /admin/v1/events?userId=...`).
#[derive(Serialize, ToSchema)]
pub struct EventSearch {
    pub user_id: String,
    /// Always `process`: the answer is this process's memory only.
    pub scope: String,
    /// Newest first.
    pub items: Vec<EventPath>,
}

/// One destination in an event's path.
#[derive(Serialize, ToSchema)]
pub struct EventRoute {
    /// Null when the destination is no longer configured.
    #[schema(required = true)]
    pub destination: Option<String>,
    /// `queued`, `retrying`, `delivered`, `dead` or `filtered`.
    pub state: String,
    /// Why it was filtered: the first rule that stopped it, in the order they apply:
    /// `integrations`, `events`, `where`, `consent`, `sample` or `transform` (the script
    /// returned `null`).
    pub reason: Option<String>,
    pub attempts: Vec<EventAttempt>,
}

/// One delivery attempt.
#[derive(Serialize, ToSchema)]
pub struct EventAttempt {
    pub at: String,
    pub status: Option<u16>,
    pub error: Option<String>,
}

/// The answer to a reload.
#[derive(Serialize, ToSchema)]
pub struct Reloaded {
    /// Always true.
    pub reloaded: bool,
    pub report: ReloadReport,
}

/// `/healthz` and `/readyz`.
#[derive(Serialize, ToSchema)]
pub struct Status {
    /// `ok`, `ready`, `draining` or `database unavailable`.
    pub status: String,
}

impl Status {
    pub fn new(status: &str) -> Status {
        Status {
            status: status.to_owned(),
        }
    }
}
