//! The conformance test every HTTP destination kind runs (see `destinations/README.md`).
//!
//! Given a [`Kind`], its settings and fixtures (a Segment message and the vendor request it must
//! become, from the vendor's docs), [`Conformance::run`] builds the destination with `endpoint`
//! pointed at a [`MockServer`] and checks, through the engine's own HTTP sender:
//! - **mapping**: each fixture is delivered and the request matches (path, query, headers, and
//!   the body as a JSON subset), or no request is made where none is expected;
//! - **batching at the limit**: `max_batch_size` events of one user are delivered, every one
//!   carried (counted by the kind's idempotency keys, or by [`Conformance::events_in`] for a
//!   vendor without them), in the expected number of requests;
//! - **retry classification**: 200 delivered, 400 permanent, 429 with `Retry-After` retried
//!   (throttled, honoring the pause), 500 retried, a hung vendor retried after the timeout;
//! - **idempotency**: the vendor's idempotency field carries each messageId and is the same
//!   when an event is sent again.
//!
//! A failed check panics with what was expected and what was sent, like `assert!`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use url::Url;

use crate::delivery::sender::{self, Sender};
use crate::destination::{DeliveryContext, Destination, Event, Kind, Outcome, Settings, Verdict};
use crate::testkit::{MockServer, Received, Reply};

/// One Segment message and what the kind must send for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    pub name: String,
    /// Where the expectation comes from (the vendor doc's URL and section).
    #[serde(default)]
    pub source: Option<String>,
    /// The message as ingest stores it (enriched: `messageId`, `timestamp`, ...).
    pub event: Value,
    /// The request it becomes; `null`: the kind sends nothing for it and counts it delivered.
    pub request: Option<ExpectedRequest>,
}

/// What a request must hold. `body` is matched as a subset: every key given must be there with
/// an equal value (recursively; arrays element by element, same length); `"<any>"` matches any
/// value that is present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedRequest {
    pub path: String,
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Value,
}

/// Reads fixtures from a JSON file: `{"fixtures": [...]}`.
pub fn load_fixtures(path: impl AsRef<Path>) -> Vec<Fixture> {
    #[derive(Deserialize)]
    struct File {
        fixtures: Vec<Fixture>,
    }
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading fixtures {}: {e}", path.display()));
    let file: File = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("parsing fixtures {}: {e}", path.display()));
    file.fixtures
}

/// Pulls the idempotency keys (one per event, in order) out of a request the kind sent.
pub type IdempotencyKeys = fn(&Received) -> Vec<String>;

/// Counts the events one request the kind sent carries.
pub type EventsIn = fn(&Received) -> usize;

/// A kind's conformance test.
pub struct Conformance {
    pub kind: &'static Kind,
    /// The kind's own keys as TOML (without `endpoint`: the harness sets it).
    pub settings: String,
    pub fixtures: Vec<Fixture>,
    /// `None` for a vendor without an idempotency field (Slack).
    pub idempotency_keys: Option<IdempotencyKeys>,
    /// For a vendor without idempotency keys: how many events a request carries. One of the two
    /// is needed, so that the batching check sees every event carried.
    pub events_in: Option<EventsIn>,
    /// Requests expected for `max_batch_size` events of one user (1 for most vendors).
    pub requests_at_limit: usize,
}

impl Conformance {
    pub fn new(kind: &'static Kind, settings: &str, fixtures: Vec<Fixture>) -> Conformance {
        Conformance {
            kind,
            settings: settings.to_owned(),
            fixtures,
            idempotency_keys: None,
            events_in: None,
            requests_at_limit: 1,
        }
    }

    pub fn idempotency(mut self, keys: IdempotencyKeys) -> Conformance {
        self.idempotency_keys = Some(keys);
        self
    }

    pub fn events_in(mut self, count: EventsIn) -> Conformance {
        self.events_in = Some(count);
        self
    }

    /// Runs every check; returns their names. Panics on the first failure.
    pub async fn run(&self) -> Vec<String> {
        assert!(
            self.idempotency_keys.is_some() || self.events_in.is_some(),
            "{}: say how to count the events in a request (`idempotency` or `events_in`)",
            self.kind.name
        );
        let mut passed = Vec::new();
        let mock = MockServer::start().await;
        let plugin = build(self.kind, &self.settings, &mock);
        for fixture in &self.fixtures {
            self.check_mapping(&*plugin, &mock, fixture).await;
            passed.push(format!("mapping: {}", fixture.name));
        }
        let template = self
            .fixtures
            .iter()
            .find(|f| f.event["type"] == "track" && f.request.is_some())
            .unwrap_or_else(|| {
                panic!(
                    "{}: needs a track fixture that makes a request",
                    self.kind.name
                )
            });
        self.check_batching(&*plugin, &mock, template).await;
        passed.push(format!(
            "batching: {} events",
            self.kind.defaults.max_batch_size
        ));
        check_retries(&*plugin, &mock, template).await;
        passed.push("retry classification: 200, 400, 429 + Retry-After, 500, timeout".into());
        if let Some(keys) = self.idempotency_keys {
            check_idempotency(&*plugin, &mock, template, keys).await;
            passed.push("idempotency: stable across retries".into());
        }
        for check in &passed {
            println!("conformance {}: ok: {check}", self.kind.name);
        }
        passed
    }

