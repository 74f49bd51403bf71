//! One destination's live state: its in-flight slots and adaptive limit, its gate (the
//! rate-limit key it shares), what it learns from each response, and its counters.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{self, DestinationConfig};
use crate::delivery::runs::Claimed;
use crate::delivery::sender::{HttpClient, Sender};
use crate::delivery::traffic::{Concurrency, KeyGate};
use crate::destination::{Destination, EndpointStats, Outcome};
use crate::{rates, store};

/// A lane's claimed events not yet sent: live ones apart from a replay's, and sent first.
#[derive(Default)]
pub(super) struct Pending {
    live: VecDeque<Claimed>,
    replay: VecDeque<Claimed>,
}

impl Pending {
    pub(super) fn push(&mut self, claimed: Claimed, replay: bool) {
        if replay {
            self.replay.push_back(claimed);
        } else {
            self.live.push_back(claimed);
        }
    }

    /// Events a request could take now: the live ones, and the replay's with `replay_room`.
    pub(super) fn startable(&self, replay_room: bool) -> usize {
        self.live.len() + if replay_room { self.replay.len() } else { 0 }
    }

    /// Up to `batch` events for one request, live ones first, and whether they are a
    /// replay's. A request never mixes the two.
    pub(super) fn next_request(&mut self, batch: usize, replay_room: bool) -> (Vec<Claimed>, bool) {
        let (queue, replay) = if !self.live.is_empty() {
            (&mut self.live, false)
        } else if replay_room {
            (&mut self.replay, true)
        } else {
            return (Vec::new(), false);
        };
        let take = batch.min(queue.len());
        (queue.drain(..take).collect(), replay)
    }

    pub(super) fn append(&mut self, mut other: Pending) {
        self.live.append(&mut other.live);
        self.replay.append(&mut other.replay);
    }

    /// Every event, to be given back.
    pub(super) fn take_all(&mut self) -> Vec<Claimed> {
        let mut all: Vec<Claimed> = std::mem::take(&mut self.live).into();
        all.extend(std::mem::take(&mut self.replay));
        all
    }
}

/// One destination's live state.
pub struct Lane {
    pub id: i32,
    pub config: DestinationConfig,
    /// Built from `config` by the pipeline.
    pub plugin: Arc<dyn Destination>,
    /// Its rate-limit key (shared with the destinations that name the same key).
    pub gate: Arc<KeyGate>,
    pub(super) concurrency: Concurrency,
    pub(super) in_flight: AtomicUsize,
    pub(super) sender: Sender,
    /// Claimed events not yet sent (a run may hold more events than there are free slots);
    /// a reload hands them to the lane that replaces this one.
    pub(super) pending: Mutex<Pending>,
    /// Requests in flight with a replay's events.
    pub(super) replay_in_flight: AtomicUsize,
    /// Claims of replay runs out for it (see `Scheduler::claim_replays`), and the slots they
    /// hold for the requests they may start.
    pub(super) replay_claims: AtomicUsize,
    pub(super) reserved: AtomicUsize,
    /// Passed over while its replay claim was out.
    pub(super) replay_missed: AtomicBool,
    /// Its last replay claim found runs: it waits for the replay pace.
    pub(super) replaying: AtomicBool,
    /// Events per run in its last claim (0 before the first): how many runs the next claim
    /// needs for the requests it can start.
    run_fill: AtomicUsize,
    /// Shared with the lane that replaces this one at a reload.
    pub stats: Arc<LaneStats>,
}

/// The lanes in force; a reload swaps the set.
pub type LaneSet = Arc<arc_swap::ArcSwap<Vec<Arc<Lane>>>>;

/// Counters the admin API shows, since this process started.
#[derive(Default)]
pub struct LaneStats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Per-second rates for the dashboard.
    pub rates: rates::DestinationRates,
    /// Paused (`POST /admin/v1/destinations/{name}/pause`): set by the handler that answers it
    /// ([`LaneStats::set_paused`]), and from Postgres whenever the scheduler looks at every
    /// destination (a pause or resume anywhere notifies every process so). Claims check
    /// Postgres themselves; this flag stops the events a lane claimed before the pause from
    /// starting after it.
    pub paused: std::sync::atomic::AtomicBool,
    /// Bumped by each [`LaneStats::set_paused`], so that a read of Postgres begun before it
    /// does not overwrite it.
    pub(super) pause_changes: AtomicU64,
}

