//! Rates over time for the dashboard: per-second counts for the last [`SECONDS`], in rings in
//! this process's memory (every process serves its own; a restart starts them empty). A
//! destination's ring lives in its lane's counters (kept across reloads), the sources' in the
//! server's state.
//!
//! Per source: events accepted and rejected. Per destination: deliveries delivered, retried
//! and dead-lettered, the queue depth (sampled each second), and a small latency histogram
//! from which p50 and p99 are read. A slot is reused when its second comes round again, so
//! memory is fixed: about 116 bytes per destination-second (≈ 410 KiB per destination for
//! an hour) and 12 bytes per source-second (≈ 42 KiB per source). Recording is a short mutex
//! hold and a few additions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How many seconds are kept.
pub const SECONDS: usize = 3600;

/// Upper bounds of the latency buckets, in milliseconds (the last catches everything above).
const BOUNDS_MS: [u32; 20] = [
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    60_000,
    120_000,
    300_000,
    900_000,
    3_600_000,
    u32::MAX,
];

#[derive(Clone, Copy, Default)]
struct SourceSecond {
    at: u32,
    accepted: u32,
    rejected: u32,
}

#[derive(Clone, Copy, Default)]
struct DestinationSecond {
    at: u32,
    delivered: u32,
    retried: u32,
    dead: u32,
    /// `None` in seconds the queue was not counted (counting slows down with a deep queue).
    depth: Option<u32>,
    latency: [u32; BOUNDS_MS.len()],
}

/// What one destination did in one request's worth of outcomes.
#[derive(Default)]
pub struct Deliveries {
    pub delivered: u32,
    pub retried: u32,
    pub dead: u32,
    /// Ingest-to-delivered latencies of the delivered ones.
    pub latencies: Vec<Duration>,
}

/// Every source's ring, made at its first event.
#[derive(Default)]
pub struct SourceRates(Mutex<HashMap<i32, Box<[SourceSecond]>>>);

/// One destination's ring, made at its first outcome or queue count.
#[derive(Default)]
pub struct DestinationRates(Mutex<Option<Box<[DestinationSecond]>>>);

/// A series for one source, oldest second first.
pub struct SourceSeries {
    pub accepted: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// A series for one destination, oldest second first; latencies are `None` in seconds
/// with no delivery.
pub struct DestinationSeries {
    pub delivered: Vec<u32>,
    pub retried: Vec<u32>,
    pub dead: Vec<u32>,
    /// `None` in seconds the queue was not counted.
    pub queue_depth: Vec<Option<u32>>,
    pub p50_ms: Vec<Option<u32>>,
    pub p99_ms: Vec<Option<u32>>,
}

/// The current second since the Unix epoch.
pub fn now() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

fn slot<T: Default + Copy>(ring: &mut [T], second: u32, at: impl Fn(&T) -> u32) -> &mut T {
    let index = second as usize % ring.len();
    if at(&ring[index]) != second {
        ring[index] = T::default();
    }
    &mut ring[index]
}

impl SourceRates {
    fn rings(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Box<[SourceSecond]>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a source's accepted and rejected events.
    pub fn ingested(&self, source_id: i32, accepted: u32, rejected: u32) {
        let second = now();
        let mut rings = self.rings();
        let ring = rings
            .entry(source_id)
            .or_insert_with(|| vec![SourceSecond::default(); SECONDS].into());
        let slot = slot(ring, second, |s| s.at);
        slot.at = second;
        slot.accepted = slot.accepted.saturating_add(accepted);
        slot.rejected = slot.rejected.saturating_add(rejected);
    }

    /// The last `seconds` (at most [`SECONDS`]) ending with `until`, for one source.
    pub fn series(&self, source_id: i32, until: u32, seconds: usize) -> SourceSeries {
        let rings = self.rings();
        let ring = rings.get(&source_id);
        let mut series = SourceSeries {
            accepted: Vec::with_capacity(seconds),
            rejected: Vec::with_capacity(seconds),
        };
        for second in window(until, seconds) {
            let s = ring
                .map(|r| r[second as usize % SECONDS])
                .filter(|s| s.at == second)
                .unwrap_or_default();
            series.accepted.push(s.accepted);
            series.rejected.push(s.rejected);
        }
        series
    }
}

impl DestinationRates {
    /// This second's slot, the ring made if need be.
    fn record(&self, change: impl FnOnce(&mut DestinationSecond)) {
        let second = now();
        let mut ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let ring = ring.get_or_insert_with(|| vec![DestinationSecond::default(); SECONDS].into());
        let slot = slot(ring, second, |s| s.at);
        slot.at = second;
        change(slot);
    }