    async fn check_mapping(&self, plugin: &dyn Destination, mock: &MockServer, fixture: &Fixture) {
        let what = format!("{} mapping `{}`", self.kind.name, fixture.name);
        let before = mock.received().len();
        mock.script(|_, _| Reply::ok());
        let verdict = deliver(plugin, &[event(&fixture.event)], Duration::from_secs(5)).await;
        assert_all(&what, &verdict, |o| *o == Outcome::Delivered);
        let sent: Vec<Received> = mock.received().split_off(before);
        let Some(expected) = &fixture.request else {
            assert!(
                sent.is_empty(),
                "{what}: expected no request, got {}",
                describe(&sent)
            );
            return;
        };
        let [request] = &sent[..] else {
            panic!("{what}: expected one request, got {}", describe(&sent));
        };
        assert_eq!(request.path, expected.path, "{what}: path");
        let query: BTreeMap<String, String> = request
            .query
            .as_deref()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        for (key, value) in &expected.query {
            assert_eq!(
                query.get(key),
                Some(value),
                "{what}: query `{key}` in {query:?}"
            );
        }
        for (name, value) in &expected.headers {
            assert_eq!(
                request.header(name),
                Some(value.as_str()),
                "{what}: header `{name}`"
            );
        }
        if let Err(problem) = contains(&request.json(), &expected.body, "body") {
            panic!("{what}: {problem}\nsent: {}", request.json());
        }
    }

    async fn check_batching(
        &self,
        plugin: &dyn Destination,
        mock: &MockServer,
        template: &Fixture,
    ) {
        let what = format!("{} batching", self.kind.name);
        let count = self.kind.defaults.max_batch_size;
        let ids: Vec<String> = (0..count)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        let events: Vec<Event> = ids
            .iter()
            .map(|id| {
                let mut message = template.event.clone();
                message["messageId"] = id.as_str().into();
                event(&message)
            })
            .collect();
        let before = mock.received().len();
        mock.script(|_, _| Reply::ok());
        let verdict = deliver(plugin, &events, Duration::from_secs(30)).await;
        assert_all(&what, &verdict, |o| *o == Outcome::Delivered);
        let sent = mock.received().split_off(before);
        assert_eq!(
            sent.len(),
            self.requests_at_limit,
            "{what}: requests for {count} events of one user"
        );
        if let Some(keys) = self.idempotency_keys {
            let mut carried: Vec<String> = sent.iter().flat_map(keys).collect();
            let mut expected = ids.clone();
            carried.sort();
            expected.sort();
            assert_eq!(
                carried.len(),
                count,
                "{what}: idempotency keys of {count} events"
            );
            assert!(
                carried == expected,
                "{what}: the idempotency keys are not the messageIds"
            );
        }
        if let Some(events_in) = self.events_in {
            let carried: usize = sent.iter().map(events_in).sum();
            assert_eq!(
                carried,
                count,
                "{what}: events carried in {}",
                describe(&sent)
            );
        }
    }
}

/// Builds `kind` from `settings` (TOML) with `endpoint` pointed at `mock`.
pub fn build(kind: &Kind, settings: &str, mock: &MockServer) -> std::sync::Arc<dyn Destination> {
    let table: toml::Table =
        toml::from_str(settings).unwrap_or_else(|e| panic!("{}: settings: {e}", kind.name));
    let endpoint = Url::parse(&mock.url("/")).expect("the mock's URL");
    let settings = Settings {
        name: "conformance",
        table: &table,
        endpoint: Some(&endpoint),
    };
    match (kind.build)(&settings) {
        Ok(built) => built.plugin,
        Err(errors) => panic!("{}: the settings are refused: {errors:?}", kind.name),
    }
}

/// A stored event as the engine hands it to a plugin.
pub fn event(message: &Value) -> Event {
    Event {
        message_id: message["messageId"].as_str().unwrap_or_default().to_owned(),
        payload: serde_json::value::RawValue::from_string(message.to_string())
            .expect("a JSON value serializes to JSON"),
        source: None,
    }
}

/// Delivers `events` through the engine's HTTP sender with `timeout`.
pub async fn deliver(plugin: &dyn Destination, events: &[Event], timeout: Duration) -> Verdict {
    let sender = Sender {
        http: sender::HttpClient::new(&crate::config::SecurityConfig::default()),
        timeout,
    };
    let ctx = DeliveryContext { http: &sender };
    plugin.deliver(&ctx, events).await
}

