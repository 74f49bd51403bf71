//! Traffic control for the worker pool: rate-limit keys and adaptive concurrency.
//!
//! A [`KeyGate`] is one rate-limit key: one GCRA bucket (governor) shared by every destination
//! configured with that key, the vendor's `Retry-After` pause, and whether this process holds
//! the key's lease (a key's bucket lives in exactly one process). A [`Concurrency`] is one
//! destination's adaptive in-flight limit. Both back off multiplicatively when the vendor says
//! "slow down" (429, 503 with `Retry-After`, timeouts) and recover additively, as Vector's
//! adaptive concurrency and RudderStack's throttler do.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use crate::config::RateLimit;

/// The slowest an adaptive rate may go, as a share of the configured limit.
const MIN_RATE_FACTOR: f64 = 0.05;
/// How much of the configured rate is won back per successful request (of the limit).
const RATE_RECOVERY: f64 = 0.002;
/// Decreases closer together than this count as one (a burst of failures is one signal).
const DECREASE_EVERY: Duration = Duration::from_secs(1);
/// Bursts are capped at this much time's worth of the rate: "no burst above the limit".
const BURST_WINDOW: Duration = Duration::from_millis(50);

/// One rate-limit key.
pub struct KeyGate {
    /// A digest of the key: keys may hold credentials, so only the digest is logged or stored.
    pub digest: String,
    limit: Option<RateLimit>,
    owned: AtomicBool,
    state: Mutex<GateState>,
}

struct GateState {
    limiter: Option<DefaultDirectRateLimiter>,
    burst: u32,
    factor: f64,
    last_decrease: Option<Instant>,
    paused_until: Option<Instant>,
}

/// Why a gate said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The key is leased to another process (or not yet to this one).
    NotOwned,
    /// No token, or a vendor pause, until then.
    Until(Instant),
}

impl KeyGate {
    /// A gate for `key` with its limit (`None`: unlimited, and never leased).
    pub fn new(key: &str, limit: Option<RateLimit>) -> KeyGate {
        let hash = Sha256::digest(key.as_bytes());
        let digest: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        let (limiter, burst) = match limit {
            Some(limit) => bucket(limit, 1.0),
            None => (None, 0),
        };
        KeyGate {
            digest,
            limit,
            owned: AtomicBool::new(limit.is_none()),
            state: Mutex::new(GateState {
                limiter,
                burst,
                factor: 1.0,
                last_decrease: None,
                paused_until: None,
            }),
        }
    }

    /// The configured limit (before any adaptive slowdown).
    pub fn limit(&self) -> Option<RateLimit> {
        self.limit
    }

    pub fn is_limited(&self) -> bool {
        self.limit.is_some()
    }

    pub fn owned(&self) -> bool {
        self.owned.load(Ordering::Acquire)
    }

    /// Records whether this process holds the key's lease; returns true when that changed.
    pub fn set_owned(&self, owned: bool) -> bool {
        self.owned.swap(owned, Ordering::AcqRel) != owned
    }

    /// Takes up to `want` request tokens now. Returns how many were granted (at least one), or
    /// why none were.
    pub fn take(&self, want: usize, now: Instant) -> Result<usize, Closed> {
        if !self.owned() {
            return Err(Closed::NotOwned);
        }
        let state = self.state.lock().expect("gate lock");
        if let Some(until) = state.paused_until.filter(|until| *until > now) {
            return Err(Closed::Until(until));
        }
        let Some(limiter) = &state.limiter else {
            return Ok(want);
        };
        let mut ask = (want as u32).clamp(1, state.burst.max(1));
        loop {
            let n = NonZeroU32::new(ask).expect("ask is at least 1");
            match limiter.check_n(n) {
                Ok(Ok(())) => return Ok(ask as usize),
                Ok(Err(not_until)) if ask == 1 => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    return Err(Closed::Until(now + wait));
                }
                _ => ask = (ask / 2).max(1),
            }
        }
    }

    /// The vendor asked for a pause (`Retry-After`): no request goes out on this key until then.
    pub fn pause(&self, until: Instant) {
        let mut state = self.state.lock().expect("gate lock");
        if state.paused_until.is_none_or(|current| current < until) {
            state.paused_until = Some(until);
        }
    }

    /// The vendor is throttling: halve the rate (at most once a second).
    pub fn slow_down(&self, now: Instant) {
        let Some(limit) = self.limit else { return };
        let mut state = self.state.lock().expect("gate lock");
        if state
            .last_decrease
            .is_some_and(|last| now.duration_since(last) < DECREASE_EVERY)
        {
            return;
        }
        state.last_decrease = Some(now);
        state.factor = (state.factor * 0.5).max(MIN_RATE_FACTOR);
        let (limiter, burst) = bucket(limit, state.factor);
        state.limiter = limiter;
        state.burst = burst;
    }

    /// A request went through: win back a little of the rate.
    pub fn speed_up(&self) {
        let Some(limit) = self.limit else { return };
        let mut state = self.state.lock().expect("gate lock");
        if state.factor >= 1.0 {
            return;
        }
        let before = state.factor;
        state.factor = (state.factor + RATE_RECOVERY).min(1.0);
        // Rebuild the bucket only on a step worth it (or on full recovery).
        if state.factor >= 1.0 || (state.factor / before) >= 1.05 || state.factor - before > 0.05 {
            let (limiter, burst) = bucket(limit, state.factor);
            state.limiter = limiter;
            state.burst = burst;
        }
    }

    /// The share of the configured rate in force (1.0 when unthrottled or unlimited).
    pub fn rate_factor(&self) -> f64 {
        self.state.lock().expect("gate lock").factor
    }
}

