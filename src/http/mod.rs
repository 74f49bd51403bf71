//! The HTTP surface: the ingest API, health, metrics, the admin API and the dashboard.

mod admin;
pub mod browser;
pub mod dashboard;
pub mod error;
mod ingest;
pub mod live;
pub mod openapi;
pub mod series;
pub mod server;