/// The outcome of every event of a verdict for `count` events.
pub fn outcomes(verdict: &Verdict, count: usize) -> Vec<Outcome> {
    match verdict {
        Verdict::All(outcome) => vec![outcome.clone(); count],
        Verdict::PerEvent(outcomes) => outcomes.clone(),
    }
}

fn assert_all(what: &str, verdict: &Verdict, ok: impl Fn(&Outcome) -> bool) {
    let all = match verdict {
        Verdict::All(outcome) => ok(outcome),
        Verdict::PerEvent(outcomes) => outcomes.iter().all(ok),
    };
    assert!(all, "{what}: unexpected outcome: {verdict:?}");
}

/// An answer the mock gives, and the outcome it must produce.
type RetryCase = (&'static str, Reply, fn(&Outcome) -> bool);

async fn check_retries(plugin: &dyn Destination, mock: &MockServer, template: &Fixture) {
    let events = [event(&template.event)];
    let cases: [RetryCase; 4] = [
        ("200", Reply::ok(), |o| *o == Outcome::Delivered),
        (
            "400",
            Reply::status(400).with_body(r#"{"error":"bad request"}"#),
            |o| {
                matches!(
                    o,
                    Outcome::Failed {
                        status: Some(400),
                        ..
                    }
                )
            },
        ),
        (
            "429 with Retry-After: 7",
            Reply::status(429).with_header("retry-after", "7"),
            |o| {
                matches!(o, Outcome::Retry { status: Some(429), throttled: true, retry_after: Some(after), .. }
                    if *after >= Duration::from_secs(7))
            },
        ),
        ("500", Reply::status(500), |o| {
            matches!(
                o,
                Outcome::Retry {
                    status: Some(500),
                    ..
                }
            )
        }),
    ];
    for (name, reply, expected) in cases {
        mock.script(move |_, _| reply.clone());
        let verdict = deliver(plugin, &events, Duration::from_secs(5)).await;
        assert_all(&format!("answer {name}"), &verdict, expected);
    }
    mock.script(|_, _| Reply::Hang);
    let verdict = deliver(plugin, &events, Duration::from_millis(300)).await;
    assert_all("a vendor that never answers", &verdict, |o| {
        matches!(o, Outcome::Retry { status: None, .. })
    });
    mock.script(|_, _| Reply::ok());
}

async fn check_idempotency(
    plugin: &dyn Destination,
    mock: &MockServer,
    template: &Fixture,
    keys: IdempotencyKeys,
) {
    let events = [event(&template.event)];
    let mut sent_keys = Vec::new();
    for _ in 0..2 {
        let before = mock.received().len();
        deliver(plugin, &events, Duration::from_secs(5)).await;
        let sent = mock.received().split_off(before);
        sent_keys.push(sent.iter().flat_map(keys).collect::<Vec<_>>());
    }
    assert_eq!(sent_keys[0].len(), 1, "idempotency: one key for one event");
    assert_eq!(
        sent_keys[0], sent_keys[1],
        "idempotency: a resent event keeps its key"
    );
}

fn describe(sent: &[Received]) -> String {
    if sent.is_empty() {
        return "none".into();
    }
    sent.iter()
        .map(|r| format!("{} {}", r.path, String::from_utf8_lossy(&r.body)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether `actual` holds `expected` as described on [`ExpectedRequest`]; the error says where
/// it does not.
pub fn contains(actual: &Value, expected: &Value, at: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::String(any), _) if any == "<any>" => Ok(()),
        (Value::Object(want), Value::Object(have)) => want.iter().try_for_each(|(key, value)| {
            let here = format!("{at}.{key}");
            match have.get(key) {
                Some(actual) => contains(actual, value, &here),
                None => Err(format!("{here} is missing (expected {value})")),
            }
        }),
        (Value::Array(want), Value::Array(have)) if want.len() == have.len() => want
            .iter()
            .zip(have)
            .enumerate()
            .try_for_each(|(i, (w, h))| contains(h, w, &format!("{at}[{i}]"))),
        (Value::Number(want), Value::Number(have)) if want.as_f64() == have.as_f64() => Ok(()),
        _ if expected == actual => Ok(()),
        _ => Err(format!("{at} is {actual}, expected {expected}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodies_match_as_subsets() {
        let actual = json!({"a": 1, "b": {"c": [1, {"d": "x", "e": 2}]}, "t": 5.0});
        assert!(contains(&actual, &json!({"b": {"c": [1, {"d": "x"}]}}), "body").is_ok());
        assert!(contains(&actual, &json!({"a": "<any>", "t": 5}), "body").is_ok());
        assert_eq!(
            contains(&actual, &json!({"b": {"c": [1, {"d": "y"}]}}), "body"),
            Err("body.b.c[1].d is \"x\", expected \"y\"".into())
        );
        assert!(contains(&actual, &json!({"z": 1}), "body").is_err());
        assert!(contains(&actual, &json!({"b": {"c": [1]}}), "body").is_err());
    }
}
