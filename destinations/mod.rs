//! Destination kinds: one file per kind, each listed once here.
//!
//! A kind maps events to its vendor's request and classifies the vendor's answers; everything
//! else (batching, rate limits, retries, dead letters) is the engine's. See `README.md` in this
//! folder for how to add one.

use crate::destination::Kind;

pub mod mapping;

/// Declares each kind's module and lists its `KIND` in [`KINDS`], from one name per kind.
macro_rules! kinds {
    ($($kind:ident,)*) => {
        $(pub mod $kind;)*

        /// Every kind the config may name.
        pub static KINDS: &[&Kind] = &[$(&$kind::KIND),*];
    };
}

// One line per kind: its file's name.
kinds! {
    webhook,
    amplitude,
    mixpanel,
    ga4,
    posthog,
    slack,
    segment,
    postgres,
}

/// Kinds added at run time (an embedding program's own, or a test's).
static REGISTERED: std::sync::RwLock<Vec<&'static Kind>> = std::sync::RwLock::new(Vec::new());

/// Adds a kind the config may name, beside the built-in ones.
pub fn register(kind: &'static Kind) {
    let mut registered = REGISTERED.write().unwrap_or_else(|e| e.into_inner());
    if !registered.iter().any(|known| known.name == kind.name) {
        registered.push(kind);
    }
}

/// The kind called `name`.
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .copied()
        .find(|kind| kind.name == name)
        .or_else(|| {
            let registered = REGISTERED.read().unwrap_or_else(|e| e.into_inner());
            registered.iter().copied().find(|kind| kind.name == name)
        })
}
