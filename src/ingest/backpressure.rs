//! Ingest backpressure: past the `[limits]` bounds on queued work, ingest answers 429 with
//! `Retry-After` instead of letting the queue grow without end.
//!
//! Queue depth comes from a periodic count (never one per request or per scrape), plus what
//! this process has accepted since that count, so a burst cannot run far past a bound between
//! two counts. The same figures feed `switchyard_queue_depth` and the admin API.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::IngestError;
use crate::config::LimitsConfig;
use crate::store::Store;

/// How long clients are asked to wait when the queue is full.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The last count of queued jobs.
#[derive(Default)]
pub struct QueueDepth {
    counts: RwLock<Counts>,
}

#[derive(Default)]
struct Counts {
    per_destination: HashMap<i32, i64>,
    retrying: HashMap<i32, i64>,
    per_source: HashMap<i32, i64>,
    total: i64,
    /// Jobs this process queued since the count, per source.
    since: HashMap<i32, i64>,
}

impl QueueDepth {
    /// Counts the queue again; returns how long the count took (callers space counts by it).
    pub async fn sample(&self, store: &Store) -> Result<Duration, crate::store::StoreError> {
        let started = Instant::now();
        let rows = store.queued().await?;
        let mut counts = Counts::default();
        for (destination, source, n, retrying) in rows {
            *counts.per_destination.entry(destination).or_default() += n;
            *counts.retrying.entry(destination).or_default() += retrying;
            *counts.per_source.entry(source).or_default() += n;
            counts.total += n;
        }
        *self.counts.write().expect("depth lock") = counts;
        Ok(started.elapsed())
    }

    /// Notes jobs this process just queued for `source`.
    pub fn queued(&self, source: i32, jobs: u64) {
        let mut counts = self.counts.write().expect("depth lock");
        *counts.since.entry(source).or_default() += jobs as i64;
    }

    /// Queued jobs of one destination at the last count, and how many wait for a retry.
    pub fn destination(&self, id: i32) -> (i64, i64) {
        let counts = self.counts.read().expect("depth lock");
        (
            counts.per_destination.get(&id).copied().unwrap_or(0),
            counts.retrying.get(&id).copied().unwrap_or(0),
        )
    }

    /// 429 when a bound is passed; `jobs` is what the request would add.
    pub fn admit(
        &self,
        limits: &LimitsConfig,
        source: i32,
        jobs: usize,
    ) -> Result<(), IngestError> {
        if limits.max_queued.is_none() && limits.max_queued_per_source.is_none() {
            return Ok(());
        }
        let counts = self.counts.read().expect("depth lock");
        let since_total: i64 = counts.since.values().sum();
        let total = counts.total + since_total + jobs as i64;
        if let Some(max) = limits.max_queued {
            if total > max as i64 {
                return Err(IngestError::Overloaded {
                    message: format!(
                        "{total} deliveries are queued, past the limit of {max}; retry later"
                    ),
                    retry_after: RETRY_AFTER,
                });
            }
        }
        if let Some(max) = limits.max_queued_per_source {
            let own = counts.per_source.get(&source).copied().unwrap_or(0)
                + counts.since.get(&source).copied().unwrap_or(0)
                + jobs as i64;
            if own > max as i64 {
                return Err(IngestError::Overloaded {
                    message: format!(
                        "{own} deliveries of this source are queued, past the limit of {max}; \
                         retry later"
                    ),
                    retry_after: RETRY_AFTER,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: Option<u64>, per_source: Option<u64>) -> LimitsConfig {
        LimitsConfig {
            max_queued: total,
            max_queued_per_source: per_source,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn bounds_count_what_was_queued_since_the_last_count() {
        let depth = QueueDepth::default();
        {
            let mut counts = depth.counts.write().unwrap();
            counts.total = 90;
            counts.per_source.insert(1, 90);
        }
        assert!(depth.admit(&limits(Some(100), None), 1, 10).is_ok());
        depth.queued(2, 10);
        let error = depth.admit(&limits(Some(100), None), 1, 1).unwrap_err();
        assert!(
            matches!(error, IngestError::Overloaded { retry_after, .. } if !retry_after.is_zero()),
            "{error:?}"
        );
        assert!(
            depth.admit(&limits(None, Some(95)), 2, 5).is_ok(),
            "per source"
        );
        assert!(depth.admit(&limits(None, Some(95)), 1, 6).is_err());
        assert!(depth.admit(&limits(None, None), 1, 1_000_000).is_ok());
    }
}
