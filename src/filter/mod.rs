//! A destination's own filters and transformations, in the order they apply:
//! `integrations` → `events` → `where` → `consent` → `sample` → `transform` → property drops →
//! the vendor's mapping.
//!
//! The first five decide *whether* an event goes to a destination, from the event alone, so they
//! run once per event and destination at ingest routing ([`Gate`]): an event they drop gets no
//! job at all. `transform` and the property drops change *what* is sent, so they run at
//! delivery, in the destination's lane just before its plugin maps the events ([`Shaped`]):
//! the stored event stays as it came (replays, the live debugger and other destinations see the
//! original), a reload takes effect for every event not yet delivered, and a slow or failing
//! script costs only its own destination's lane.

pub mod consent;
pub mod fql;
pub mod transform;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::destination::{DeliveryContext, Destination, EndpointStats, Event, Outcome, Verdict};
use transform::{Input, Transform, Transformed};

/// Why an event of one of its sources did not reach a destination: the first rule that
/// stopped it, and the `reason` label of `switchyard_filtered_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The message's `integrations` object turned the destination off.
    Integrations,
    /// Not one of the destination's `events`.
    Events,
    Where,
    Consent,
    Sample,
    /// `transformEvent` returned `null` (or an empty array).
    Transform,
}

impl Reason {
    /// Every reason, in the order `as usize` numbers them.
    pub const ALL: [Reason; 6] = [
        Reason::Integrations,
        Reason::Events,
        Reason::Where,
        Reason::Consent,
        Reason::Sample,
        Reason::Transform,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Integrations => "integrations",
            Reason::Events => "events",
            Reason::Where => "where",
            Reason::Consent => "consent",
            Reason::Sample => "sample",
            Reason::Transform => "transform",
        }
    }
}

/// Counts one filtered event in `switchyard_filtered_events_total{destination,reason}`.
pub fn count(destination: &str, reason: Reason) {
    counter(destination, reason).increment(1);
}

/// The `switchyard_filtered_events_total` counter of one destination and reason.
pub fn counter(destination: &str, reason: Reason) -> metrics::Counter {
    metrics::counter!("switchyard_filtered_events_total", "destination" => destination.to_owned(), "reason" => reason.as_str())
}

/// `where`: the FQL condition as written, and parsed.
#[derive(Debug, Clone)]
pub struct Where {
    pub text: String,
    pub expr: fql::Expr,
}

/// The filters decided at ingest routing: `where`, `consent`, `sample`.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    pub condition: Option<Where>,
    /// Consent categories the destination needs.
    pub consent: Vec<String>,
    /// Fraction of events delivered (0 to 1); `None`: all.
    pub sample: Option<f64>,
}

impl Gate {
    /// Whether deciding needs the event's JSON (sampling needs only its messageId).
    pub fn reads_event(&self) -> bool {
        self.condition.is_some() || !self.consent.is_empty()
    }

    /// Passes the event, or says which filter stops it. `event` is the parsed message (`None`
    /// is read as `null`: only when [`Gate::reads_event`] is false does it not matter).
    pub fn check(&self, destination: &str, message_id: &str, event: &Value) -> Result<(), Reason> {
        if let Some(condition) = &self.condition {
            if !condition.expr.matches(event) {
                return Err(Reason::Where);
            }
        }
        if !consent::allows(&self.consent, event) {
            return Err(Reason::Consent);
        }
        if let Some(fraction) = self.sample {
            if !sampled(fraction, destination, message_id) {
                return Err(Reason::Sample);
            }
        }
        Ok(())
    }
}

/// Whether `message_id` falls in the `fraction` of events `destination` keeps. A hash, so every
/// instance, every retry of a request and every replay decides the same; the destination's name
/// is in it so that two destinations sampled at 10% do not keep the very same 10%.
pub fn sampled(fraction: f64, destination: &str, message_id: &str) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let mut hasher = Sha256::new();
    hasher.update(destination.as_bytes());
    hasher.update([0]);
    hasher.update(message_id.as_bytes());
    let digest = hasher.finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    // The top 53 bits as a fraction in [0, 1).
    let point = (u64::from_be_bytes(head) >> 11) as f64 / (1u64 << 53) as f64;
    point < fraction
}

/// What is done to an event at delivery: `transform`, then `drop_properties` and
/// `allow_properties`.
#[derive(Debug, Default)]
pub struct Shaping {
    pub transform: Option<Transform>,
    /// Paths removed (`properties.email`, `context.ip`).
    pub drop: Vec<Vec<String>>,
    /// The only `properties` and `traits` keys kept; `None`: all.
    pub allow: Option<Vec<String>>,
}

