//! Ingest: turns a Segment HTTP Tracking API request into messages ready to commit.
//!
//! It authenticates the write key, decodes gzip within Segment's size limits, validates each
//! call type's required fields, enriches messages the way Segment does (`messageId`,
//! `receivedAt`, `sentAt`, skew-corrected `timestamp`, batch-level `context` and
//! `integrations`), and routes each message to the destinations whose filters match; all of that
//! is pure and tested directly. `request.rs` runs it for one request and hands the events to the
//! group commit; HTTP only extracts the request's parts and turns the result into an answer.

pub mod backpressure;
mod enrich;
mod error;
mod parse;
mod request;
mod route;

pub use crate::destination::Call;
pub use enrich::{format_time, parse_time};
pub use error::{IngestError, Rejection};
pub use parse::{decode_body, parse, parse_authorized, request_too_large};
pub use request::{Accepted, Door, Intake, Request};
pub use route::{Route, Routes};

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Segment's limits: 32 KB a message, 500 KB a request, 2,500 messages a batch.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
pub const MAX_REQUEST_BYTES: usize = 500 * 1024;
pub const MAX_BATCH_MESSAGES: usize = 2500;
/// What enrichment may add to a message (`messageId`, `receivedAt`, `sentAt`, `timestamp`,
/// `originalTimestamp`, `type`) before the rest counts against the limits: a batch-level
/// `context` copied into every message counts, so a small body cannot grow into a large one.
const ENRICHMENT_BYTES: usize = 512;

/// Says whether the request may go on once its body's `writeKey` (if any) is known, before
/// any message is expanded: an unknown key costs no more than reading the body.
pub type Authorize<'a> = &'a dyn Fn(Option<&str>) -> Result<(), IngestError>;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Single(Call),
    /// `/v1/batch` and `/v1/import`.
    Batch,
}

/// A configured source, as ingest knows it.
#[derive(Debug)]
pub struct Source {
    pub id: i32,
    pub name: String,
    pub allowed_origins: crate::http::browser::AllowedOrigins,
}

/// Write keys to sources. Keys are held only as SHA-256 digests, so a lookup compares digests
/// (no timing signal about the key itself) and a memory dump shows no key.
#[derive(Debug, Default)]
pub struct SourceDirectory {
    by_key: HashMap<[u8; 32], Arc<Source>>,
}

impl SourceDirectory {
    pub fn new(sources: impl IntoIterator<Item = (String, Arc<Source>)>) -> SourceDirectory {
        SourceDirectory {
            by_key: sources
                .into_iter()
                .map(|(key, source)| (digest(&key), source))
                .collect(),
        }
    }

    pub fn find(&self, write_key: &str) -> Option<&Arc<Source>> {
        self.by_key.get(&digest(write_key))
    }

    /// A source's id by its name.
    pub fn id_of(&self, name: &str) -> Option<i32> {
        self.by_key
            .values()
            .find(|source| source.name == name)
            .map(|source| source.id)
    }

    /// Each configured source once (several write keys may name one source).
    pub fn sources(&self) -> Vec<&Arc<Source>> {
        let mut sources: Vec<&Arc<Source>> = self.by_key.values().collect();
        sources.sort_by_key(|source| source.id);
        sources.dedup_by_key(|source| source.id);
        sources
    }

    /// Whether some source allows this browser origin (a preflight names no source).
    pub fn any_allows(&self, origin: &str) -> bool {
        self.by_key
            .values()
            .any(|source| source.allowed_origins.allows(origin))
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A message that passed validation, enriched and serialized.
#[derive(Debug, Clone)]
pub struct Message {
    pub call: Call,
    pub message_id: String,
    /// userId, else anonymousId: whose event this is (per-user ordering).
    pub user_key: String,
    /// `event` of a track call.
    pub event: Option<String>,
    pub integrations: Option<Map<String, Value>>,
    pub payload: Vec<u8>,
}

impl Message {
    /// A message as stored (enriched JSON), read back for a replay's routing. Only the fields
    /// routing reads are decoded and the rest is skipped over, so a replay does not build each
    /// archived event's whole JSON tree (that took two fifths of the process's CPU). A field
    /// of an unexpected type reads as absent. `None` when it is not a message (it never is:
    /// ingest wrote it).
    pub fn from_stored(payload: &[u8]) -> Option<Message> {
        let head: StoredHead = serde_json::from_slice(payload).ok()?;
        let text = |raw: Option<&RawValue>| {
            raw.and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        };
        Some(Message {
            call: Call::parse(&text(head.call)?)?,
            message_id: text(head.message_id).unwrap_or_default(),
            user_key: text(head.user_id)
                .or_else(|| text(head.anonymous_id))
                .unwrap_or_default(),
            event: text(head.event),
            integrations: head
                .integrations
                .and_then(|raw| serde_json::from_str(raw.get()).ok()),
            payload: Vec::new(),
        })
    }
}

/// The fields of a stored message that routing reads, undecoded.
#[derive(Deserialize)]
struct StoredHead<'a> {
    #[serde(rename = "type", borrow, default)]
    call: Option<&'a RawValue>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<&'a RawValue>,
    #[serde(rename = "userId", borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(rename = "anonymousId", borrow, default)]
    anonymous_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(borrow, default)]
    integrations: Option<&'a RawValue>,
}

/// The result of parsing a request body.
#[derive(Debug)]
pub struct Parsed {
    /// `writeKey` from the body, if it had one.
    pub write_key: Option<String>,
    /// Accepted messages with their index in the request.
    pub messages: Vec<(usize, Message)>,
    pub rejected: Vec<Rejection>,
}

#[cfg(test)]
mod tests;
