//! Load balancing over a destination's endpoints (a webhook's `urls`): the power of two choices,
//! informed by health, utilization, probation and ramp-up.
//!
//! Several Switchyard processes may deliver to the same replicas at once, so nobody has a
//! central view of their load, and round robin hands a slow or broken replica the same share as
//! a healthy one. Each process decides instead from what it sees itself (its own requests in
//! flight to each endpoint, each endpoint's recent errors) and from what an endpoint says of
//! itself: the optional response header `X-Server-Utilization: 0.0..1.0`, the share of its
//! capacity in use counting every client. This is Netflix's edge load balancer ("Rethinking
//! Netflix's Edge Load Balancing", 2018), per destination.
//!
//! Choosing an endpoint for a request:
//! 1. **Filter.** Endpoints that are unhealthy (rolling error rate over 50%), saturated
//!    (reported utilization of 0.9 or more, or on probation with a request in flight) or cooling
//!    down (they asked for a pause with `Retry-After`) are left out while any other is
//!    available, so two bad endpoints are rarely compared. With all of them left out, the least
//!    bad one gets the request (delivery never stops for want of a perfect one): the lowest
//!    score among the healthy ones, as a saturated endpoint queues a request where an unhealthy
//!    one fails it (fast, so it would otherwise draw everything); among all when none is.
//! 2. **Choose two.** Two distinct endpoints are drawn at random, each with its ramp-up weight,
//!    and the one with the lower score gets the request. Score = (in flight + 1) × (1 + 8 ×
//!    error rate) / (1 − utilization): each factor grows as the endpoint gets worse, so a busy,
//!    failing or loaded endpoint loses. Two random candidates instead of the global best keep
//!    processes with the same stale view from all piling onto one endpoint.
//! 3. **Retry elsewhere.** The endpoint a batch last failed on (remembered by its first
//!    messageId, for the last 4,096 failures) is left out of the batch's retry when others exist.
//!
//! What each answer teaches:
//! - **Error rate**: each answer moves it a quarter of the way to 1 (connection error, timeout,
//!   5xx, 408) or to 0 (2xx). Three failures in a row make an endpoint unhealthy.
//! - **Utilization** (when `use_utilization` is on): the last value the endpoint reported,
//!   plus what this process's requests sent since add (minus those answered since). What one
//!   request adds is learned from the reports: utilization over this process's requests in
//!   flight at the time (an upper bound, as other clients count in the report too). Without the
//!   adjustment, a burst of requests picked between two reports would all see the endpoint as
//!   idle as it last said, and overflow a small one.
//! - **Decay**: both fade linearly to zero over `decay` (30 s by default) from the last answer,
//!   so an endpoint left out for its errors is tried again and never excluded forever.
//! - **Probation**: an endpoint added at a reload, or one that just turned unhealthy, takes one
//!   request at a time until it answers with a 2xx.
//! - **Ramp-up**: an endpoint added at a reload starts at weight 0.1 in the draw and grows
//!   linearly to 1 over `ramp_up` (90 s by default), so a cold replica (empty caches, a JIT
//!   warming up) is not handed its full share at once. The endpoints a destination starts with
//!   are all at full weight: ramping every one of them up together would change nothing.
//!
//! `round_robin` ignores all of this and takes the endpoints in turn (the baseline of the
//! `balancing` benchmark).
//!
//! This module is bookkeeping only: the caller passes the time (`now`) and the random draw is
//! seeded, so tests control both.
//!
//! One file on purpose: it is one algorithm (the state each choice reads and each answer
//! updates), and the tests below walk through it rule by rule.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use url::Url;

use crate::destination::EndpointStats;

/// The response header an endpoint may report its utilization in (0.0 to 1.0).
pub const UTILIZATION_HEADER: &str = "x-server-utilization";

/// Error rate above which an endpoint is unhealthy.
const UNHEALTHY_ERROR_RATE: f64 = 0.5;
/// Reported utilization from which an endpoint is saturated.
const SATURATED_UTILIZATION: f64 = 0.9;
/// How far one answer moves the rolling error rate: three failures in a row cross 0.5.
const ERROR_SMOOTHING: f64 = 0.25;
/// How far one report moves the learned utilization of one request.
const SHARE_SMOOTHING: f64 = 0.2;
/// How much the error rate weighs in the score: one recent failure counts like two more
/// requests in flight.
const ERROR_PENALTY: f64 = 8.0;
/// Utilization is capped here in the score, so a full endpoint scores high but finite.
const MAX_SCORED_UTILIZATION: f64 = 0.95;
/// The share a newly added endpoint starts its ramp-up with.
const MIN_WEIGHT: f64 = 0.1;
/// Failed batches whose endpoint is remembered for their retry.
const REMEMBERED_FAILURES: usize = 4096;
/// How long a `429` without `Retry-After` keeps an endpoint aside.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause an endpoint's `Retry-After` sets it aside for.
const MAX_PAUSE: Duration = Duration::from_secs(600);

