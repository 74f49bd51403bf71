//! The commands behind `switchyard`: `serve` runs the service, `demo` tours it, and
//! `bootstrap` finds (or starts) the database they all need; `archive` exports the event
//! archive.

pub mod archive;
pub mod bootstrap;
pub mod demo;
pub mod private_postgres;
pub mod serve;
pub mod shutdown;
