//! The HTTP surface: the ingest API, health, metrics, the admin API and the dashboard.

pub mod browser;
pub mod dashboard;
pub mod error;
pub mod live;
pub mod openapi;
pub mod series;
pub mod server;
