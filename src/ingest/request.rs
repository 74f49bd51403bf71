//! The ingest algorithm for one request: authenticate, decode, parse and validate, route,
//! admit against the queue bounds, commit, count. The HTTP handler only extracts what it needs
//! from the request (body, `Content-Encoding`, the Basic write key, the client's address) and
//! turns the result into an answer.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use time::OffsetDateTime;

use crate::config::LimitsConfig;
use crate::ingest::backpressure::QueueDepth;
use crate::ingest::{decode_body, parse_authorized, Endpoint, IngestError, Rejection, Routes};
use crate::ingest::{Source, SourceDirectory};
use crate::rates::SourceRates;
use crate::store::commit::{CommitError, GroupCommit};
use crate::store::NewEvent;
use crate::trail::EventTrail;

/// What ingest works with: the config in force and the running process's shared parts.
pub struct Intake<'a> {
    pub sources: &'a SourceDirectory,
    pub routes: &'a Routes,
    pub limits: &'a LimitsConfig,
    pub depth: &'a QueueDepth,
    pub rates: &'a SourceRates,
    pub commit: &'a GroupCommit,
    /// How long a request waits for its commit before it is refused as unavailable.
    pub commit_timeout: Duration,
}

/// One request, as read by the front door.
pub struct Request<'a> {
    pub endpoint: Endpoint,
    /// The body as received (maybe gzip).
    pub body: Bytes,
    pub content_encoding: Option<&'a str>,
    /// The write key from HTTP Basic credentials, if the request had them.
    pub basic_key: Option<String>,
    pub client_ip: Option<IpAddr>,
    pub received_at: OffsetDateTime,
}

/// What the front door adds around the algorithm: its own check on the source (a browser's
/// origin), its memory accounting, and the live feed, which sees the events being committed.
pub trait Door {
    /// Shown the events about to be committed; given back by [`Door::committed`].
    type Watched;
    /// The body is decoded: `raw` bytes came in, `decoded` are held now.
    fn decoded(&mut self, raw: usize, decoded: usize);
    /// Whether the source's key may be used from where the request came.
    fn admits(&self, source: &Source) -> Result<(), IngestError>;
    fn committing(
        &self,
        source: &Source,
        events: &[NewEvent],
        trails: &[EventTrail],
    ) -> Self::Watched;
    fn committed(&self, watched: Self::Watched);
}

/// A request taken in: its messages are stored, except these.
#[derive(Debug)]
pub struct Accepted {
    pub rejected: Vec<Rejection>,
}

impl Intake<'_> {
    /// Refuses an unknown Basic write key before the body is read: it costs nothing more.
    pub fn check_basic_key(&self, basic_key: Option<&str>) -> Result<(), IngestError> {
        match basic_key {
            Some(key) if self.sources.find(key).is_none() => Err(reject_unknown_key()),
            _ => Ok(()),
        }
    }

    /// Takes one request in.
    pub async fn ingest<D: Door>(
        &self,
        request: Request<'_>,
        door: &mut D,
    ) -> Result<Accepted, IngestError> {
        let Request {
            endpoint,
            body: raw,
            content_encoding,
            basic_key,
            client_ip,
            received_at,
        } = request;
        let body = decode_body(content_encoding, &raw)?;
        door.decoded(raw.len(), body.len());
        let authorize = |body_key: Option<&str>| match (&basic_key, body_key) {
            (Some(_), _) => Ok(()),
            (None, Some(key)) if self.sources.find(key).is_some() => Ok(()),
            (None, Some(_)) => Err(reject_unknown_key()),
            (None, None) => Err(no_write_key()),
        };
        let parsed = parse_authorized(endpoint, &body, received_at, client_ip, &authorize)?;
        drop(body);
        drop(raw);
        let key = basic_key.or(parsed.write_key).ok_or_else(no_write_key)?;
        let source = self
            .sources
            .find(&key)
            .ok_or_else(reject_unknown_key)?
            .clone();
        if let Err(refused) = door.admits(&source) {
            metrics::counter!("switchyard_rejected_events_total", "source" => source.name.clone(), "code" => refused.code())
                .increment((parsed.messages.len() + parsed.rejected.len()) as u64);
            return Err(refused);
        }

        for rejection in &parsed.rejected {
            metrics::counter!("switchyard_rejected_events_total", "source" => source.name.clone(), "code" => rejection.code)
                .increment(1);
        }
        if !parsed.rejected.is_empty() {
            self.rates
                .ingested(source.id, 0, parsed.rejected.len() as u32);
        }
        if parsed.messages.is_empty() && !parsed.rejected.is_empty() {
            return Err(IngestError::Invalid {
                code: "invalid_batch",
                message: "no message in the batch was valid".into(),
                rejected: parsed.rejected,
            });
        }
        let accepted = parsed.messages.len();
        let mut trails = Vec::with_capacity(accepted);
        let events: Vec<NewEvent> = parsed
            .messages
            .into_iter()
            .map(|(_, message)| {
                let (targets, trail) = self.routes.targets(source.id, &message, received_at);
                trails.push(trail);
                NewEvent {
                    source_id: source.id,
                    targets,
                    message_id: message.message_id,
                    user_key: message.user_key,
                    received_at,
                    payload: message.payload,
                }
            })
            .collect();
        let jobs: usize = events.iter().map(|e| e.targets.len()).sum();
        self.depth.admit(self.limits, source.id, jobs)?;
        let watched = door.committing(&source, &events, &trails);
        if !events.is_empty() {
            match tokio::time::timeout(self.commit_timeout, self.commit.commit(events)).await {
                Ok(Ok(_)) => {
                    self.depth.queued(source.id, jobs as u64);
                    door.committed(watched);
                    crate::trail::TRAIL.accepted(trails);
                }
                Ok(Err(CommitError::Closed)) => {
                    return Err(IngestError::Unavailable(
                        "shutting down; retry shortly".into(),
                    ))
                }
                Ok(Err(CommitError::Store(_))) => {
                    return Err(IngestError::Unavailable(
                        "the database is unavailable; nothing was stored, retry shortly".into(),
                    ))
                }
                Err(_) => {
                    return Err(IngestError::Unavailable(
                        "the database did not answer in time; retry shortly".into(),
                    ))
                }
            }
        }
        metrics::counter!("switchyard_ingested_events_total", "source" => source.name.clone())
            .increment(accepted as u64);
        self.rates.ingested(source.id, accepted as u32, 0);
        Ok(Accepted {
            rejected: parsed.rejected,
        })
    }
}

fn no_write_key() -> IngestError {
    IngestError::Unauthorized(
        "no write key: send it as the HTTP Basic username or as `writeKey` in the body".into(),
    )
}

fn reject_unknown_key() -> IngestError {
    metrics::counter!("switchyard_rejected_events_total", "source" => "unknown", "code" => "unauthorized")
        .increment(1);
    IngestError::Unauthorized("unknown write key".into())
}
