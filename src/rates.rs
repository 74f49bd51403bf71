//! Rates over time for the dashboard: per-second counts for the last [`SECONDS`], in this
//! process's memory (every process serves its own; a restart starts them empty). A
//! destination's rates live in its lane's counters (kept across reloads), the sources' in the
//! server's state.
//!
//! Per source: events accepted and rejected, in a ring whose slot is reused when its second
//! comes round again (12 bytes per source-second, ≈ 42 KiB per source for an hour).
//!
//! Per destination: deliveries delivered, retried and dead-lettered, the queue depth, and
//! p50 and p99 of the delivery latency. Destinations are many (thousands of webhooks), and
//! most are quiet most seconds, so a destination keeps only the seconds in which something
//! happened, 28 bytes each once the second is over: the latency histogram is kept for the
//! current second only and reduced to its p50 and p99 buckets when the second ends. The queue
//! depth is recorded when it changes and held until the next change. A quiet destination
//! costs a few bytes; one busy every second of the hour about 100 KiB. (A ring of full
//! seconds per destination took 410 KiB each from the first queue count on: 1,000 webhooks
//! held 390 MB idle.) Recording is a short mutex hold and a few additions.

use std::collections::{HashMap, VecDeque};
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

/// A second in which a destination did something, once it is over.
#[derive(Clone, Copy)]
struct DestinationSecond {
    at: u32,
    delivered: u32,
    retried: u32,
    dead: u32,
    /// The queue depth last counted at or before this second, if any count was.
    depth: Option<u32>,
    /// Latency bucket indexes of p50 and p99 ([`NO_BUCKET`] with no delivery).
    p50: u8,
    p99: u8,
}

const NO_BUCKET: u8 = u8::MAX;

impl DestinationSecond {
    fn new(at: u32, depth: Option<u32>) -> DestinationSecond {
        DestinationSecond {
            at,
            delivered: 0,
            retried: 0,
            dead: 0,
            depth,
            p50: NO_BUCKET,
            p99: NO_BUCKET,
        }
    }
}

/// One destination's active seconds, oldest first, and the latency histogram of the newest.
#[derive(Default)]
struct DestinationSeconds {
    seconds: VecDeque<DestinationSecond>,
    latency: [u32; BOUNDS_MS.len()],
}

impl DestinationSeconds {
    /// The entry of `second`, made (and the hour before it trimmed) if need be.
    fn at(&mut self, second: u32) -> &mut DestinationSecond {
        let newest = self.seconds.back().map(|s| s.at);
        // A clock that steps back counts into the newest second.
        if newest.is_none_or(|at| at < second) {
            self.close_newest();
            let depth = self.seconds.back().and_then(|s| s.depth);
            self.seconds
                .push_back(DestinationSecond::new(second, depth));
            let oldest_kept = second.saturating_sub(SECONDS as u32 - 1);
            while self.seconds.front().is_some_and(|s| s.at < oldest_kept) {
                self.seconds.pop_front();
            }
        }
        self.seconds.back_mut().expect("an entry was just made")
    }

    /// Reduces the newest second's histogram to its quantiles.
    fn close_newest(&mut self) {
        let (p50, p99) = (bucket(&self.latency, 0.50), bucket(&self.latency, 0.99));
        if let Some(newest) = self.seconds.back_mut() {
            newest.p50 = p50.map_or(NO_BUCKET, |b| b as u8);
            newest.p99 = p99.map_or(NO_BUCKET, |b| b as u8);
        }
        self.latency = [0; BOUNDS_MS.len()];
    }

    /// p50 and p99 of an entry, in milliseconds (the newest is still open).
    fn quantiles(&self, index: usize) -> (Option<u32>, Option<u32>) {
        if index + 1 == self.seconds.len() {
            let bound = |b: Option<usize>| b.map(|b| BOUNDS_MS[b]);
            return (
                bound(bucket(&self.latency, 0.50)),
                bound(bucket(&self.latency, 0.99)),
            );
        }
        let entry = &self.seconds[index];
        let bound = |b: u8| (b != NO_BUCKET).then(|| BOUNDS_MS[b as usize]);
        (bound(entry.p50), bound(entry.p99))
    }
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

/// One destination's rates: only the seconds in which something happened.
#[derive(Default)]
pub struct DestinationRates(Mutex<DestinationSeconds>);

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
    fn seconds(&self) -> std::sync::MutexGuard<'_, DestinationSeconds> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request's outcomes.
    pub fn delivered(&self, deliveries: &Deliveries) {
        let mut seconds = self.seconds();
        let slot = seconds.at(now());
        slot.delivered = slot.delivered.saturating_add(deliveries.delivered);
        slot.retried = slot.retried.saturating_add(deliveries.retried);
        slot.dead = slot.dead.saturating_add(deliveries.dead);
        for latency in &deliveries.latencies {
            let ms = u32::try_from(latency.as_millis()).unwrap_or(u32::MAX);
            let bucket = BOUNDS_MS.iter().position(|&b| ms <= b).unwrap_or(0);
            seconds.latency[bucket] += 1;
        }
    }

