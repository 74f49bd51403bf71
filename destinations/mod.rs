//! Destination kinds: one file per kind, each listed once here.
//!
//! A kind maps events to its vendor's request and classifies the vendor's answers; everything
//! else (batching, rate limits, retries, dead letters) is the engine's. See `README.md` in this
//! folder for how to add one.

use crate::destination::Kind;

pub mod webhook;

/// Every kind the config may name.
pub static KINDS: &[&Kind] = &[&webhook::KIND];

/// The kind called `name`.
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().copied().find(|kind| kind.name == name)
}
