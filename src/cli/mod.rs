//! The commands behind `switchyard`: `serve` runs the service, `demo` tours it, and
//! `bootstrap` finds (or starts) the database they all need.

pub mod bootstrap;
pub mod demo;
pub mod serve;
pub mod shutdown;