/// How requests are spread over the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The power of two choices, with filtering, probation and ramp-up.
    PowerOfTwo,
    /// In turn, whatever their state.
    RoundRobin,
}

/// A destination's balancing settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub strategy: Strategy,
    /// Whether reported utilization counts (the score and the saturation filter).
    pub use_utilization: bool,
    /// How long a newly added endpoint takes to reach its full share (zero: at once).
    pub ramp_up: Duration,
    /// How long error rate and utilization take to fade to zero after the last answer.
    pub decay: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            strategy: Strategy::PowerOfTwo,
            use_utilization: true,
            ramp_up: Duration::from_secs(90),
            decay: Duration::from_secs(30),
        }
    }
}

/// What an answer says about the endpoint that gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 2xx.
    Success,
    /// Connection error, timeout, 5xx or 408: counts against its health.
    Failure,
    /// 429: healthy but asking for a pause; it is set aside for the pause.
    Throttled,
    /// Any other answer (another 4xx, a refused address): says nothing about the endpoint.
    Other,
}

/// One answer, as the balancer learns from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub answer: Answer,
    /// The endpoint's `X-Server-Utilization`, when it sent one.
    pub utilization: Option<f64>,
    /// Its `Retry-After`, when it sent one: it is set aside that long.
    pub pause: Option<Duration>,
}

impl Report {
    pub fn new(answer: Answer) -> Report {
        Report {
            answer,
            utilization: None,
            pause: None,
        }
    }
}

/// What the balancer knows of one endpoint right after an answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settled {
    pub in_flight: usize,
    pub error_rate: f64,
    /// Another endpoint is available for a retry (never with round robin): a failure here is
    /// this endpoint's, not the receiver's as a whole.
    pub elsewhere: bool,
}

/// A value that fades linearly to zero over the decay period after it was last set.
#[derive(Debug, Clone, Copy)]
struct Faded {
    value: f64,
    at: Instant,
}

impl Faded {
    fn get(&self, now: Instant, decay: Duration) -> f64 {
        if decay.is_zero() {
            return 0.0;
        }
        let age = now.saturating_duration_since(self.at).as_secs_f64();
        self.value * (1.0 - age / decay.as_secs_f64()).max(0.0)
    }
}

#[derive(Debug, Clone)]
struct Endpoint {
    /// The full URL: an endpoint's identity across reloads.
    url: String,
    /// The URL as shown: credentials and query masked.
    label: String,
    /// When a ramp-up began (endpoints added at a reload); `None`: full weight.
    ramp_from: Option<Instant>,
    in_flight: usize,
    error_rate: Faded,
    /// The last utilization reported, and this process's requests in flight right after it.
    utilization: Option<Faded>,
    reported_in_flight: usize,
    /// The utilization one of this process's requests adds, learned from the reports.
    request_share: Option<f64>,
    probation: bool,
    paused_until: Option<Instant>,
    requests: u64,
    failures: u64,
}

impl Endpoint {
    fn new(url: &Url, now: Instant, added: bool) -> Endpoint {
        Endpoint {
            url: url.as_str().to_owned(),
            label: mask(url),
            ramp_from: added.then_some(now),
            in_flight: 0,
            error_rate: Faded {
                value: 0.0,
                at: now,
            },
            utilization: None,
            reported_in_flight: 0,
            request_share: None,
            probation: added,
            paused_until: None,
            requests: 0,
            failures: 0,
        }
    }
}

/// The failed batches' endpoints, oldest forgotten first.
#[derive(Debug, Default)]
struct FailureMemory {
    endpoint: HashMap<String, (usize, u64)>,
    /// Insertion order, with a sequence number so a key set again is not evicted by its older
    /// entry.
    order: VecDeque<(String, u64)>,
    sequence: u64,
}

impl FailureMemory {
    fn get(&self, key: &str) -> Option<usize> {
        self.endpoint.get(key).map(|(index, _)| *index)
    }

    fn remember(&mut self, key: &str, index: usize) {
        self.sequence += 1;
        self.endpoint.insert(key.to_owned(), (index, self.sequence));
        self.order.push_back((key.to_owned(), self.sequence));
        while self.order.len() > REMEMBERED_FAILURES {
            if let Some((old, sequence)) = self.order.pop_front() {
                if self.endpoint.get(&old).is_some_and(|(_, s)| *s == sequence) {
                    self.endpoint.remove(&old);
                }
            }
        }
    }