impl LaneStats {
    /// Pauses or resumes this process's lane at once (the handler, after Postgres has it).
    pub fn set_paused(&self, paused: bool) {
        self.pause_changes.fetch_add(1, Ordering::AcqRel);
        self.paused.store(paused, Ordering::Release);
    }
}

/// A lane's state as this process sees it, since it started.
#[derive(Debug, Clone)]
pub struct LaneStatus {
    pub in_flight: usize,
    pub delivered: u64,
    /// The in-flight limit in force (adaptive, at most `max_in_flight`).
    pub concurrency_limit: usize,
    /// The share of its rate-limit key's rate in use (AIMD).
    pub rate_factor: f64,
    pub last_error: Option<String>,
    pub endpoints: Vec<EndpointStats>,
}

impl Lane {
    pub fn new(
        id: i32,
        config: DestinationConfig,
        plugin: Arc<dyn Destination>,
        gate: Arc<KeyGate>,
        http: HttpClient,
    ) -> Lane {
        let sender = Sender {
            http,
            timeout: config.timeout,
        };
        Lane {
            id,
            concurrency: Concurrency::new(config.max_in_flight),
            config,
            plugin,
            gate,
            in_flight: AtomicUsize::new(0),
            sender,
            pending: Mutex::default(),
            replay_in_flight: AtomicUsize::new(0),
            replay_claims: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            replay_missed: AtomicBool::new(false),
            replaying: AtomicBool::new(false),
            run_fill: AtomicUsize::new(0),
            stats: Arc::default(),
        }
    }

    /// Events per run for this destination: one request's worth for rate-limited and per-user
    /// destinations (a claim then spends exactly the tokens it was granted, and a user's events
    /// go one request at a time), otherwise enough to fill its in-flight slots once.
    pub fn run_size(config: &DestinationConfig) -> usize {
        let batch = config.batch_size.max(1);
        if config.rate_limit.is_some() || config.ordering == config::Ordering::PerUser {
            batch.min(store::MAX_RUN)
        } else {
            batch
                .saturating_mul(config.max_in_flight)
                .clamp(batch.min(store::MAX_RUN), store::MAX_RUN)
        }
    }

    /// Events per run in the last claim; before the first, runs count as full.
    pub(super) fn run_fill(&self) -> usize {
        match self.run_fill.load(Ordering::Relaxed) {
            0 => Self::run_size(&self.config),
            fill => fill,
        }
    }

