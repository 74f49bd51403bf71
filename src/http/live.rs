//! The live debugger: every accepted message as it arrives, streamed to whoever is watching
//! (`GET /admin/v1/live`, server-sent events), like Segment's source debugger. Each message
//! comes with its routing (the destinations it was queued for, and those a rule filtered it
//! from, with the rule), and later attempts that did not deliver follow as `outcome` frames:
//! a transform's `null` or failure, a retry, a dead letter.
//!
//! Ingest must never wait for a viewer, so the feed is a bounded `broadcast` channel: publishing
//! is a non-blocking send that costs nothing when nobody watches, and a viewer that reads too
//! slowly loses the oldest messages (and is told how many) instead of holding anything back.
//! Each message is serialized once, when published, whatever the number of viewers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::http::header::{HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

/// Messages a viewer may fall behind by before it starts missing some. Messages are at most
/// 32 KB, so a full buffer stays within a few tens of megabytes; it is freed as viewers read.
pub const CAPACITY: usize = 1024;

/// Proxies and browsers drop connections that stay silent; a comment this often keeps them open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The query string of `GET /admin/v1/live`.
#[derive(Debug, Default, Deserialize)]
pub struct LiveQuery {
    /// Only messages of this source (by name); every source when absent.
    pub source: Option<String>,
}

/// One accepted message, ready to send: `data` is the JSON
/// `{"source", "received_at", "message", "routes"}`.
#[derive(Debug)]
struct Published {
    source: Box<str>,
    data: Arc<str>,
}

/// Messages rendered by [`LiveFeed::prepare`], waiting for their commit.
#[derive(Debug, Default)]
pub struct Prepared(Vec<Published>);

/// What a viewer sees: a message, an outcome, or word that it fell behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The JSON `{"source", "received_at", "message", "routes"}` of one accepted message.
    Message(Arc<str>),
    /// The JSON of an attempt that did not deliver (see [`OutcomeRenderer`]).
    Outcome(Arc<str>),
    /// This many messages were dropped because the viewer read too slowly.
    Lagged(u64),
}

/// Renders an attempt that did not deliver as `{"message_id", "destination", "state",
/// "reason"?, "status"?, "error"?}` with its source's name, resolving ids through the config
/// in force; `None` skips it.
pub type OutcomeRenderer =
    Arc<dyn Fn(&crate::trail::Outcome) -> Option<(Option<String>, String)> + Send + Sync>;

/// The feed ingest publishes to and viewers subscribe to.
pub struct LiveFeed {
    sender: broadcast::Sender<Arc<Published>>,
    /// Cancelled at shutdown: open streams end, so they do not hold the HTTP server open.
    closed: CancellationToken,
}

impl Default for LiveFeed {
    fn default() -> LiveFeed {
        LiveFeed::new(CAPACITY)
    }
}

impl LiveFeed {
    /// A feed that keeps at most `capacity` messages for a viewer that falls behind.
    pub fn new(capacity: usize) -> LiveFeed {
        let (sender, _) = broadcast::channel(capacity.max(1));
        LiveFeed {
            sender,
            closed: CancellationToken::new(),
        }
    }