/// Who an event is for, as `metadata(event)` tells a script.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    pub destination_name: String,
    pub destination_kind: String,
}

impl Shaping {
    pub fn is_empty(&self) -> bool {
        self.transform.is_none() && self.drop.is_empty() && self.allow.is_none()
    }

    /// Runs the transform and the property drops on each event: the events to send for it
    /// (none: the transform dropped it), or the transform's error.
    pub async fn apply(&self, metadata: &Metadata, events: &[Event]) -> Vec<Transformed> {
        let mut results: Vec<Transformed> = match &self.transform {
            Some(transform) => {
                let inputs = events
                    .iter()
                    .map(|event| Input {
                        event: event.payload.get().to_owned(),
                        metadata: serde_json::json!({
                            "sourceName": event.source.as_deref(),
                            "destinationName": metadata.destination_name,
                            "destinationKind": metadata.destination_kind,
                            "messageId": event.message_id,
                        }),
                    })
                    .collect();
                transform.run(inputs).await
            }
            None => events.iter().map(|event| Ok(vec![event.json()])).collect(),
        };
        for shaped in results.iter_mut().flatten() {
            for event in shaped.iter_mut() {
                self.strip(event);
            }
        }
        results
    }

    /// Applies `drop_properties` and `allow_properties` to one event.
    pub fn strip(&self, event: &mut Value) {
        for path in &self.drop {
            remove_path(event, path);
        }
        if let Some(allowed) = &self.allow {
            for (object, prefix) in [("properties", "properties."), ("traits", "traits.")] {
                if let Some(Value::Object(map)) = event.get_mut(object) {
                    map.retain(|key, _| {
                        allowed
                            .iter()
                            .any(|a| a == key || a.strip_prefix(prefix) == Some(key))
                    });
                }
            }
        }
    }
}

fn remove_path(event: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let parent = parents
        .iter()
        .try_fold(event, |value, segment| value.get_mut(segment.as_str()));
    if let Some(Value::Object(map)) = parent {
        map.remove(last);
    }
}

/// A dotted path (`context.ip`) as its segments; `None` when a segment is empty.
pub fn parse_path(text: &str) -> Option<Vec<String>> {
    let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
    (!segments.iter().any(String::is_empty)).then_some(segments)
}

/// A destination's plugin behind its [`Shaping`]: the plugin gets the shaped events, and each
/// stored event's outcome is the worst of what became of the events made from it.
pub struct Shaped {
    pub inner: Arc<dyn Destination>,
    pub shaping: Arc<Shaping>,
    pub metadata: Metadata,
    /// Events per request to the plugin (an event a script split in several may need more).
    pub batch_size: usize,
}

impl Shaped {
    pub fn wrap(
        inner: Arc<dyn Destination>,
        shaping: Arc<Shaping>,
        metadata: Metadata,
        batch_size: usize,
    ) -> Arc<dyn Destination> {
        if shaping.is_empty() {
            return inner;
        }
        Arc::new(Shaped {
            inner,
            shaping,
            metadata,
            batch_size: batch_size.max(1),
        })
    }
}

impl Destination for Shaped {
    fn deliver<'a>(
        &'a self,
        ctx: &'a DeliveryContext<'a>,
        events: &'a [Event],
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            let results = self.shaping.apply(&self.metadata, events).await;
            let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
            let mut shaped = Vec::new();
            let mut owners = Vec::new();
            for (index, (event, result)) in events.iter().zip(results).enumerate() {
                match result {
                    Err(message) => {
                        outcomes[index] =
                            Some(Outcome::failed(format!("transform failed: {message}")));
                    }
                    Ok(made) if made.is_empty() => {
                        outcomes[index] = Some(Outcome::Filtered {
                            reason: Reason::Transform,
                        });
                    }
                    Ok(made) => {
                        for value in made {
                            shaped.push(Event {
                                message_id: value
                                    .get("messageId")
                                    .and_then(Value::as_str)
                                    .unwrap_or(&event.message_id)
                                    .to_owned(),
                                payload: to_raw(&value),
                                source: event.source.clone(),
                            });
                            owners.push(index);
                        }
                    }
                }
            }
            let chunks: Vec<&[Event]> = shaped.chunks(self.batch_size).collect();
            let verdicts =
                futures::future::join_all(chunks.iter().map(|c| self.inner.deliver(ctx, c))).await;
            let mut made_outcomes = Vec::with_capacity(shaped.len());
            for (chunk, verdict) in chunks.iter().zip(verdicts) {
                made_outcomes.extend(verdict.per_event(chunk.len(), |got| {
                    format!(
                        "the plugin returned {got} outcomes for {} events",
                        chunk.len()
                    )
                }));
            }
            for (owner, outcome) in owners.into_iter().zip(made_outcomes) {
                let slot = &mut outcomes[owner];
                if slot
                    .as_ref()
                    .is_none_or(|held| severity(&outcome) > severity(held))
                {
                    *slot = Some(outcome);
                }
            }
            Verdict::PerEvent(
                outcomes
                    .into_iter()
                    .map(|o| o.unwrap_or(Outcome::Delivered))
                    .collect(),
            )
        })
    }

    fn endpoints(&self) -> Vec<EndpointStats> {
        self.inner.endpoints()
    }

    fn learned(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        self.inner.learned()
    }

    fn take_over(&self, previous: &dyn Destination) {
        self.inner.take_over(previous)
    }
}

