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
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
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
/// How early a request may go, at least: the slack that lets a key woken late by its timer
/// (or by a busy scheduler) catch up instead of losing the time. Without it a limit of 15/s,
/// whose bucket holds one request, sent 14.7/s on an idle machine and under 14/s on a busy one.
const WAKE_SLACK: Duration = Duration::from_millis(20);
/// Cells of the GCRA per request: the slack is a fraction of a request, and governor counts
/// its tolerance in whole cells.
const CELLS_PER_REQUEST: u32 = 16;

/// One rate-limit key.
pub struct KeyGate {
    /// A digest of the key: keys may hold credentials, so only the digest is logged or stored.
    pub digest: String,
    limit: Option<RateLimit>,
    owned: AtomicBool,
    state: Mutex<GateState>,
}

struct GateState {
    bucket: Option<Bucket>,
    /// The next token's instant on the bucket's clock, and the `Instant` every destination
    /// waiting for it was told.
    told: Option<(<DefaultClock as Clock>::Instant, Instant)>,
    factor: f64,
    last_decrease: Option<Instant>,
    paused_until: Option<Instant>,
}

impl GateState {
    /// A new bucket for `limit` at the current factor. What waiters were told was of the old
    /// bucket's tokens.
    fn rebuild(&mut self, limit: RateLimit) {
        self.bucket = Some(Bucket::new(limit, self.factor, DefaultClock::default()));
        self.told = None;
    }
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
        let bucket = limit.map(|limit| Bucket::new(limit, 1.0, DefaultClock::default()));
        KeyGate {
            digest,
            limit,
            owned: AtomicBool::new(limit.is_none()),
            state: Mutex::new(GateState {
                bucket,
                told: None,
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
        let mut state = self.state.lock().expect("gate lock");
        if let Some(until) = state.paused_until.filter(|until| *until > now) {
            return Err(Closed::Until(until));
        }
        let Some(bucket) = &state.bucket else {
            return Ok(want);
        };
        let (next, wait) = match bucket.take(want) {
            Ok(granted) => return Ok(granted),
            Err(next) => next,
        };
        // Every destination waiting for one token is told the same instant, so the scheduler's
        // timer wakes them in the order they asked. Reading the clock anew for each let a few
        // microseconds' noise decide, always the same way: of two destinations sharing a key,
        // one got every token and the other none.
        let until = match state.told {
            Some((told, at)) if told == next => at,
            _ => now + wait,
        };
        state.told = Some((next, until));
        Err(Closed::Until(until))
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
        state.rebuild(limit);
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
            state.rebuild(limit);
        }
    }

    /// The share of the configured rate in force (1.0 when unthrottled or unlimited).
    pub fn rate_factor(&self) -> f64 {
        self.state.lock().expect("gate lock").factor
    }
}

/// A GCRA bucket for `limit` scaled by `factor`: requests evenly spaced at the rate, each
/// allowed to go early by the bucket's tolerance, so at most [`BURST_WINDOW`]'s worth go at
/// once (and at least one). The tolerance is never under [`WAKE_SLACK`]: at a rate whose
/// bucket holds one request, a request taken late would otherwise push every later one back
/// by as much, and the rate would fall short by the scheduler's lateness. It stays under one
/// request's interval there, so no second-long window holds more than one request above the
/// limit.
struct Bucket<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    /// Requests granted at once, at most.
    burst: u32,
}

impl<C: Clock> Bucket<C> {
    fn new(limit: RateLimit, factor: f64, clock: C) -> Bucket<C> {
        let per_request = limit.per.mul_f64(1.0 / (limit.requests as f64 * factor));
        let cell = (per_request / CELLS_PER_REQUEST).max(Duration::from_nanos(1));
        let per_request = cell * CELLS_PER_REQUEST;
        let tolerance = BURST_WINDOW.saturating_sub(per_request).max(WAKE_SLACK);
        let capacity = CELLS_PER_REQUEST + (tolerance.as_nanos() / cell.as_nanos()) as u32;
        let quota = Quota::with_period(cell)
            .expect("a positive period")
            .allow_burst(NonZeroU32::new(capacity).expect("capacity is at least one request"));
        Bucket {
            limiter: RateLimiter::direct_with_clock(quota, clock),
            burst: capacity / CELLS_PER_REQUEST,
        }
    }