    /// Whether anyone is watching; ingest may skip preparing messages when not.
    pub fn is_watched(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Offers one accepted message (its stored JSON) to the viewers, without routing. Never
    /// blocks and does nothing when nobody watches.
    pub fn publish(&self, source: &str, payload: &[u8]) {
        self.send(self.prepare(source, [(payload, serde_json::Value::Null)]));
    }

    /// Renders messages about to be committed, each with its routing, so they can be sent once
    /// they are (the payloads usually move into the commit). Callers skip it, and building the
    /// routing, when nobody watches ([`LiveFeed::is_watched`]).
    pub fn prepare<'a>(
        &self,
        source: &str,
        messages: impl IntoIterator<Item = (&'a [u8], serde_json::Value)>,
    ) -> Prepared {
        if !self.is_watched() {
            return Prepared(Vec::new());
        }
        let received_at = OffsetDateTime::now_utc();
        Prepared(
            messages
                .into_iter()
                .map(|(payload, routes)| Published {
                    source: source.into(),
                    data: render(source, received_at, payload, routes).into(),
                })
                .collect(),
        )
    }

    /// Offers prepared messages to the viewers. Never blocks.
    pub fn send(&self, prepared: Prepared) {
        for published in prepared.0 {
            // An error only means the last viewer left meanwhile.
            if self.sender.send(Arc::new(published)).is_err() {
                return;
            }
        }
    }

    /// The messages of `source` (every source when `None`) from now on, and with a renderer,
    /// the attempts that did not deliver (from this process's [`crate::trail::TRAIL`]).
    pub fn subscribe(
        &self,
        source: Option<String>,
        outcomes: Option<OutcomeRenderer>,
    ) -> impl Stream<Item = Frame> + Send + 'static {
        let state = Viewer {
            receiver: self.sender.subscribe(),
            outcomes: outcomes.map(|render| (crate::trail::TRAIL.watch(), render)),
            source,
            closed: self.closed.clone(),
        };
        futures::stream::unfold(state, |mut viewer| async move {
            let frame = viewer.next().await?;
            Some((frame, viewer))
        })
    }

    /// The `GET /admin/v1/live` answer: server-sent events, `event: message` with the message
    /// JSON as data, `event: outcome` for an attempt that did not deliver, `event: lagged` with
    /// `{"skipped": N}` when the viewer fell behind, and a keep-alive comment every 15 s.
    pub fn sse(&self, source: Option<String>, outcomes: OutcomeRenderer) -> Response {
        let greeting = format!(
            "watching {}",
            source
                .as_deref()
                .map_or("every source".to_owned(), |s| format!("source {s}"))
        );
        let greeting = futures::stream::once(async move { Event::default().comment(greeting) });
        let frames =
            futures::StreamExt::map(
                self.subscribe(source, Some(outcomes)),
                |frame| match frame {
                    Frame::Message(data) => Event::default().event("message").data(&*data),
                    Frame::Outcome(data) => Event::default().event("outcome").data(&*data),
                    Frame::Lagged(skipped) => Event::default()
                        .event("lagged")
                        .data(format!("{{\"skipped\":{skipped}}}")),
                },
            );
        let events = futures::StreamExt::map(
            futures::StreamExt::chain(greeting, frames),
            Ok::<_, Infallible>,
        );
        let mut response = Sse::new(events)
            .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
            .into_response();
        // Reverse proxies (nginx) would otherwise buffer the stream and show nothing live.
        response.headers_mut().insert(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        );
        response
    }

    /// Ends every open stream (at shutdown) and every later one at once.
    pub fn close(&self) {
        self.closed.cancel();
    }
}

/// One subscriber's position in the feed.
struct Viewer {
    receiver: broadcast::Receiver<Arc<Published>>,
    outcomes: Option<(
        broadcast::Receiver<Arc<crate::trail::Outcome>>,
        OutcomeRenderer,
    )>,
    source: Option<String>,
    closed: CancellationToken,
}

/// What a viewer's wait brought.
enum Arrived {
    Message(Result<Arc<Published>, RecvError>),
    Outcome(Result<Arc<crate::trail::Outcome>, RecvError>),
}