/// What a destination would make of a sample event.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(as = DestinationTestResult)]
pub struct Preview {
    pub destination: String,
    /// Whether anything would be sent.
    pub delivered: bool,
    /// What stopped it, the first rule in the order they apply: `integrations`, `events`,
    /// `where`, `consent`, `sample` or `transform` (the script returned `null`).
    pub filtered: Option<String>,
    /// The transform's error: the event would be dead-lettered with it.
    pub error: Option<String>,
    /// The events the vendor mapping would get.
    pub events: Vec<Value>,
}

/// What a destination would send for `event`, past the routing rules (`refused`: the one of
/// `integrations` and `events` that stopped it, if one did): the answer of
/// `POST /admin/v1/destinations/{name}/test`. Nothing is sent.
pub async fn preview(
    gate: &Gate,
    shaping: &Shaping,
    metadata: &Metadata,
    refused: Option<Reason>,
    message_id: &str,
    event: Value,
) -> Preview {
    let answer = |filtered: Option<&str>, error: Option<String>, events: Vec<Value>| Preview {
        destination: metadata.destination_name.clone(),
        delivered: !events.is_empty(),
        filtered: filtered.map(str::to_owned),
        error,
        events,
    };
    if let Some(reason) = refused {
        return answer(Some(reason.as_str()), None, Vec::new());
    }
    if let Err(reason) = gate.check(&metadata.destination_name, message_id, &event) {
        return answer(Some(reason.as_str()), None, Vec::new());
    }
    let stored = Event {
        message_id: message_id.to_owned(),
        payload: to_raw(&event),
        source: None,
    };
    match shaping.apply(metadata, &[stored]).await.remove(0) {
        Err(message) => answer(
            None,
            Some(format!("transform failed: {message}")),
            Vec::new(),
        ),
        Ok(events) if events.is_empty() => {
            answer(Some(Reason::Transform.as_str()), None, Vec::new())
        }
        Ok(events) => answer(None, None, events),
    }
}

/// A destination's filters in a line each (`where: type = 'track'`), for the dashboard.
pub fn describe(gate: &Gate, shaping: &Shaping) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(condition) = &gate.condition {
        lines.push(format!("where: {}", condition.text));
    }
    if !gate.consent.is_empty() {
        lines.push(format!("consent: {}", gate.consent.join(", ")));
    }
    if let Some(fraction) = gate.sample {
        lines.push(format!("sample: {fraction}"));
    }
    if let Some(transform) = &shaping.transform {
        lines.push(format!("transform: {}", transform.file));
    }
    let paths: Vec<String> = shaping.drop.iter().map(|p| p.join(".")).collect();
    if !paths.is_empty() {
        lines.push(format!("drop_properties: {}", paths.join(", ")));
    }
    if let Some(allowed) = &shaping.allow {
        lines.push(format!("allow_properties: {}", allowed.join(", ")));
    }
    lines
}

/// Which outcome of the events made from one stored event decides its fate.
fn severity(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::Filtered { .. } => 0,
        Outcome::Delivered => 1,
        Outcome::Retry { .. } => 2,
        Outcome::Failed { .. } => 3,
    }
}

