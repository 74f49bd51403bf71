//! The running config: what a config file turns into (write keys, routes, one lane per
//! destination), and how a reload swaps it without a restart and without losing queued work.
//!
//! Ids of sources and destinations come from the database and never change for a name, so
//! jobs queued before a reload belong to the same destination after it. A destination that
//! disappears from the config has its queued jobs moved to the dead letters (never dropped); a
//! disabled one (`enabled = false`) keeps its queue, paused, until it is enabled again.
//!
//! The config is plain data; plugins are built here, and a destination's new plugin takes
//! over what its old one learned ([`Destination::take_over`]: a webhook balancer's view of
//! each endpoint).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{self, Config, DestinationConfig, LimitsConfig, Ordering};
use crate::delivery::lane::{self, Lane, LaneSet};
use crate::delivery::sender::HttpClient;
use crate::destination::{Destination, RetryAfterCap, Settings};
use crate::ingest::{Route, Routes, Source, SourceDirectory};
use crate::store::{NameTable, Store};

/// The config in force, as ingest and the admin API use it.
pub struct Pipeline {
    pub sources: SourceDirectory,
    pub routes: Routes,
    /// One lane per enabled destination.
    pub lanes: Vec<Arc<Lane>>,
    pub limits: LimitsConfig,
    /// `[server]`: the public address and the trusted proxies.
    pub server: crate::config::ServerConfig,
    /// Names and ids of every configured destination, enabled or not.
    pub destination_ids: HashMap<String, i32>,
}

impl Pipeline {
    /// Builds the pipeline for `config`. Lanes of `previous` keep their counters, and rate-limit
    /// keys whose limit did not change keep their bucket and lease.
    pub async fn build(
        store: &Store,
        config: &Config,
        client: &HttpClient,
        previous: Option<&Pipeline>,
    ) -> anyhow::Result<Pipeline> {
        let source_names: Vec<String> = config.sources.iter().map(|s| s.name.clone()).collect();
        let source_ids = store.name_ids(NameTable::Sources, &source_names).await?;
        let destination_names: Vec<String> =
            config.destinations.iter().map(|d| d.name.clone()).collect();
        let destination_ids = store
            .name_ids(NameTable::Destinations, &destination_names)
            .await?;

        let sources = SourceDirectory::new(config.sources.iter().map(|source| {
            let entry = Source {
                id: source_ids[&source.name],
                name: source.name.clone(),
                allowed_origins: source.allowed_origins.clone(),
            };
            (source.write_key.clone(), Arc::new(entry))
        }));
        let enabled: Vec<_> = config
            .destinations
            .iter()
            .filter(|d| d.enabled)
            .cloned()
            .collect();
        let routes = Routes::new(
            enabled
                .iter()
                .map(|d| Route {
                    destination_id: destination_ids[&d.name],
                    name: d.name.clone(),
                    kind: d.kind.clone(),
                    catalog_name: crate::destinations::kind(&d.kind)
                        .map(|kind| kind.catalog_name.to_owned())
                        .unwrap_or_default(),
                    sources: d.sources.as_ref().map(|names| {
                        names
                            .iter()
                            .filter_map(|n| source_ids.get(n).copied())
                            .collect()
                    }),
                    events: d.events.clone(),
                    ordered: d.ordering == Ordering::PerUser,
                    run_size: Lane::run_size(d),
                    gate: d.gate.clone(),
                    filtered: Default::default(),
                })
                .collect(),
            source_ids.values().copied(),
        );
        let routes = match previous {
            Some(previous) => routes.carry_counts(&previous.routes),
            None => routes,
        };
        let mut gates = lane::gates(&enabled);
        let old_lanes: HashMap<&str, &Arc<Lane>> = previous
            .map(|p| {
                p.lanes
                    .iter()
                    .map(|lane| (lane.config.name.as_str(), lane))
                    .collect()
            })
            .unwrap_or_default();
        for old in old_lanes.values() {
            let key = &old.config.rate_limit_key;
            let same_limit = gates
                .get(key)
                .is_some_and(|gate| gate.limit() == old.gate.limit());
            if same_limit {
                gates.insert(key.clone(), old.gate.clone());
            }
        }
        let mut lanes = Vec::with_capacity(enabled.len());
        for d in enabled {
            let old = old_lanes.get(d.name.as_str());
            let plugin = plugin(&d)?;
            if let Some(old) = old {
                plugin.take_over(&*old.plugin);
            }
            let gate = gates[&d.rate_limit_key].clone();
            let stats = old.map(|old| old.stats.clone());
            let id = destination_ids[&d.name];
            let lane = Lane::new(id, d, plugin, gate, client.clone()).with_stats(stats);
            lanes.push(Arc::new(lane));
        }
        let pipeline = Pipeline {
            sources,
            routes,
            lanes,
            limits: config.limits.clone(),
            server: config.server.clone(),
            destination_ids,
        };
        crate::http::series::register(&pipeline, &source_names);
        crate::trail::TRAIL.set_capacity(config.server.event_trail);
        Ok(pipeline)
    }
}