/// A GCRA bucket for `limit` scaled by `factor`: evenly spaced requests, bursts of at most
/// [`BURST_WINDOW`]'s worth.
fn bucket(limit: RateLimit, factor: f64) -> (Option<DefaultDirectRateLimiter>, u32) {
    let per_request = limit.per.mul_f64(1.0 / (limit.requests as f64 * factor));
    let per_request = per_request.max(Duration::from_nanos(1));
    let burst = (BURST_WINDOW.as_secs_f64() / per_request.as_secs_f64()).floor() as u32;
    let burst = burst.max(1);
    let quota = Quota::with_period(per_request)
        .expect("a positive period")
        .allow_burst(NonZeroU32::new(burst).expect("burst is at least 1"));
    (Some(RateLimiter::direct(quota)), burst)
}

/// One destination's adaptive in-flight limit: starts at `max_in_flight`, halves when the
/// vendor throttles or times out, and grows back by one per window of successes.
pub struct Concurrency {
    max: usize,
    state: Mutex<ConcurrencyState>,
}

struct ConcurrencyState {
    limit: f64,
    last_decrease: Option<Instant>,
}

impl Concurrency {
    pub fn new(max: usize) -> Concurrency {
        Concurrency {
            max: max.max(1),
            state: Mutex::new(ConcurrencyState {
                limit: max.max(1) as f64,
                last_decrease: None,
            }),
        }
    }

    /// Requests allowed in flight now.
    pub fn limit(&self) -> usize {
        let state = self.state.lock().expect("concurrency lock");
        (state.limit.floor() as usize).clamp(1, self.max)
    }

    pub fn decrease(&self, now: Instant) {
        let mut state = self.state.lock().expect("concurrency lock");
        if state
            .last_decrease
            .is_some_and(|last| now.duration_since(last) < DECREASE_EVERY)
        {
            return;
        }
        state.last_decrease = Some(now);
        state.limit = (state.limit * 0.5).max(1.0);
    }

    pub fn increase(&self) {
        let mut state = self.state.lock().expect("concurrency lock");
        state.limit = (state.limit + 1.0 / state.limit).min(self.max as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_second(requests: u32) -> Option<RateLimit> {
        Some(RateLimit {
            requests,
            per: Duration::from_secs(1),
        })
    }

    #[test]
    fn a_gate_grants_no_more_than_its_burst_then_says_when() {
        let gate = KeyGate::new("k", per_second(100));
        gate.set_owned(true);
        let now = Instant::now();
        let granted = gate.take(50, now).unwrap();
        assert_eq!(granted, 5, "100/s allows bursts of 50 ms' worth");
        match gate.take(1, now) {
            Err(Closed::Until(at)) => assert!(at > now && at <= now + Duration::from_millis(20)),
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn an_unowned_or_paused_gate_is_closed() {
        let gate = KeyGate::new("k", per_second(10));
        let now = Instant::now();
        assert_eq!(gate.take(1, now), Err(Closed::NotOwned));
        gate.set_owned(true);
        gate.pause(now + Duration::from_secs(2));
        assert_eq!(
            gate.take(1, now),
            Err(Closed::Until(now + Duration::from_secs(2)))
        );
        assert_eq!(gate.take(1, now + Duration::from_secs(3)), Ok(1));
    }

    #[test]
    fn unlimited_keys_are_always_open_and_owned() {
        let gate = KeyGate::new("k", None);
        assert_eq!(gate.take(40, Instant::now()), Ok(40));
    }

    #[test]
    fn throttling_halves_the_rate_once_a_second_and_successes_win_it_back() {
        let gate = KeyGate::new("k", per_second(100));
        let now = Instant::now();
        gate.slow_down(now);
        gate.slow_down(now + Duration::from_millis(10));
        assert_eq!(gate.rate_factor(), 0.5, "a burst of 429s counts once");
        gate.slow_down(now + Duration::from_secs(2));
        assert_eq!(gate.rate_factor(), 0.25);
        for _ in 0..1000 {
            gate.speed_up();
        }
        assert_eq!(gate.rate_factor(), 1.0);
    }

    #[test]
    fn concurrency_halves_on_trouble_and_grows_back() {
        let c = Concurrency::new(32);
        let now = Instant::now();
        c.decrease(now);
        assert_eq!(c.limit(), 16);
        c.decrease(now + Duration::from_millis(100));
        assert_eq!(c.limit(), 16, "one decrease per second");
        for i in 1..=5 {
            c.decrease(now + Duration::from_secs(2 * i));
        }
        assert_eq!(c.limit(), 1, "never below one");
        for _ in 0..2000 {
            c.increase();
        }
        assert_eq!(c.limit(), 32, "recovers to max_in_flight");
    }

    #[test]
    fn digests_hide_the_key() {
        let gate = KeyGate::new("amplitude:secret-api-key", None);
        assert_eq!(gate.digest.len(), 16);
        assert!(!gate.digest.contains("secret"));
    }
}