    fn forget(&mut self, key: &str) {
        self.endpoint.remove(key);
    }
}

struct State {
    endpoints: Vec<Endpoint>,
    /// The next endpoint for round robin.
    next: usize,
    rng: SmallRng,
    failed: FailureMemory,
}

/// One destination's endpoints and what is known about each. Shared by every delivery of the
/// destination; each decision holds a lock for a few microseconds.
pub struct Balancer {
    policy: Policy,
    state: Mutex<State>,
}

impl Balancer {
    /// A balancer over `urls` (at least one), all at full weight. `seed` seeds the draw.
    pub fn new(urls: &[Url], policy: Policy, now: Instant, seed: u64) -> Balancer {
        assert!(!urls.is_empty(), "a balancer needs an endpoint");
        let endpoints = urls.iter().map(|url| Endpoint::new(url, now, false));
        Balancer::with(endpoints.collect(), policy, seed)
    }

    /// The balancer that replaces `previous` at a reload: endpoints it had keep what was
    /// learned about them; endpoints it did not have are new, on probation, and ramp up. When
    /// no endpoint is shared, nothing is carried over and all start at full weight.
    pub fn succeed(
        previous: &Balancer,
        urls: &[Url],
        policy: Policy,
        now: Instant,
        seed: u64,
    ) -> Balancer {
        let balancer = Balancer::new(urls, policy, now, seed);
        balancer.take_over(previous, now);
        balancer
    }

    /// Makes this new balancer (not used yet) the successor of `previous`, as
    /// [`Balancer::succeed`] describes; nothing changes when no endpoint is shared.
    pub fn take_over(&self, previous: &Balancer, now: Instant) {
        if std::ptr::eq(self, previous) {
            return;
        }
        let old = previous.lock().endpoints.clone();
        let mut state = self.lock();
        let shared = state
            .endpoints
            .iter()
            .any(|mine| old.iter().any(|e| e.url == mine.url));
        if !shared {
            return;
        }
        for endpoint in state.endpoints.iter_mut() {
            match old.iter().find(|e| e.url == endpoint.url) {
                // Requests in flight finish on the previous balancer's books.
                Some(known) => {
                    *endpoint = Endpoint {
                        in_flight: 0,
                        reported_in_flight: 0,
                        ..known.clone()
                    }
                }
                // Added: on probation, and ramping up from now.
                None => {
                    endpoint.ramp_from = Some(now);
                    endpoint.probation = true;
                    endpoint.error_rate.at = now;
                }
            }
        }
    }

