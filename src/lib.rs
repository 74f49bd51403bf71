//! Switchyard: a Segment-compatible event router in one process.
//!
//! Data flows one way through these stages:
//! - [`ingest`] parses, validates and enriches Segment calls (`/v1/*`);
//! - [`store`] commits them to Postgres in group commits and owns every SQL statement: events,
//!   the delivery queue (claimed with `FOR UPDATE SKIP LOCKED` under a lease), dead letters,
//!   and the time partitions that are dropped once their work is finished;
//! - [`scheduler`] claims due deliveries fairly across destinations and hands them to the one
//!   shared worker pool, which runs the plugins in `destinations/` through the small trait in
//!   [`destination`] and records each outcome (delivered, retried, dead-lettered);
//! - [`server`] is the HTTP surface (ingest, health, metrics, admin) and [`serve`] wires the
//!   stages together with graceful shutdown.
//!
//! [`filter`] holds each destination's `where`, `consent`, `sample`, `transform` and property
//! drops: the first three run at ingest routing, the others at delivery.
//!
//! [`config`] reads the TOML file every stage is driven by ([`env_vars`] fills `${NAME}` in it),
//! and [`browser`] adds what websites and apps need: the analytics.js settings, CORS per source
//! and the client's address.

pub mod backpressure;
pub mod balance;
pub mod bootstrap;
pub mod browser;
pub mod commit;
pub mod config;
pub mod conformance;
pub mod dashboard;
pub mod demo;
pub mod destination;
#[path = "../destinations/mod.rs"]
pub mod destinations;
pub mod egress;
pub mod env_vars;
pub mod error;
pub mod filter;
pub mod ingest;
pub mod live;
pub mod openapi;
pub mod pipeline;
pub mod redact;
pub mod scheduler;
pub mod sender;
pub mod series;
pub mod serve;
pub mod server;
pub mod store;
pub mod testkit;
pub mod traffic;