    /// Counts a request's outcomes.
    pub fn delivered(&self, deliveries: &Deliveries) {
        self.record(|slot| {
            slot.delivered = slot.delivered.saturating_add(deliveries.delivered);
            slot.retried = slot.retried.saturating_add(deliveries.retried);
            slot.dead = slot.dead.saturating_add(deliveries.dead);
            for latency in &deliveries.latencies {
                let ms = u32::try_from(latency.as_millis()).unwrap_or(u32::MAX);
                let bucket = BOUNDS_MS.iter().position(|&b| ms <= b).unwrap_or(0);
                slot.latency[bucket] += 1;
            }
        });
    }

    /// Sets the queue depth for this second.
    pub fn sample_depth(&self, depth: u32) {
        self.record(|slot| slot.depth = Some(depth));
    }

    /// The last `seconds` (at most [`SECONDS`]) ending with `until`.
    pub fn series(&self, until: u32, seconds: usize) -> DestinationSeries {
        let ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut series = DestinationSeries {
            delivered: Vec::with_capacity(seconds),
            retried: Vec::with_capacity(seconds),
            dead: Vec::with_capacity(seconds),
            queue_depth: Vec::with_capacity(seconds),
            p50_ms: Vec::with_capacity(seconds),
            p99_ms: Vec::with_capacity(seconds),
        };
        for second in window(until, seconds) {
            let s = ring
                .as_ref()
                .map(|r| r[second as usize % SECONDS])
                .filter(|s| s.at == second)
                .unwrap_or_default();
            series.delivered.push(s.delivered);
            series.retried.push(s.retried);
            series.dead.push(s.dead);
            series.queue_depth.push(s.depth);
            series.p50_ms.push(quantile(&s.latency, 0.50));
            series.p99_ms.push(quantile(&s.latency, 0.99));
        }
        series
    }
}

/// The seconds of a window, oldest first.
fn window(until: u32, seconds: usize) -> impl Iterator<Item = u32> {
    let seconds = seconds.clamp(1, SECONDS) as u32;
    (until.saturating_sub(seconds - 1)..=until).filter(|&s| s > 0)
}

/// The bucket bound at quantile `q`, `None` with no samples.
fn quantile(buckets: &[u32], q: f64) -> Option<u32> {
    let total: u64 = buckets.iter().map(|&n| u64::from(n)).sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (bucket, &n) in buckets.iter().enumerate() {
        seen += u64::from(n);
        if seen >= rank {
            return Some(BOUNDS_MS[bucket]);
        }
    }
    BOUNDS_MS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_second_and_age_out() {
        let sources = SourceRates::default();
        sources.ingested(1, 3, 1);
        let rates = DestinationRates::default();
        rates.delivered(&Deliveries {
            delivered: 2,
            retried: 1,
            dead: 0,
            latencies: vec![Duration::from_millis(3), Duration::from_millis(40)],
        });
        let until = now();
        let source = sources.series(1, until, 5);
        assert_eq!(source.accepted.len(), 5);
        assert_eq!(source.accepted.iter().sum::<u32>(), 3);
        assert_eq!(source.rejected.iter().sum::<u32>(), 1);
        let destination = rates.series(until, 5);
        assert_eq!(destination.delivered.iter().sum::<u32>(), 2);
        assert!(destination.p99_ms.contains(&Some(50)));
        // An hour later the slot is someone else's second.
        let later = rates.series(until + SECONDS as u32, 5);
        assert_eq!(later.delivered.iter().sum::<u32>(), 0);
    }

    #[test]
    fn quantiles_read_bucket_bounds() {
        let mut buckets = [0u32; BOUNDS_MS.len()];
        assert_eq!(quantile(&buckets, 0.5), None);
        buckets[2] = 99;
        buckets[10] = 1;
        assert_eq!(quantile(&buckets, 0.5), Some(5));
        assert_eq!(quantile(&buckets, 0.999), Some(2_000));
    }
}