    fn with(endpoints: Vec<Endpoint>, policy: Policy, seed: u64) -> Balancer {
        Balancer {
            policy,
            state: Mutex::new(State {
                endpoints,
                next: 0,
                rng: SmallRng::seed_from_u64(seed),
                failed: FailureMemory::default(),
            }),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding it: every update is a
        // few field writes.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Chooses the endpoint for one request. `retry_key` names the batch (its first
    /// messageId): an endpoint it failed on before is avoided. The request counts as in flight
    /// until the [`Pick`] is finished or dropped.
    pub fn pick(&self, retry_key: Option<&str>, now: Instant) -> Pick<'_> {
        let mut state = self.lock();
        let index = match self.policy.strategy {
            Strategy::RoundRobin => {
                let index = state.next % state.endpoints.len();
                state.next = state.next.wrapping_add(1);
                index
            }
            Strategy::PowerOfTwo => self.choose(&mut state, retry_key, now),
        };
        let endpoint = &mut state.endpoints[index];
        endpoint.in_flight += 1;
        endpoint.requests += 1;
        Pick {
            balancer: self,
            index,
            in_flight: endpoint.in_flight,
            open: true,
        }
    }

    fn choose(&self, state: &mut State, retry_key: Option<&str>, now: Instant) -> usize {
        let count = state.endpoints.len();
        let avoid = retry_key
            .and_then(|key| state.failed.get(key))
            .filter(|_| count > 1);
        let candidates: Vec<usize> = (0..count).filter(|i| Some(*i) != avoid).collect();
        let available: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| self.available(&state.endpoints[i], now))
            .collect();
        let score = |i: usize| self.score(&state.endpoints[i], now);
        match available.as_slice() {
            [] => {
                // A saturated endpoint queues the request; an unhealthy one most likely fails
                // it, fast, and would draw everything like a black hole.
                let healthy: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&i| !self.unhealthy(&state.endpoints[i], now))
                    .collect();
                let least_bad = if healthy.is_empty() {
                    &candidates
                } else {
                    &healthy
                };
                least_bad
                    .iter()
                    .copied()
                    .min_by(|&a, &b| score(a).total_cmp(&score(b)))
                    .unwrap_or(0)
            }
            [only] => *only,
            pool => {
                let weights: Vec<f64> = pool
                    .iter()
                    .map(|&i| self.weight(&state.endpoints[i], now))
                    .collect();
                let (first, second) = draw_two(&mut state.rng, &weights);
                let (a, b) = (pool[first], pool[second]);
                if score(b) < score(a) {
                    b
                } else {
                    a
                }
            }
        }
    }

    /// Failing too often, or paused at its own request.
    fn unhealthy(&self, endpoint: &Endpoint, now: Instant) -> bool {
        self.error_rate(endpoint, now) > UNHEALTHY_ERROR_RATE
            || endpoint.paused_until.is_some_and(|until| now < until)
    }

    /// Neither unhealthy, saturated nor paused.
    fn available(&self, endpoint: &Endpoint, now: Instant) -> bool {
        let unhealthy = self.unhealthy(endpoint, now);
        let saturated = self
            .utilization(endpoint, now)
            .is_some_and(|u| u >= SATURATED_UTILIZATION)
            || (endpoint.probation && endpoint.in_flight > 0);
        !(unhealthy || saturated)
    }

    /// Lower is better.
    fn score(&self, endpoint: &Endpoint, now: Instant) -> f64 {
        let load = endpoint.in_flight as f64 + 1.0;
        let errors = 1.0 + ERROR_PENALTY * self.error_rate(endpoint, now);
        let busy = self
            .utilization(endpoint, now)
            .map_or(1.0, |u| 1.0 / (1.0 - u.clamp(0.0, MAX_SCORED_UTILIZATION)));
        load * errors * busy
    }

    fn error_rate(&self, endpoint: &Endpoint, now: Instant) -> f64 {
        endpoint.error_rate.get(now, self.policy.decay)
    }

    /// The endpoint's utilization now: its last report, fading, adjusted for this process's
    /// requests sent or answered since.
    fn utilization(&self, endpoint: &Endpoint, now: Instant) -> Option<f64> {
        if !self.policy.use_utilization {
            return None;
        }
        let reported = endpoint.utilization?.get(now, self.policy.decay);
        let since = endpoint.in_flight as f64 - endpoint.reported_in_flight as f64;
        let share = endpoint.request_share.unwrap_or(0.0);
        Some((reported + since * share).clamp(0.0, 1.0))
    }

    /// Its share in the draw: `MIN_WEIGHT` growing to 1 over the ramp-up.
    fn weight(&self, endpoint: &Endpoint, now: Instant) -> f64 {
        let Some(from) = endpoint.ramp_from else {
            return 1.0;
        };
        if self.policy.ramp_up.is_zero() {
            return 1.0;
        }
        let grown =
            now.saturating_duration_since(from).as_secs_f64() / self.policy.ramp_up.as_secs_f64();
        MIN_WEIGHT + (1.0 - MIN_WEIGHT) * grown.min(1.0)
    }

    fn settle(
        &self,
        index: usize,
        report: Report,
        retry_key: Option<&str>,
        now: Instant,
    ) -> Settled {
        let mut state = self.lock();
        let decay = self.policy.decay;
        let endpoint = &mut state.endpoints[index];
        endpoint.in_flight = endpoint.in_flight.saturating_sub(1);
        let was_unhealthy = endpoint.error_rate.get(now, decay) > UNHEALTHY_ERROR_RATE;
        let observed = match report.answer {
            Answer::Success => Some(0.0),
            Answer::Failure => Some(1.0),
            Answer::Throttled | Answer::Other => None,
        };
        if let Some(observed) = observed {
            let current = endpoint.error_rate.get(now, decay);
            endpoint.error_rate = Faded {
                value: current + ERROR_SMOOTHING * (observed - current),
                at: now,
            };
        }
        match report.answer {
            Answer::Success => endpoint.probation = false,
            Answer::Failure => {
                endpoint.failures += 1;
                let unhealthy = endpoint.error_rate.value > UNHEALTHY_ERROR_RATE;
                // Turning unhealthy puts it on probation for when it comes back.
                endpoint.probation |= unhealthy && !was_unhealthy;
            }
            Answer::Throttled | Answer::Other => {}
        }
        if self.policy.use_utilization {
            if let Some(reported) = report.utilization.filter(|u| u.is_finite()) {
                let reported = reported.clamp(0.0, 1.0);
                if endpoint.in_flight > 0 && reported > 0.0 {
                    let share = reported / endpoint.in_flight as f64;
                    endpoint.request_share = Some(
                        endpoint
                            .request_share
                            .map_or(share, |s| s + SHARE_SMOOTHING * (share - s)),
                    );
                }
                endpoint.utilization = Some(Faded {
                    value: reported,
                    at: now,
                });
                endpoint.reported_in_flight = endpoint.in_flight;
            }
        }
        let pause = match (report.answer, report.pause) {
            (_, Some(pause)) => Some(pause.min(MAX_PAUSE)),
            (Answer::Throttled, None) => Some(DEFAULT_PAUSE),
            _ => None,
        };
        if let Some(pause) = pause {
            endpoint.paused_until = now.checked_add(pause);
        }
        let in_flight = endpoint.in_flight;
        let error_rate = endpoint.error_rate.get(now, decay);
        if let Some(key) = retry_key {
            match report.answer {
                Answer::Failure | Answer::Throttled => state.failed.remember(key, index),
                Answer::Success | Answer::Other => state.failed.forget(key),
            }
        }
        let elsewhere = self.policy.strategy == Strategy::PowerOfTwo
            && state
                .endpoints
                .iter()
                .enumerate()
                .any(|(i, e)| i != index && self.available(e, now));
        Settled {
            in_flight,
            error_rate,
            elsewhere,
        }
    }

    fn release(&self, index: usize) {
        let mut state = self.lock();
        let endpoint = &mut state.endpoints[index];
        endpoint.in_flight = endpoint.in_flight.saturating_sub(1);
    }

    /// Every endpoint as the admin API and the metrics show it, in configured order.
    pub fn endpoints(&self, now: Instant) -> Vec<EndpointStats> {
        let state = self.lock();
        state
            .endpoints
            .iter()
            .map(|endpoint| EndpointStats {
                url: endpoint.label.clone(),
                in_flight: endpoint.in_flight,
                error_rate: rounded(self.error_rate(endpoint, now)),
                utilization: self.utilization(endpoint, now).map(rounded),
                probation: endpoint.probation,
                weight: rounded(self.weight(endpoint, now)),
                requests: endpoint.requests,
                failures: endpoint.failures,
            })
            .collect()
    }
}

