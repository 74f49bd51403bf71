//! Switchyard: a Segment-compatible event router in one process.
//!
//! Data flows one way through these stages:
//! - [`ingest`] parses, validates and enriches Segment calls (`/v1/*`);
//! - [`store`] commits them to Postgres in group commits and owns every SQL statement: events,
//!   the delivery queue (claimed with `FOR UPDATE SKIP LOCKED` under a lease), dead letters,
//!   and the time partitions that are dropped once their work is finished;
//! - [`delivery`] claims due deliveries fairly across destinations and hands them to the one
//!   shared worker pool, which runs the plugins in `destinations/` through the small trait in
//!   [`destination`] and records each outcome (delivered, retried, dead-lettered);
//! - [`http`] is the HTTP surface (ingest, health, metrics, admin, dashboard), and the only
//!   place where a stage's errors become HTTP answers;
//! - [`cli`] holds the commands; `serve` wires the stages together with graceful shutdown.
//!
//! [`config`] reads the TOML file every stage is driven by, and [`pipeline`] is the config in
//! force: the routes and lanes built from it, swapped whole on a reload.
//!
//! [`filter`] holds each destination's `where`, `consent`, `sample`, `transform` and property
//! drops: the first three run at ingest routing, the others at delivery.
//!
//! [`trail`] and [`rates`] watch the flow for the dashboard: the last events' paths and
//! per-second rates for the last hour, in bounded rings in this process's memory.

pub mod cli;
pub mod config;
pub mod delivery;
pub mod destination;
#[path = "../destinations/mod.rs"]
pub mod destinations;
pub mod filter;
pub mod http;
pub mod ingest;
pub mod pipeline;
pub mod rates;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod trail;
