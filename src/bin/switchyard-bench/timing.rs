//! One clock for the loader and the sinks, and latency samples with their percentiles.
//!
//! Events carry the instant they were sent as nanoseconds since [`anchor`]; the sinks run in
//! this process, so ingest-to-sink latency is one subtraction on the same monotonic clock.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The instant every `*_ns` value in the bench counts from.
pub fn anchor() -> Instant {
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    *ANCHOR.get_or_init(Instant::now)
}

/// Nanoseconds from [`anchor`] to `at`.
pub fn ns(at: Instant) -> u64 {
    at.saturating_duration_since(anchor()).as_nanos() as u64
}

/// Nanoseconds from [`anchor`] to now.
pub fn now_ns() -> u64 {
    ns(Instant::now())
}

/// Latency samples, in microseconds (exact percentiles; a few million samples at most).
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    micros: Vec<u32>,
}

impl Latencies {
    pub fn push(&mut self, latency: Duration) {
        self.micros
            .push(latency.as_micros().min(u128::from(u32::MAX)) as u32);
    }

    pub fn push_ns(&mut self, nanos: u64) {
        self.micros
            .push((nanos / 1_000).min(u64::from(u32::MAX)) as u32);
    }

    pub fn extend(&mut self, other: Latencies) {
        self.micros.extend(other.micros);
    }

    pub fn len(&self) -> usize {
        self.micros.len()
    }

    /// The `q`-quantile (0..=1) by nearest rank, in milliseconds; `None` without samples.
    pub fn percentile_ms(&mut self, q: f64) -> Option<f64> {
        if self.micros.is_empty() {
            return None;
        }
        self.micros.sort_unstable();
        let rank = (q * self.micros.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.micros.len()) - 1;
        Some(f64::from(self.micros[index]) / 1_000.0)
    }

    /// p50 and p99 in milliseconds.
    pub fn p50_p99(&mut self) -> (Option<f64>, Option<f64>) {
        (self.percentile_ms(0.50), self.percentile_ms(0.99))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples = Latencies::default();
        for ms in 1..=100 {
            samples.push(Duration::from_millis(ms));
        }
        assert_eq!(samples.p50_p99(), (Some(50.0), Some(99.0)));
        assert_eq!(Latencies::default().percentile_ms(0.5), None);
    }
}