fn to_raw(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value)
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_reason_is_listed_at_its_number() {
        for (number, reason) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, number, "{}", reason.as_str());
        }
    }

    #[test]
    fn sampling_is_stable_and_close_to_the_fraction() {
        let kept = (0..10_000)
            .filter(|i| sampled(0.25, "d", &format!("m{i}")))
            .count();
        assert!((2_200..2_800).contains(&kept), "{kept}");
        for i in 0..100 {
            let id = format!("m{i}");
            assert_eq!(sampled(0.5, "d", &id), sampled(0.5, "d", &id));
        }
        assert!((0..1000).all(|i| sampled(1.0, "d", &format!("m{i}"))));
        assert!(!(0..1000).any(|i| sampled(0.0, "d", &format!("m{i}"))));
        let same = (0..1000)
            .filter(|i| {
                let id = format!("m{i}");
                sampled(0.5, "a", &id) == sampled(0.5, "b", &id)
            })
            .count();
        assert!(same < 600, "destinations sample independently: {same}");
    }

    #[test]
    fn the_gate_checks_where_then_consent_then_sample() {
        let gate = Gate {
            condition: Some(Where {
                text: "type = 'track'".into(),
                expr: fql::Expr::parse("type = 'track'").unwrap(),
            }),
            consent: vec!["Ads".into()],
            sample: Some(0.0),
        };
        let denied = json!({"type": "track", "context": {"consent": {"categoryPreferences": {"Ads": false}}}});
        assert_eq!(
            gate.check("d", "m", &json!({"type": "identify"})),
            Err(Reason::Where)
        );
        assert_eq!(gate.check("d", "m", &denied), Err(Reason::Consent));
        assert_eq!(
            gate.check("d", "m", &json!({"type": "track"})),
            Err(Reason::Sample)
        );
        let open = Gate {
            sample: Some(1.0),
            ..gate
        };
        assert_eq!(open.check("d", "m", &json!({"type": "track"})), Ok(()));
    }

    #[test]
    fn property_drops_and_allows() {
        let shaping = Shaping {
            drop: vec![
                parse_path("properties.email").unwrap(),
                parse_path("context.ip").unwrap(),
                parse_path("context.device.id").unwrap(),
                parse_path("no.such.path").unwrap(),
            ],
            allow: Some(vec!["price".into(), "traits.plan".into()]),
            ..Shaping::default()
        };
        let mut event = json!({
            "properties": {"email": "a@b", "price": 3, "sku": "x"},
            "traits": {"plan": "pro", "email": "a@b", "price": 1},
            "context": {"ip": "1.2.3.4", "device": {"id": "d", "model": "m"}},
            "userId": "u"
        });
        shaping.strip(&mut event);
        assert_eq!(
            event,
            json!({
                "properties": {"price": 3},
                "traits": {"plan": "pro", "price": 1},
                "context": {"device": {"model": "m"}},
                "userId": "u"
            })
        );
        assert_eq!(parse_path("a..b"), None);
    }
}

#[cfg(test)]
mod throughput {
    use super::*;
    use std::time::{Duration, Instant};

    /// Events per second through [`Shaping::apply`] with and without a small transform, in
    /// batches of 100: `cargo test --release --lib filter::throughput -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn events_per_second_with_and_without_a_transform() {
        let payload = serde_json::json!({
            "type": "track", "event": "Order Completed", "userId": "u-1", "messageId": "m",
            "properties": {"revenue": 42.5, "currency": "EUR", "email": "a@example.com"},
            "context": {"ip": "203.0.113.9", "library": {"name": "analytics.js", "version": "2.1"}}
        });
        let events: Vec<Event> = (0..100)
            .map(|i| Event {
                message_id: format!("m-{i}"),
                payload: to_raw(&payload),
                source: Some("web".into()),
            })
            .collect();
        let script = "export function transformEvent(event, metadata) {\n\
            event.properties.total = event.properties.revenue * 1.2;\n\
            event.properties.destination = metadata(event).destinationName;\n\
            return event;\n}";
        let transform = Transform::compile(
            std::path::Path::new("bench.js"),
            script.into(),
            Duration::from_millis(50),
        )
        .unwrap();
        let drops = || vec![parse_path("context.ip").unwrap()];
        let plain = Shaping {
            drop: drops(),
            ..Shaping::default()
        };
        let scripted = Shaping {
            transform: Some(transform),
            drop: drops(),
            ..Shaping::default()
        };
        let metadata = Metadata::default();
        for (name, shaping) in [("drops only", &plain), ("transform + drops", &scripted)] {
            let started = Instant::now();
            let mut done = 0;
            while started.elapsed() < Duration::from_secs(3) {
                done += shaping.apply(&metadata, &events).await.len();
            }
            let rate = done as f64 / started.elapsed().as_secs_f64();
            println!("{name}: {rate:.0} events/s");
        }
    }
}