    /// Takes up to `want` requests' tokens now: how many were granted (at least one), or when
    /// the next will be, on the bucket's clock and from now.
    fn take(&self, want: usize) -> Result<usize, (C::Instant, Duration)> {
        let mut ask = (want as u32).clamp(1, self.burst);
        loop {
            let cells = NonZeroU32::new(ask * CELLS_PER_REQUEST).expect("ask is at least 1");
            match self.limiter.check_n(cells) {
                Ok(Ok(())) => return Ok(ask as usize),
                Ok(Err(not_until)) if ask == 1 => {
                    let wait = not_until.wait_time_from(self.limiter.clock().now());
                    return Err((not_until.earliest_possible(), wait));
                }
                _ => ask = (ask / 2).max(1),
            }
        }
    }
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

    /// Drives a bucket on a fake clock for 10 s: each request is taken `late` after the
    /// bucket said it could be (the scheduler's timer and loop), up to `want` at a time.
    /// Returns when each request was granted, from the start.
    fn drive(limit: u32, want: usize, late: impl Fn(usize) -> Duration) -> Vec<Duration> {
        use governor::clock::FakeRelativeClock;
        let clock = FakeRelativeClock::default();
        let bucket = Bucket::new(per_second(limit).unwrap(), 1.0, clock.clone());
        let (mut now, mut granted) = (Duration::ZERO, Vec::new());
        while now < Duration::from_secs(10) {
            match bucket.take(want) {
                Ok(n) => granted.extend(std::iter::repeat_n(now, n)),
                Err((_, wait)) => {
                    let step = wait + late(granted.len());
                    clock.advance(step);
                    now += step;
                }
            }
        }
        granted
    }

    /// The most requests granted within any one second.
    fn peak(granted: &[Duration]) -> usize {
        let mut start = 0;
        (0..granted.len())
            .map(|end| {
                while granted[end] - granted[start] >= Duration::from_secs(1) {
                    start += 1;
                }
                end - start + 1
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn a_key_taken_late_still_gets_its_whole_rate() {
        // 15/s holds one request at a time; each is taken 5 ms after it could have been.
        let granted = drive(15, 1, |_| Duration::from_millis(5));
        assert!(
            granted.len() >= 150,
            "{} requests in 10 s at 15/s",
            granted.len()
        );
    }

    #[test]
    fn no_second_holds_more_than_the_burst_over_the_limit() {
        // Lateness that comes and goes lets a request use the slack a late one left.
        let jitter = |i: usize| Duration::from_millis([0, 12, 3, 19, 7][i % 5]);
        for (limit, extra) in [(15, 1), (20, 1), (40, 1), (100, 4), (1000, 49)] {
            for want in [1, 50] {
                let granted = drive(limit, want, jitter);
                let peak = peak(&granted);
                assert!(
                    peak <= limit as usize + extra,
                    "{peak} in one second at {limit}/s"
                );
                assert!(granted.len() >= 10 * limit as usize, "{limit}/s fell short");
            }
        }
    }

    #[test]
    fn everyone_waiting_for_one_token_is_told_the_same_instant() {
        let gate = KeyGate::new("k", per_second(15));
        gate.set_owned(true);
        assert_eq!(gate.take(1, Instant::now()), Ok(1));
        let first = gate.take(1, Instant::now());
        std::thread::sleep(Duration::from_millis(2));
        let second = gate.take(1, Instant::now());
        assert!(matches!(first, Err(Closed::Until(_))), "{first:?}");
        assert_eq!(first, second);
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