    /// Records the queue depth counted now; held until it changes.
    pub fn sample_depth(&self, depth: u32) {
        let mut seconds = self.seconds();
        if seconds.seconds.back().and_then(|s| s.depth) != Some(depth) {
            seconds.at(now()).depth = Some(depth);
        }
    }

    /// The last `seconds` (at most [`SECONDS`]) ending with `until`.
    pub fn series(&self, until: u32, seconds: usize) -> DestinationSeries {
        let kept = self.seconds();
        let mut series = DestinationSeries {
            delivered: Vec::with_capacity(seconds),
            retried: Vec::with_capacity(seconds),
            dead: Vec::with_capacity(seconds),
            queue_depth: Vec::with_capacity(seconds),
            p50_ms: Vec::with_capacity(seconds),
            p99_ms: Vec::with_capacity(seconds),
        };
        for second in window(until, seconds) {
            match kept.seconds.binary_search_by_key(&second, |s| s.at) {
                Ok(index) => {
                    let s = &kept.seconds[index];
                    let (p50, p99) = kept.quantiles(index);
                    series.delivered.push(s.delivered);
                    series.retried.push(s.retried);
                    series.dead.push(s.dead);
                    series.queue_depth.push(s.depth);
                    series.p50_ms.push(p50);
                    series.p99_ms.push(p99);
                }
                // A quiet second: nothing happened, and the depth held.
                Err(after) => {
                    let held = after
                        .checked_sub(1)
                        .and_then(|before| kept.seconds[before].depth);
                    series.delivered.push(0);
                    series.retried.push(0);
                    series.dead.push(0);
                    series.queue_depth.push(held);
                    series.p50_ms.push(None);
                    series.p99_ms.push(None);
                }
            }
        }
        series
    }
}

/// The seconds of a window, oldest first.
fn window(until: u32, seconds: usize) -> impl Iterator<Item = u32> {
    let seconds = seconds.clamp(1, SECONDS) as u32;
    (until.saturating_sub(seconds - 1)..=until).filter(|&s| s > 0)
}

/// The bucket at quantile `q`, `None` with no samples.
fn bucket(buckets: &[u32], q: f64) -> Option<usize> {
    let total: u64 = buckets.iter().map(|&n| u64::from(n)).sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (bucket, &n) in buckets.iter().enumerate() {
        seen += u64::from(n);
        if seen >= rank {
            return Some(bucket);
        }
    }
    Some(buckets.len() - 1)
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
        assert_eq!(bucket(&buckets, 0.5), None);
        buckets[2] = 99;
        buckets[10] = 1;
        assert_eq!(bucket(&buckets, 0.5).map(|b| BOUNDS_MS[b]), Some(5));
        assert_eq!(bucket(&buckets, 0.999).map(|b| BOUNDS_MS[b]), Some(2_000));
    }

    #[test]
    fn a_destination_keeps_only_its_active_seconds_for_an_hour() {
        let mut kept = DestinationSeconds::default();
        kept.at(100).delivered = 2;
        kept.latency[2] = 2;
        kept.at(105).delivered = 1;
        assert_eq!(kept.seconds.len(), 2);
        // Second 100 is over: its histogram became its quantiles.
        assert_eq!(kept.quantiles(0), (Some(5), Some(5)));
        assert_eq!(kept.quantiles(1), (None, None));
        kept.at(105 + SECONDS as u32).delivered = 1;
        assert_eq!(
            kept.seconds.iter().map(|s| s.at).collect::<Vec<_>>(),
            [105 + SECONDS as u32]
        );
    }

    #[test]
    fn a_quiet_destination_holds_its_depth_in_one_entry() {
        let rates = DestinationRates::default();
        for _ in 0..1_000 {
            rates.sample_depth(0);
        }
        assert_eq!(rates.seconds().seconds.len(), 1);
        let series = rates.series(now() + 3, 4);
        assert_eq!(series.queue_depth, [Some(0); 4]);
        assert_eq!(series.delivered, [0; 4]);
        rates.sample_depth(7);
        assert_eq!(rates.series(now(), 1).queue_depth, [Some(7)]);
    }
}