/// Builds a destination's plugin from its config: the kind's own plugin behind the engine's
/// wrappers (`Retry-After` capped at `retry.max_backoff`, then the delivery-time filters).
pub fn plugin(config: &DestinationConfig) -> anyhow::Result<Arc<dyn Destination>> {
    let kind = crate::destinations::kind(&config.kind)
        .ok_or_else(|| anyhow::anyhow!("unknown kind `{}`", config.kind))?;
    let settings = Settings {
        name: &config.name,
        table: &config.settings.0,
        endpoint: config.endpoint.as_ref(),
    };
    let built = (kind.build)(&settings).map_err(|errors| {
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("destination `{}`: {}", config.name, errors.join("; "))
    })?;
    let metadata = crate::filter::Metadata {
        destination_name: config.name.clone(),
        destination_kind: config.kind.clone(),
    };
    let capped = RetryAfterCap::wrap(built.plugin, config.retry.max_backoff);
    Ok(crate::filter::Shaped::wrap(
        capped,
        config.shaping.clone(),
        metadata,
        config.batch_size,
    ))
}

/// Reloads the config file into the running pipeline and pool.
pub struct Reloader {
    pub path: Option<PathBuf>,
    pub store: Store,
    /// The client of the config in force (a reload builds one for the new `[security]`).
    pub client: arc_swap::ArcSwap<HttpClient>,
    pub pipeline: Arc<ArcSwap<Pipeline>>,
    pub lanes: LaneSet,
    /// One reload at a time.
    pub lock: tokio::sync::Mutex<()>,
}

/// What a reload changed.
#[derive(Debug, Default, serde::Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// Sources in the new config.
    #[schema(value_type = u64)]
    pub sources: usize,
    /// Destinations in the new config.
    #[schema(value_type = u64)]
    pub destinations: usize,
    /// Destinations no longer in the config; their queued jobs became dead letters.
    pub removed: Vec<String>,
    /// How many jobs that was.
    pub dead_lettered: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("there is no config file to reload (start with --config or ./switchyard.toml)")]
    NoFile,
    #[error("the config has errors; the running config stays:\n{0}")]
    Invalid(config::ConfigErrors),
    #[error("the database is unavailable: {0}")]
    Database(#[from] anyhow::Error),
}

impl Reloader {
    /// Reads the file again; a bad file changes nothing.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.lock.lock().await;
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let config = config::load(path).map_err(ReloadError::Invalid)?;
        let previous = self.pipeline.load_full();
        let client = HttpClient::new(&config.security);
        let next = Pipeline::build(&self.store, &config, &client, Some(&previous)).await?;
        self.client.store(Arc::new(client));
        let removed: Vec<(String, i32)> = previous
            .destination_ids
            .iter()
            .filter(|(name, _)| !next.destination_ids.contains_key(*name))
            .map(|(name, id)| (name.clone(), *id))
            .collect();
        let report_counts = (config.sources.len(), config.destinations.len());
        let known: Vec<i32> = next.destination_ids.values().copied().collect();
        let retiring: Vec<Arc<Lane>> = previous
            .lanes
            .iter()
            .filter(|lane| removed.iter().any(|(_, id)| *id == lane.id))
            .cloned()
            .collect();
        self.lanes.store(Arc::new(next.lanes.clone()));
        self.pipeline.store(Arc::new(next));
        let mut dead_lettered = 0;
        if !removed.is_empty() {
            // Requests the removed destinations have in flight end first (within their
            // timeout), so their outcomes are written before what is left is retired: an event
            // never ends both delivered and dead-lettered.
            let patience = retiring
                .iter()
                .map(|lane| lane.config.timeout)
                .max()
                .unwrap_or_default()
                + Duration::from_secs(2);
            let started = tokio::time::Instant::now();
            while retiring.iter().any(|lane| lane.in_flight() > 0) && started.elapsed() < patience {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            dead_lettered = self
                .store
                .retire_removed(&known)
                .await
                .map_err(anyhow::Error::from)?;
            // A claim still open then (a request past its timeout) is retired once it ends.
            let store = self.store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(patience + Duration::from_secs(5)).await;
                if let Err(error) = store.retire_removed(&known).await {
                    tracing::warn!(%error, "retiring removed destinations failed; it runs again at the next start");
                }
            });
        }
        let report = ReloadReport {
            sources: report_counts.0,
            destinations: report_counts.1,
            removed: removed.into_iter().map(|(name, _)| name).collect(),
            dead_lettered,
        };
        tracing::info!(?report, "config reloaded");
        Ok(report)
    }
}