fn rounded(value: f64) -> f64 {
    (value * 10_000.0).round() / 10_000.0
}

/// Draws two distinct positions of `weights` (at least two), each in proportion to its weight.
fn draw_two(rng: &mut SmallRng, weights: &[f64]) -> (usize, usize) {
    let first = draw(rng, weights, None);
    let second = draw(rng, weights, Some(first));
    (first, second)
}

fn draw(rng: &mut SmallRng, weights: &[f64], except: Option<usize>) -> usize {
    let eligible = |i: &usize| Some(*i) != except;
    let total: f64 = (0..weights.len())
        .filter(eligible)
        .map(|i| weights[i])
        .sum();
    let mut left = rng.random::<f64>() * total;
    let mut last = 0;
    for i in (0..weights.len()).filter(eligible) {
        last = i;
        if left < weights[i] {
            return i;
        }
        left -= weights[i];
    }
    last
}

/// One request's hold on an endpoint: counts as in flight until finished or dropped (a
/// delivery cancelled midway gives its slot back without teaching anything).
pub struct Pick<'a> {
    balancer: &'a Balancer,
    index: usize,
    in_flight: usize,
    open: bool,
}

impl Pick<'_> {
    /// The chosen endpoint: its position in the configured list.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Requests in flight to it, this one included.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Records the answer and frees the slot.
    pub fn finish(mut self, report: Report, retry_key: Option<&str>, now: Instant) -> Settled {
        self.open = false;
        self.balancer.settle(self.index, report, retry_key, now)
    }
}

impl Drop for Pick<'_> {
    fn drop(&mut self) {
        if self.open {
            self.balancer.release(self.index);
        }
    }
}