    pub(super) fn note_run_fill(&self, fill: usize) {
        self.run_fill.store(fill.max(1), Ordering::Relaxed);
    }

    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().expect("pending lock")
    }

    /// Takes over the unsent events of the lane this one replaces.
    pub(super) fn adopt(&self, old: &Lane) {
        let moved = std::mem::take(&mut *old.pending());
        self.pending().append(moved);
    }

    /// How many more requests a replay may have out or set aside. A replay leaves a quarter
    /// of the in-flight limit (at least one slot, when there are two) to live events, so one
    /// that arrives while its requests are out is sent at once instead of after one of them.
    /// A rate-limited destination's replay may use every slot: its limit is what bounds it.
    pub(super) fn replay_room(&self) -> usize {
        let limit = self.concurrency_limit();
        let live = if self.gate.is_limited() || limit < 2 {
            0
        } else {
            self.quarter_of_slots()
        };
        (limit - live).saturating_sub(
            self.replay_in_flight.load(Ordering::Acquire) + self.reserved.load(Ordering::Acquire),
        )
    }

    /// Events that a request could take now: live ones, and a replay's while it has room.
    pub(super) fn startable(&self) -> usize {
        let replay_room = self.replay_room() > 0;
        self.pending().startable(replay_room)
    }

    /// Carries the counters of the lane this one replaces.
    pub fn with_stats(mut self, stats: Option<Arc<LaneStats>>) -> Lane {
        if let Some(stats) = stats {
            self.stats = stats;
        }
        self
    }

    pub(super) fn free_slots(&self) -> usize {
        self.concurrency.limit().saturating_sub(self.occupied())
    }

    /// What the admin API shows of this lane in this process.
    pub fn status(&self) -> LaneStatus {
        LaneStatus {
            in_flight: self.in_flight(),
            delivered: self.stats.delivered.load(Ordering::Relaxed),
            concurrency_limit: self.concurrency_limit(),
            rate_factor: self.gate.rate_factor(),
            last_error: self.stats.last_error.lock().ok().and_then(|e| e.clone()),
            endpoints: self.plugin.endpoints(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Slots taken: requests in flight and those set aside for replay claims still out.
    pub(super) fn occupied(&self) -> usize {
        self.in_flight() + self.reserved.load(Ordering::Acquire)
    }

    /// The in-flight limit in force (adaptive, at most `max_in_flight`).
    pub fn concurrency_limit(&self) -> usize {
        self.concurrency.limit()
    }

    /// A quarter of the in-flight limit, at least one: the free slots a live claim waits for
    /// while requests are in flight, and so what a replay leaves to live events.
    pub(super) fn quarter_of_slots(&self) -> usize {
        (self.concurrency_limit() / 4).max(1)
    }

    /// A claim's lease for `events` at the current concurrency: see [`lease`].
    pub(super) fn lease(&self, events: usize) -> Duration {
        let per_round = self.config.batch_size.max(1) * self.concurrency_limit().max(1);
        lease(self.config.timeout, per_round, events)
    }

    pub(super) fn note_error(&self, message: &str) {
        *self.stats.last_error.lock().expect("stats lock") = Some(message.to_owned());
    }

    /// What one request's outcomes say about the vendor: pauses and AIMD.
    pub(super) fn learn(&self, outcomes: &[Outcome]) {
        let now = Instant::now();
        let mut slow_down = false;
        let mut pause: Option<Duration> = None;
        let mut delivered = false;
        for outcome in outcomes {
            match outcome {
                Outcome::Delivered => delivered = true,
                Outcome::Retry {
                    throttled,
                    retry_after,
                    ..
                } => {
                    slow_down |= *throttled;
                    if let Some(after) = retry_after {
                        pause = Some(pause.map_or(*after, |p| p.max(*after)));
                    }
                }
                Outcome::Failed { .. } | Outcome::Filtered { .. } => {}
            }
        }
        if let Some(after) = pause {
            self.gate.pause(now + after);
        }
        if slow_down {
            self.concurrency.decrease(now);
            self.gate.slow_down(now);
        } else if delivered {
            self.concurrency.increase();
            self.gate.speed_up();
        }
    }
}

/// One gate per rate-limit key, with the strictest limit among the destinations that share it.
pub fn gates(destinations: &[DestinationConfig]) -> HashMap<String, Arc<KeyGate>> {
    let mut limits: HashMap<&str, Option<config::RateLimit>> = HashMap::new();
    for destination in destinations {
        let entry = limits
            .entry(destination.rate_limit_key.as_str())
            .or_insert(destination.rate_limit);
        if let Some(limit) = destination.rate_limit {
            let per_second = |l: config::RateLimit| l.requests as f64 / l.per.as_secs_f64();
            if entry.is_none_or(|current| per_second(limit) < per_second(current)) {
                *entry = Some(limit);
            }
        }
    }
    limits
        .into_iter()
        .map(|(key, limit)| (key.to_owned(), Arc::new(KeyGate::new(key, limit))))
        .collect()
}

/// A claim's lease: the rounds of requests its `events` need, `per_round` at a time, each up
/// to the request's `timeout`, plus room for the outcome to be written. At most
/// [`config::MAX_DURATION`], so that `now()` plus it stays a time Postgres can hold.
fn lease(timeout: Duration, per_round: usize, events: usize) -> Duration {
    let rounds = u32::try_from(events.div_ceil(per_round.max(1)).max(1)).unwrap_or(u32::MAX);
    (timeout + Duration::from_secs(1))
        .checked_mul(rounds)
        .and_then(|lease| lease.checked_add(Duration::from_secs(30)))
        .map_or(config::MAX_DURATION, |lease| {
            lease.min(config::MAX_DURATION)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_covers_each_round_of_requests_and_stays_within_postgres_times() {
        let ten = Duration::from_secs(10);
        assert_eq!(lease(ten, 32, 0), Duration::from_secs(11 + 30));
        assert_eq!(lease(ten, 32, 32), Duration::from_secs(11 + 30));
        assert_eq!(lease(ten, 32, 33), Duration::from_secs(22 + 30));
        // The longest timeout the config takes, one event a round: a hundred thousand rounds
        // of a hundred years each would be past the year 294,276, Postgres's last.
        assert_eq!(
            lease(config::MAX_DURATION, 1, 100_000),
            config::MAX_DURATION
        );
        assert_eq!(
            lease(config::MAX_DURATION, 0, usize::MAX),
            config::MAX_DURATION
        );
    }
}