impl Viewer {
    async fn next(&mut self) -> Option<Frame> {
        loop {
            let arrived = {
                let Viewer {
                    receiver,
                    outcomes,
                    closed,
                    ..
                } = &mut *self;
                let outcome = async {
                    match outcomes {
                        Some((receiver, _)) => receiver.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = closed.cancelled() => return None,
                    received = receiver.recv() => Arrived::Message(received),
                    outcome = outcome => Arrived::Outcome(outcome),
                }
            };
            match arrived {
                Arrived::Message(Ok(published)) => {
                    if self
                        .source
                        .as_deref()
                        .is_none_or(|wanted| wanted == &*published.source)
                    {
                        return Some(Frame::Message(published.data.clone()));
                    }
                }
                Arrived::Outcome(Ok(outcome)) => {
                    if let Some(frame) = self.outcome_frame(&outcome) {
                        return Some(frame);
                    }
                }
                Arrived::Message(Err(RecvError::Lagged(skipped)))
                | Arrived::Outcome(Err(RecvError::Lagged(skipped))) => {
                    return Some(Frame::Lagged(skipped))
                }
                Arrived::Message(Err(RecvError::Closed)) => return None,
                Arrived::Outcome(Err(RecvError::Closed)) => self.outcomes = None,
            }
        }
    }
}

impl Viewer {
    /// An outcome as this viewer's frame, unless it is another source's.
    fn outcome_frame(&self, outcome: &crate::trail::Outcome) -> Option<Frame> {
        let (_, render) = self.outcomes.as_ref()?;
        let (source, data) = render(outcome)?;
        if let Some(wanted) = &self.source {
            if source.as_deref() != Some(wanted.as_str()) {
                return None;
            }
        }
        Some(Frame::Outcome(data.into()))
    }
}

/// `{"source": ..., "received_at": ..., "message": <payload>, "routes": [...]}`; a payload that
/// is not JSON (never the case for what ingest stores) is sent as a string rather than
/// breaking the stream.
fn render(
    source: &str,
    received_at: OffsetDateTime,
    payload: &[u8],
    routes: serde_json::Value,
) -> String {
    let message: Box<RawValue> = serde_json::from_slice::<&RawValue>(payload)
        .map(|raw| raw.to_owned())
        .or_else(|_| {
            serde_json::value::to_raw_value(&String::from_utf8_lossy(payload).into_owned())
        })
        .unwrap_or_else(|_| RawValue::NULL.to_owned());
    serde_json::json!({
        "source": source,
        "received_at": crate::ingest::format_time(received_at),
        "message": message,
        "routes": routes,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use serde_json::Value;

    fn message(frame: Option<Frame>) -> Value {
        match frame {
            Some(Frame::Message(data)) => serde_json::from_str(&data).expect("JSON"),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[test]
    fn publishing_without_viewers_costs_nothing_and_keeps_nothing() {
        let feed = LiveFeed::new(4);
        assert!(!feed.is_watched());
        feed.publish("web", br#"{"type":"track"}"#);
        assert_eq!(feed.sender.len(), 0, "nothing is buffered for nobody");
    }

    #[tokio::test]
    async fn viewers_get_messages_of_their_source() {
        let feed = LiveFeed::new(16);
        let mut all = Box::pin(feed.subscribe(None, None));
        let mut web = Box::pin(feed.subscribe(Some("web".into()), None));
        assert!(feed.is_watched());
        feed.publish("app", br#"{"type":"identify","userId":"u2"}"#);
        feed.publish("web", br#"{"type":"track","event":"Signed Up"}"#);

        let first = message(all.next().await);
        assert_eq!(first["source"], "app");
        assert_eq!(first["message"]["userId"], "u2");
        assert!(first["received_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
        assert_eq!(message(all.next().await)["source"], "web");

        let only = message(web.next().await);
        assert_eq!(only["source"], "web");
        assert_eq!(only["message"]["event"], "Signed Up");
    }

    #[tokio::test]
    async fn a_slow_viewer_misses_messages_and_is_told_how_many() {
        let feed = LiveFeed::new(4);
        let mut viewer = Box::pin(feed.subscribe(None, None));
        for i in 0..10 {
            // Never blocks, however far behind the viewer is.
            feed.publish("web", format!(r#"{{"n":{i}}}"#).as_bytes());
        }
        assert_eq!(viewer.next().await, Some(Frame::Lagged(6)));
        for i in 6..10 {
            assert_eq!(message(viewer.next().await)["message"]["n"], i);
        }
    }

    #[tokio::test]
    async fn closing_ends_open_streams() {
        let feed = LiveFeed::new(4);
        let mut viewer = Box::pin(feed.subscribe(None, None));
        feed.close();
        assert_eq!(viewer.next().await, None);
    }

    #[test]
    fn a_payload_that_is_not_json_is_sent_as_a_string() {
        let data = render(
            "web",
            OffsetDateTime::UNIX_EPOCH,
            b"not json",
            serde_json::Value::Null,
        );
        let value: Value = serde_json::from_str(&data).expect("JSON");
        assert_eq!(value["message"], "not json");
        assert_eq!(value["received_at"], "1970-01-01T00:00:00.000Z");
    }
}