/// A URL as shown in the admin API, metrics and messages: user name, password and query (where
/// credentials tend to hide) replaced by `***`.
pub fn mask(url: &Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() {
        let _ = shown.set_username("***");
    }
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    if shown.query().is_some() {
        shown.set_query(Some("***"));
    }
    shown.set_fragment(None);
    shown.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(count: usize) -> Vec<Url> {
        (0..count)
            .map(|i| Url::parse(&format!("http://10.0.0.{i}:8080/in")).unwrap())
            .collect()
    }

    fn balancer(count: usize, now: Instant) -> Balancer {
        Balancer::new(&urls(count), Policy::default(), now, 7)
    }

    /// How many of `picks` immediately finished picks went to each endpoint.
    fn shares(balancer: &Balancer, picks: usize, now: Instant) -> Vec<usize> {
        let mut counts = vec![0; balancer.endpoints(now).len()];
        for _ in 0..picks {
            let pick = balancer.pick(None, now);
            counts[pick.index()] += 1;
            pick.finish(Report::new(Answer::Success), None, now);
        }
        counts
    }

    fn fail(balancer: &Balancer, index: usize, times: usize, now: Instant) {
        for _ in 0..times {
            report(balancer, index, Report::new(Answer::Failure), now);
        }
    }

    /// Finishes a pick on `index` with `report`, whatever the balancer would have chosen.
    fn report(balancer: &Balancer, index: usize, report: Report, now: Instant) {
        let mut state = balancer.lock();
        state.endpoints[index].in_flight += 1;
        drop(state);
        balancer.settle(index, report, None, now);
    }

    fn utilization(value: f64) -> Report {
        Report {
            utilization: Some(value),
            ..Report::new(Answer::Success)
        }
    }

    #[test]
    fn prefers_the_endpoint_with_fewer_requests_in_flight() {
        let now = Instant::now();
        let balancer = balancer(3, now);
        let mut held = Vec::new();
        while held.iter().filter(|p: &&Pick| p.index() == 0).count() < 6 {
            held.push(balancer.pick(None, now));
        }
        held.retain(|p| p.index() == 0);
        let counts = shares(&balancer, 300, now);
        assert_eq!(
            counts[0], 0,
            "the busy endpoint loses every comparison: {counts:?}"
        );
        assert!(counts[1] > 100 && counts[2] > 100, "{counts:?}");
        drop(held);
        assert_eq!(
            balancer.endpoints(now)[0].in_flight,
            0,
            "dropped picks free their slot"
        );
    }

    #[test]
    fn prefers_the_endpoint_that_fails_less() {
        let now = Instant::now();
        let balancer = balancer(3, now);
        fail(&balancer, 0, 1, now);
        let counts = shares(&balancer, 300, now);
        assert_eq!(counts[0], 0, "{counts:?}");
        assert_eq!(balancer.endpoints(now)[0].failures, 1);
    }

    #[test]
    fn prefers_the_endpoint_that_reports_less_utilization() {
        let now = Instant::now();
        let balancer = balancer(3, now);
        report(&balancer, 0, utilization(0.6), now);
        report(&balancer, 1, utilization(0.1), now);
        report(&balancer, 2, utilization(0.1), now);
        let counts = shares(&balancer, 300, now);
        assert_eq!(counts[0], 0, "{counts:?}");

        let blind = Policy {
            use_utilization: false,
            ..Policy::default()
        };
        let balancer = Balancer::new(&urls(3), blind, now, 7);
        report(&balancer, 0, utilization(0.6), now);
        let counts = shares(&balancer, 300, now);
        assert!(
            counts[0] > 50,
            "utilization is ignored when off: {counts:?}"
        );
        assert_eq!(balancer.endpoints(now)[0].utilization, None);
    }

    #[test]
    fn requests_sent_since_a_report_count_toward_utilization() {
        let now = Instant::now();
        let balancer = balancer(2, now);
        balancer.lock().endpoints[0].in_flight = 3;
        // Answered with two more requests of ours still there: each adds 0.25.
        balancer.settle(0, utilization(0.5), None, now);
        assert_eq!(balancer.endpoints(now)[0].utilization, Some(0.5));
        balancer.lock().endpoints[0].in_flight = 4;
        assert_eq!(balancer.endpoints(now)[0].utilization, Some(1.0));
        let counts = shares(&balancer, 20, now);
        assert_eq!(counts, vec![0, 20], "saturated by what was sent since");
        balancer.lock().endpoints[0].in_flight = 0;
        assert_eq!(
            balancer.endpoints(now)[0].utilization,
            Some(0.0),
            "all answered"
        );
    }

    #[test]
    fn unhealthy_and_saturated_endpoints_are_left_out_while_others_are_available() {
        let now = Instant::now();
        let balancer = balancer(3, now);
        fail(&balancer, 0, 3, now);
        report(&balancer, 1, utilization(0.95), now);
        // Endpoint 2 is loaded: by score alone the unhealthy endpoint 0 would win.
        let mut held = Vec::new();
        for _ in 0..20 {
            let pick = balancer.pick(None, now);
            assert_eq!(pick.index(), 2, "{:?}", balancer.endpoints(now));
            held.push(pick);
        }
        let unhealthy_score = balancer.score(&balancer.lock().endpoints[0], now);
        assert!(
            unhealthy_score < 21.0,
            "it would win on score alone: {unhealthy_score}"
        );
    }

    #[test]
    fn with_every_endpoint_left_out_the_least_bad_one_is_used() {
        let now = Instant::now();
        let balancer = balancer(3, now);
        fail(&balancer, 0, 8, now);
        fail(&balancer, 1, 3, now);
        report(&balancer, 2, utilization(0.99), now);
        // Scores: 0 ≈ 1 × (1 + 8 × 0.9), 1 ≈ 1 × (1 + 8 × 0.58), 2 = 1 / (1 - 0.95) = 20;
        // yet a saturated endpoint beats unhealthy ones, whatever their scores.
        assert_eq!(shares(&balancer, 10, now), vec![0, 0, 10]);

        let balancer = self::balancer(2, now);
        fail(&balancer, 0, 8, now);
        fail(&balancer, 1, 3, now);
        assert_eq!(shares(&balancer, 10, now), vec![0, 10], "the lower score");
    }

    #[test]
    fn probation_allows_one_request_at_a_time_until_a_success() {
        let start = Instant::now();
        let previous = balancer(2, start);
        let mut grown = urls(2);
        grown.push(Url::parse("http://10.0.0.9:8080/in").unwrap());
        let now = start + Duration::from_secs(1000);
        let balancer = Balancer::succeed(&previous, &grown, Policy::default(), now, 7);
        assert!(balancer.endpoints(now)[2].probation);
        assert!(
            !balancer.endpoints(now)[0].probation,
            "known endpoints keep their state"
        );
        let mut held = Vec::new();
        for _ in 0..400 {
            held.push(balancer.pick(None, now));
        }
        let on_new = held.iter().filter(|p| p.index() == 2).count();
        assert_eq!(on_new, 1, "one request at a time on probation");
        let first = held
            .iter()
            .position(|p| p.index() == 2)
            .map(|at| held.remove(at));
        first
            .unwrap()
            .finish(Report::new(Answer::Success), None, now);
        assert!(
            !balancer.endpoints(now)[2].probation,
            "a success ends probation"
        );
        drop(held);
        let mut held = Vec::new();
        for _ in 0..400 {
            held.push(balancer.pick(None, now));
        }
        assert!(held.iter().filter(|p| p.index() == 2).count() > 1);
    }

    #[test]
    fn an_endpoint_that_turns_unhealthy_recovers_on_probation() {
        let now = Instant::now();
        let balancer = balancer(2, now);
        fail(&balancer, 0, 3, now);
        let stats = balancer.endpoints(now);
        assert!(stats[0].probation && stats[0].error_rate > 0.5, "{stats:?}");
    }

    #[test]
    fn a_new_endpoint_ramps_up_over_ninety_seconds() {
        let start = Instant::now();
        let previous = balancer(3, start);
        let mut grown = urls(3);
        grown.push(Url::parse("http://10.0.0.9:8080/in").unwrap());
        let balancer = Balancer::succeed(&previous, &grown, Policy::default(), start, 11);
        report(&balancer, 3, Report::new(Answer::Success), start);
        let share = |seconds: u64| {
            let now = start + Duration::from_secs(seconds);
            shares(&balancer, 4000, now)[3] as f64 / 4000.0
        };
        let (early, half, full, later) = (share(0), share(45), share(90), share(300));
        assert!(early < 0.06, "{early}");
        assert!(
            half > early + 0.05 && full > half + 0.03,
            "{early} {half} {full}"
        );
        assert!((full - 0.25).abs() < 0.03, "a full share of four: {full}");
        assert!((later - full).abs() < 0.03, "{full} {later}");
        let weights: Vec<f64> = balancer
            .endpoints(start + Duration::from_secs(45))
            .iter()
            .map(|e| e.weight)
            .collect();
        assert_eq!(weights, vec![1.0, 1.0, 1.0, 0.55]);
    }

    #[test]
    fn ramp_up_zero_gives_a_new_endpoint_its_full_share_at_once() {
        let now = Instant::now();
        let previous = balancer(1, now);
        let instant = Policy {
            ramp_up: Duration::ZERO,
            ..Policy::default()
        };
        let balancer = Balancer::succeed(&previous, &urls(2), instant, now, 3);
        assert_eq!(balancer.endpoints(now)[1].weight, 1.0);
    }

    #[test]
    fn errors_and_utilization_fade_so_no_endpoint_is_left_out_for_ever() {
        let start = Instant::now();
        let balancer = balancer(3, start);
        fail(&balancer, 0, 20, start);
        report(&balancer, 1, utilization(1.0), start);
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        assert_eq!(
            shares(&balancer, 20, at(1)),
            vec![0, 0, 20],
            "both left out at first"
        );
        let stats = balancer.endpoints(at(10));
        assert!(
            stats[0].error_rate > 0.6,
            "still unhealthy at 10 s: {stats:?}"
        );
        let stats = balancer.endpoints(at(30));
        assert_eq!(stats[0].error_rate, 0.0, "{stats:?}");
        assert_eq!(stats[1].utilization, Some(0.0), "{stats:?}");
        let held: Vec<Pick> = (0..300).map(|_| balancer.pick(None, at(30))).collect();
        let count = |index: usize| held.iter().filter(|p| p.index() == index).count();
        assert_eq!(count(0), 1, "back, on probation: one request at a time");
        assert!(count(1) > 50, "no longer saturated");
    }

    #[test]
    fn a_retry_avoids_the_endpoint_it_failed_on() {
        let now = Instant::now();
        for round in 0..50 {
            let balancer = Balancer::new(&urls(2), Policy::default(), now, round);
            let key = format!("message-{round}");
            let first = balancer.pick(Some(&key), now);
            let failed = first.index();
            let settled = first.finish(Report::new(Answer::Failure), Some(&key), now);
            assert!(settled.elsewhere, "the other endpoint can take the retry");
            let again = balancer.pick(Some(&key), now);
            assert_ne!(again.index(), failed, "round {round}");
            // A pause elsewhere puts that endpoint aside in turn.
            let paused = again.index();
            again.finish(Report::new(Answer::Throttled), Some(&key), now);
            let third = balancer.pick(Some(&key), now);
            assert_ne!(third.index(), paused, "round {round}");
            third.finish(Report::new(Answer::Success), Some(&key), now);
            assert_eq!(balancer.lock().failed.get(&key), None, "a success forgets");
        }
    }

    #[test]
    fn failure_memory_is_bounded() {
        let mut memory = FailureMemory::default();
        memory.remember("first", 1);
        for i in 0..REMEMBERED_FAILURES {
            memory.remember(&format!("k{i}"), 0);
        }
        assert_eq!(memory.get("first"), None);
        assert!(memory.endpoint.len() <= REMEMBERED_FAILURES);
        memory.remember("k5", 1);
        for i in 0..10 {
            memory.remember(&format!("again{i}"), 0);
        }
        assert_eq!(
            memory.get("k5"),
            Some(1),
            "set again, not evicted by its older entry"
        );
    }

    #[test]
    fn retry_after_sets_an_endpoint_aside_for_the_pause() {
        let now = Instant::now();
        let balancer = balancer(2, now);
        let paused = Report {
            pause: Some(Duration::from_secs(5)),
            ..Report::new(Answer::Throttled)
        };
        report(&balancer, 0, paused, now);
        assert_eq!(shares(&balancer, 50, now)[0], 0);
        let after = now + Duration::from_secs(6);
        assert!(shares(&balancer, 200, after)[0] > 50);
        let long = Report {
            pause: Some(Duration::MAX),
            ..Report::new(Answer::Failure)
        };
        report(&balancer, 1, long, now);
    }

    #[test]
    fn round_robin_takes_turns_whatever_the_state() {
        let now = Instant::now();
        let policy = Policy {
            strategy: Strategy::RoundRobin,
            ..Policy::default()
        };
        let balancer = Balancer::new(&urls(3), policy, now, 1);
        fail(&balancer, 1, 10, now);
        let order: Vec<usize> = (0..6)
            .map(|_| {
                let pick = balancer.pick(Some("k"), now);
                let index = pick.index();
                let settled = pick.finish(Report::new(Answer::Failure), Some("k"), now);
                assert!(
                    !settled.elsewhere,
                    "round robin never claims a failure is local"
                );
                index
            })
            .collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_reload_without_shared_endpoints_starts_afresh() {
        let now = Instant::now();
        let previous = balancer(2, now);
        let other = vec![Url::parse("http://elsewhere.example/in").unwrap()];
        let balancer = Balancer::succeed(&previous, &other, Policy::default(), now, 1);
        let stats = balancer.endpoints(now);
        assert!(!stats[0].probation && stats[0].weight == 1.0, "{stats:?}");
    }

    #[test]
    fn urls_are_shown_without_credentials_or_query() {
        let url = Url::parse("https://user:pw@hooks.example/in?token=abc#x").unwrap();
        assert_eq!(mask(&url), "https://***:***@hooks.example/in?***");
        let plain = Url::parse("http://127.0.0.1:9000/in").unwrap();
        assert_eq!(mask(&plain), "http://127.0.0.1:9000/in");
    }
}
