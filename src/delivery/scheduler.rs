//! The one shared worker pool: claims due deliveries fairly across destinations, runs the
//! plugins, and records every outcome.
//!
//! One scheduling loop visits destinations with due work in round robin. For each it claims
//! only as many jobs as it can start right away: the destination's free in-flight slots (its
//! adaptive limit, at most `max_in_flight`), bounded by the pool's free permits and by the
//! tokens its rate-limit key grants. So claimed work never waits in memory, and a slow or
//! rate-limited destination's backlog stays in Postgres where it delays no one: a key out of
//! tokens is set aside until the instant its bucket refills, holding no worker. Each request
//! runs in its own task under a timeout, with panics caught. Outcomes flow to a completer that
//! writes them in batches, and back to the key and the destination (Retry-After pauses, AIMD).
//! Idle, the loop sleeps until `NOTIFY` says work arrived, a slot frees up, a timer fires, or
//! the periodic check finds retries that came due.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rand::Rng;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, DestinationConfig, RetryPolicy};
use crate::delivery::sender::{HttpClient, Sender};
use crate::delivery::traffic::{Closed, Concurrency, KeyGate};
use crate::destination::{DeliveryContext, Event, Outcome, Verdict};
use crate::store::{self, ClaimedRun, Fate, JobsNotice, RunOutcome, Store};
use crate::{rates, trail};

/// Rows claimed in one statement at most.
const MAX_CLAIM: usize = 1000;
/// How often due work is looked for without a notification (retries coming due).
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How often dead processes are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Outcomes written in one transaction at most, and the longest one waits for company.
const MAX_FINISH_BATCH: usize = 1000;
const FINISH_LINGER: Duration = Duration::from_millis(5);
/// How often rate-limit key leases are renewed, and how long one lasts unrenewed.
const LEASE_EVERY: Duration = Duration::from_secs(3);
const LEASE_TTL: Duration = Duration::from_secs(15);

/// One destination's live state.
pub struct Lane {
    pub id: i32,
    pub config: DestinationConfig,
    /// Its rate-limit key (shared with the destinations that name the same key).
    pub gate: Arc<KeyGate>,
    concurrency: Concurrency,
    in_flight: AtomicUsize,
    sender: Sender,
    /// Claimed events not yet sent (a run may hold more events than there are free slots);
    /// a reload hands them to the lane that replaces this one.
    pending: Mutex<VecDeque<Claimed>>,
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
    pause_changes: AtomicU64,
}

impl LaneStats {
    /// Pauses or resumes this process's lane at once (the handler, after Postgres has it).
    pub fn set_paused(&self, paused: bool) {
        self.pause_changes.fetch_add(1, Ordering::AcqRel);
        self.paused.store(paused, Ordering::Release);
    }
}

impl Lane {
    pub fn new(id: i32, config: DestinationConfig, gate: Arc<KeyGate>, http: HttpClient) -> Lane {
        let sender = Sender {
            http,
            timeout: config.timeout,
        };
        Lane {
            id,
            concurrency: Concurrency::new(config.max_in_flight),
            config,
            gate,
            in_flight: AtomicUsize::new(0),
            sender,
            pending: Mutex::default(),
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

    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<Claimed>> {
        self.pending.lock().expect("pending lock")
    }

    /// Takes over the unsent events of the lane this one replaces.
    fn adopt(&self, old: &Lane) {
        let moved = std::mem::take(&mut *old.pending());
        self.pending().extend(moved);
    }

    /// Carries the counters of the lane this one replaces.
    pub fn with_stats(mut self, stats: Option<Arc<LaneStats>>) -> Lane {
        if let Some(stats) = stats {
            self.stats = stats;
        }
        self
    }

    fn free_slots(&self) -> usize {
        self.concurrency
            .limit()
            .saturating_sub(self.in_flight.load(Ordering::Acquire))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The in-flight limit in force (adaptive, at most `max_in_flight`).
    pub fn concurrency_limit(&self) -> usize {
        self.concurrency.limit()
    }

    /// A claim's lease: the rounds of requests its events need at the current concurrency,
    /// each up to the request's timeout, plus room for the outcome to be written.
    fn lease(&self, events: usize) -> Duration {
        let per_round = self.config.batch_size.max(1) * self.concurrency_limit().max(1);
        let rounds = events.div_ceil(per_round).max(1) as u32;
        (self.config.timeout + Duration::from_secs(1)) * rounds + Duration::from_secs(30)
    }

    fn note_error(&self, message: &str) {
        *self.stats.last_error.lock().expect("stats lock") = Some(message.to_owned());
    }

    /// What one request's outcomes say about the vendor: pauses and AIMD.
    fn learn(&self, outcomes: &[Outcome]) {
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

/// What wakes the scheduling loop.
#[derive(Debug)]
pub enum Wake {
    /// Work arrived for these destinations.
    Destinations(Vec<i32>),
    /// Look at every destination.
    All,
}

/// The running pool's handle.
pub struct Pool {
    pub wake: mpsc::UnboundedSender<Wake>,
    tasks: tokio::task::JoinSet<()>,
    deliveries: TaskTracker,
    stop: CancellationToken,
    /// Tells the completer that no more outcomes are coming.
    drained: CancellationToken,
    open: Arc<OpenRuns>,
    finished: mpsc::UnboundedSender<Settled>,
}

impl Pool {
    /// Starts the scheduling loop, the completer, the `LISTEN` task and the sweeper.
    pub fn start(store: Store, lanes: LaneSet, max_concurrent: usize, instance: i32) -> Pool {
        let (wake, woken) = mpsc::unbounded_channel();
        let (finished, outcomes) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let deliveries = TaskTracker::new();
        let mut tasks = tokio::task::JoinSet::new();
        let open = Arc::new(OpenRuns::default());
        let scheduler = Scheduler {
            store: store.clone(),
            open: open.clone(),
            lane_set: lanes.clone(),
            seen: Arc::new(Vec::new()),
            lanes: HashMap::new(),
            order: Vec::new(),
            permits: Arc::new(Semaphore::new(max_concurrent)),
            pool_size: max_concurrent.max(1),
            instance,
            woken,
            wake: wake.clone(),
            finished: finished.clone(),
            deliveries: deliveries.clone(),
            stop: stop.clone(),
        };
        tasks.spawn(scheduler.run());
        let drained = CancellationToken::new();
        tasks.spawn(complete(
            store.clone(),
            instance,
            outcomes,
            wake.clone(),
            drained.clone(),
        ));
        tasks.spawn(listen(store.clone(), wake.clone(), stop.clone()));
        tasks.spawn(lease_keys(
            store.clone(),
            lanes.clone(),
            instance,
            wake.clone(),
            stop.clone(),
        ));
        tasks.spawn(sweep(store, instance, wake.clone(), stop.clone()));
        Pool {
            wake,
            tasks,
            deliveries,
            stop,
            drained,
            open,
            finished,
        }
    }

    /// Stops claiming, lets in-flight deliveries finish within `grace`, and writes every
    /// outcome. Claimed runs are settled: what was delivered or failed is written, and the
    /// events not sent yet (or still running after `grace`) are released to be claimed again,
    /// so nothing delivered before shutdown is delivered again after it.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop.cancel();
        self.deliveries.close();
        if tokio::time::timeout(grace, self.deliveries.wait())
            .await
            .is_err()
        {
            tracing::warn!("deliveries still running after the grace period; releasing them");
        }
        for run in self.open.take_all() {
            if let Some(outcome) = run.close() {
                let _ = self.finished.send(Settled::new(&run, outcome));
            }
        }
        self.drained.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct Scheduler {
    store: Store,
    open: Arc<OpenRuns>,
    lane_set: LaneSet,
    /// The lane set `lanes` and `order` were built from.
    seen: Arc<Vec<Arc<Lane>>>,
    lanes: HashMap<i32, Arc<Lane>>,
    /// Round-robin order of every destination.
    order: Vec<i32>,
    permits: Arc<Semaphore>,
    pool_size: usize,
    instance: i32,
    woken: mpsc::UnboundedReceiver<Wake>,
    wake: mpsc::UnboundedSender<Wake>,
    finished: mpsc::UnboundedSender<Settled>,
    deliveries: TaskTracker,
    stop: CancellationToken,
}

impl Scheduler {
    async fn run(mut self) {
        let mut ready: VecDeque<i32> = VecDeque::new();
        let mut queued: HashSet<i32> = HashSet::new();
        let mut timers: BTreeMap<Instant, Vec<i32>> = BTreeMap::new();
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.stop.is_cancelled() {
            self.follow_reloads(&mut ready, &mut queued);
            fire_timers(&mut timers, &mut ready, &mut queued);
            // Wake-ups are read on every pass, not only when idle: a destination that just got
            // work joins the round now, even while others keep the loop busy.
            let mut wakes = Vec::new();
            while let Ok(wake) = self.woken.try_recv() {
                wakes.push(wake);
            }
            self.absorb_wakes(wakes, &mut ready, &mut queued).await;
            let mut progressed = false;
            for _ in 0..ready.len() {
                let Some(id) = ready.pop_front() else { break };
                let Some(lane) = self.lanes.get(&id).cloned() else {
                    queued.remove(&id);
                    continue;
                };
                // Others with work waiting or in flight: each gets a fair share of the pool.
                let others = ready.len()
                    + self
                        .lanes
                        .values()
                        .filter(|other| other.id != id && other.in_flight() > 0)
                        .count();
                match self.visit(&lane, others).await {
                    Visit::Dispatched { more } => {
                        progressed = true;
                        if more {
                            ready.push_back(id);
                        } else {
                            queued.remove(&id);
                        }
                    }
                    // Busy: it stays ready and is looked at again when a slot frees up.
                    Visit::Busy => ready.push_back(id),
                    // Out of tokens or paused: set aside until then, holding nothing.
                    Visit::WaitUntil(until) => {
                        queued.remove(&id);
                        timers.entry(until).or_default().push(id);
                    }
                    // Empty, or its key is leased elsewhere: woken by new work or the lease.
                    Visit::Idle => {
                        queued.remove(&id);
                    }
                    Visit::Failed => {
                        ready.push_back(id);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            if progressed {
                continue;
            }
            let next_timer = timers.keys().next().copied();
            let timer = async {
                match next_timer {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let wake = tokio::select! {
                _ = self.stop.cancelled() => break,
                wake = self.woken.recv() => wake,
                _ = poll.tick() => Some(Wake::All),
                _ = timer => continue,
            };
            let mut wakes: Vec<Wake> = wake.into_iter().collect();
            while let Ok(more) = self.woken.try_recv() {
                wakes.push(more);
            }
            self.absorb_wakes(wakes, &mut ready, &mut queued).await;
        }
    }

    /// Adds woken destinations to the ready queue (all with due work, for `Wake::All`).
    async fn absorb_wakes(
        &self,
        wakes: Vec<Wake>,
        ready: &mut VecDeque<i32>,
        queued: &mut HashSet<i32>,
    ) {
        let mut everyone = false;
        for wake in wakes {
            match wake {
                Wake::Destinations(ids) => {
                    for id in ids {
                        if self.lanes.contains_key(&id) && queued.insert(id) {
                            ready.push_back(id);
                        }
                    }
                }
                Wake::All => everyone = true,
            }
        }
        if everyone {
            let changes: Vec<u64> = self
                .lanes
                .values()
                .map(|lane| lane.stats.pause_changes.load(Ordering::Acquire))
                .collect();
            match self.store.paused().await {
                Ok(paused) => {
                    for (lane, before) in self.lanes.values().zip(changes) {
                        // A pause or resume answered here meanwhile is newer than this read.
                        if lane.stats.pause_changes.load(Ordering::Acquire) == before {
                            let flag = paused.contains(&lane.id);
                            lane.stats.paused.store(flag, Ordering::Release);
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "reading paused destinations failed"),
            }
            match self.store.due_destinations(&self.order).await {
                Ok(due) => {
                    for id in due {
                        if queued.insert(id) {
                            ready.push_back(id);
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "looking for due work failed"),
            }
            // Lanes holding claimed events need no query to be due.
            for (id, lane) in &self.lanes {
                if !lane.pending().is_empty() && queued.insert(*id) {
                    ready.push_back(*id);
                }
            }
        }
    }

    /// Picks up a new lane set after a reload; new and changed destinations are looked at.
    fn follow_reloads(&mut self, ready: &mut VecDeque<i32>, queued: &mut HashSet<i32>) {
        let current = self.lane_set.load_full();
        if Arc::ptr_eq(&current, &self.seen) {
            return;
        }
        let next: HashMap<i32, Arc<Lane>> =
            current.iter().map(|lane| (lane.id, lane.clone())).collect();
        for (id, old) in &self.lanes {
            match next.get(id) {
                Some(new) if !Arc::ptr_eq(new, old) => new.adopt(old),
                Some(_) => {}
                // Removed or disabled: its unsent events go back to the queue.
                None => self.release_pending(old),
            }
        }
        self.lanes = next;
        self.order = current.iter().map(|lane| lane.id).collect();
        for &id in &self.order {
            if queued.insert(id) {
                ready.push_back(id);
            }
        }
        self.seen = current;
    }

    /// Gives a lane's claimed but unsent events back to the queue, to be claimed again.
    fn release_pending(&self, lane: &Lane) {
        let unsent = std::mem::take(&mut *lane.pending());
        for claimed in unsent {
            if let Some(outcome) = claimed.run.record(claimed.position, Fate::Release, None) {
                self.open.remove(claimed.run.id);
                let _ = self.finished.send(Settled::new(&claimed.run, outcome));
            }
        }
    }

    /// Claims and starts what one destination can take now.
    /// `others` is how many other destinations have work waiting or in flight: while there
    /// are any, this one holds at most its fair share of the pool, so a slow destination that
    /// could take every permit leaves room for the rest.
    async fn visit(&self, lane: &Arc<Lane>, others: usize) -> Visit {
        // Paused: nothing more starts, not even what was claimed before the pause; requests
        // in flight finish. Its claims return to the queue for after the resume.
        if lane.stats.paused.load(Ordering::Acquire) {
            self.release_pending(lane);
            return Visit::Idle;
        }
        // Alone with work, a destination still leaves a quarter of the pool free when there are
        // others, so one that gets an event finds a permit at once instead of waiting for a
        // slow destination's request to end.
        let share = if others > 0 {
            self.pool_size / (others + 1)
        } else if self.lanes.len() > 1 {
            self.pool_size - self.pool_size / 4
        } else {
            self.pool_size
        }
        .max(1);
        let slots = lane
            .free_slots()
            .min(self.permits.available_permits())
            .min(share.saturating_sub(lane.in_flight()));
        let waiting = lane.pending().len();
        // While requests are in flight, wait until a quarter of the slots are free: one claim
        // then starts several requests, instead of one query per finished request.
        let worth_a_claim = (lane.concurrency_limit() / 4).max(1);
        if slots == 0 || (waiting == 0 && slots < worth_a_claim && lane.in_flight() > 0) {
            return Visit::Busy;
        }
        let batch = lane.config.batch_size.max(1);
        let requests = match lane
            .gate
            .take(slots.min(MAX_CLAIM / batch).max(1), Instant::now())
        {
            Ok(granted) => granted,
            Err(Closed::NotOwned) => return Visit::Idle,
            Err(Closed::Until(until)) => {
                metrics::counter!("switchyard_rate_limited_total", "destination" => lane.config.name.clone())
                    .increment(1);
                return Visit::WaitUntil(until);
            }
        };
        let mut claimed_all = false;
        if waiting == 0 {
            let run_size = Lane::run_size(&lane.config);
            let limit = (requests * batch).div_ceil(run_size).max(1);
            let ordered = lane.config.ordering == config::Ordering::PerUser;
            let lease = lane.lease(limit * run_size);
            let claim = |lane_kind: store::Lane, limit: usize| {
                self.store
                    .claim(lane.id, limit, lease, self.instance, ordered, lane_kind)
            };
            let mut runs = match claim(store::Lane::Live, limit).await {
                Ok(runs) => runs,
                Err(error) => {
                    tracing::warn!(%error, destination = %lane.config.name, "claiming work failed");
                    return Visit::Failed;
                }
            };
            // Replays yield to live traffic: their runs are claimed only when no live run is
            // due, and for at most half of what could start, so live events arriving meanwhile
            // find room at once.
            let mut limit = limit;
            if runs.is_empty() {
                limit = limit.div_ceil(2);
                runs = match claim(store::Lane::Replay, limit).await {
                    Ok(runs) => runs,
                    Err(error) => {
                        tracing::warn!(%error, destination = %lane.config.name, "claiming replay work failed");
                        return Visit::Failed;
                    }
                };
            }
            if runs.is_empty() {
                return Visit::Idle;
            }
            claimed_all = runs.len() == limit;
            let mut pending = lane.pending();
            for run in runs {
                let (progress, events) = RunProgress::start(run, lane.id, ordered);
                self.open.insert(progress.clone());
                for (position, event) in events.into_iter().enumerate() {
                    pending.push_back(Claimed {
                        run: progress.clone(),
                        position,
                        event,
                    });
                }
            }
        }
        for _ in 0..requests {
            let claimed: Vec<Claimed> = {
                let mut pending = lane.pending();
                let take = batch.min(pending.len());
                pending.drain(..take).collect()
            };
            if claimed.is_empty() {
                break;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                // Only this loop takes permits, so the count above holds; never drop claims.
                unreachable!("permits were counted before claiming");
            };
            lane.in_flight.fetch_add(1, Ordering::AcqRel);
            let lane = lane.clone();
            let finished = self.finished.clone();
            let wake = self.wake.clone();
            let open = self.open.clone();
            self.deliveries.spawn(async move {
                let settled = deliver(&lane, &open, claimed).await;
                lane.in_flight.fetch_sub(1, Ordering::AcqRel);
                drop(permit);
                for settled in settled {
                    let _ = finished.send(settled);
                }
                let _ = wake.send(Wake::Destinations(vec![lane.id]));
            });
        }
        let more = claimed_all || !lane.pending().is_empty();
        Visit::Dispatched { more }
    }
}

enum Visit {
    Dispatched { more: bool },
    Busy,
    WaitUntil(Instant),
    Idle,
    Failed,
}

/// Moves destinations whose timers have come to the ready queue.
fn fire_timers(
    timers: &mut BTreeMap<Instant, Vec<i32>>,
    ready: &mut VecDeque<i32>,
    queued: &mut HashSet<i32>,
) {
    let now = Instant::now();
    while let Some(entry) = timers.first_entry() {
        if *entry.key() > now {
            break;
        }
        for id in entry.remove() {
            if queued.insert(id) {
                ready.push_back(id);
            }
        }
    }
}

/// One claimed event, waiting in its lane or in flight.
struct Claimed {
    run: Arc<RunProgress>,
    position: usize,
    event: Event,
}

/// A claimed run's progress: each event's fate as it comes in. The run is written once every
/// event has one (a run's events may go out in several requests).
struct RunProgress {
    id: i64,
    attempts: i32,
    enqueued_at: OffsetDateTime,
    lane: i32,
    ordered: bool,
    state: Mutex<RunState>,
}

struct RunState {
    event_ids: Vec<i64>,
    fates: Vec<Option<Fate>>,
    unknown: usize,
    /// The longest retry delay asked for, and the last failure, for the events left over.
    delay: Duration,
    status: Option<i32>,
    error: Option<String>,
    settled: bool,
}

impl RunProgress {
    fn start(run: ClaimedRun, lane: i32, ordered: bool) -> (Arc<RunProgress>, Vec<Event>) {
        let count = run.events.len();
        let mut event_ids = Vec::with_capacity(count);
        let mut events = Vec::with_capacity(count);
        for event in run.events {
            event_ids.push(event.id);
            events.push(Event {
                message_id: event.message_id,
                payload: raw_payload(&event.payload),
                source: event.source.map(Into::into),
            });
        }
        let progress = RunProgress {
            id: run.id,
            attempts: run.attempts,
            enqueued_at: run.enqueued_at,
            lane,
            ordered,
            state: Mutex::new(RunState {
                event_ids,
                fates: vec![None; count],
                unknown: count,
                delay: Duration::ZERO,
                status: None,
                error: None,
                settled: false,
            }),
        };
        (Arc::new(progress), events)
    }

    /// Records one event's fate (with the delay, status and error of a retry); returns the
    /// run's outcome once every event has one.
    fn record(
        &self,
        position: usize,
        fate: Fate,
        retry: Option<(Duration, Option<i32>, String)>,
    ) -> Option<RunOutcome> {
        let mut state = self.state.lock().expect("run lock");
        if state.settled || state.fates[position].is_some() {
            return None;
        }
        if let Some((delay, status, error)) = retry {
            state.delay = state.delay.max(delay);
            state.status = status;
            state.error = Some(error);
        }
        state.fates[position] = Some(fate);
        state.unknown -= 1;
        (state.unknown == 0).then(|| self.outcome(&mut state))
    }

    /// Settles the run now: events without a fate are released to be claimed again.
    fn close(&self) -> Option<RunOutcome> {
        let mut state = self.state.lock().expect("run lock");
        if state.settled {
            return None;
        }
        for fate in state.fates.iter_mut().filter(|fate| fate.is_none()) {
            *fate = Some(Fate::Release);
        }
        Some(self.outcome(&mut state))
    }

    fn outcome(&self, state: &mut RunState) -> RunOutcome {
        state.settled = true;
        let events = state
            .event_ids
            .iter()
            .zip(state.fates.iter_mut())
            .map(|(id, fate)| (*id, fate.take().unwrap_or(Fate::Release)))
            .collect();
        RunOutcome {
            id: self.id,
            attempts: self.attempts,
            delay: state.delay,
            status: state.status,
            error: state.error.take(),
            events,
        }
    }
}

/// Claimed runs not yet settled, so that shutdown can write what they did.
#[derive(Default)]
struct OpenRuns(Mutex<HashMap<i64, Arc<RunProgress>>>);

impl OpenRuns {
    fn insert(&self, run: Arc<RunProgress>) {
        self.0.lock().expect("open runs lock").insert(run.id, run);
    }

    fn remove(&self, id: i64) {
        self.0.lock().expect("open runs lock").remove(&id);
    }

    fn take_all(&self) -> Vec<Arc<RunProgress>> {
        let mut open = self.0.lock().expect("open runs lock");
        open.drain().map(|(_, run)| run).collect()
    }
}

/// A run's outcome on its way to the completer.
struct Settled {
    outcome: RunOutcome,
    /// The destination to wake once it is written (its ordered queue's head moves).
    wake: Option<i32>,
}

impl Settled {
    fn new(run: &RunProgress, outcome: RunOutcome) -> Settled {
        Settled {
            outcome,
            wake: run.ordered.then_some(run.lane),
        }
    }
}

/// Runs one request: the plugin under a timeout with panics caught, then each event's fate.
/// Returns the runs this request completed.
#[tracing::instrument(
    name = "delivery",
    skip_all,
    fields(
        destination = %lane.config.name,
        key = %lane.gate.digest,
        events = claimed.len(),
        attempt = claimed.iter().map(|c| c.run.attempts).max().unwrap_or(0),
    )
)]
async fn deliver(lane: &Lane, open: &OpenRuns, claimed: Vec<Claimed>) -> Vec<Settled> {
    let started = Instant::now();
    let events: Vec<Event> = claimed.iter().map(|c| c.event.clone()).collect();
    let context = DeliveryContext { http: &lane.sender };
    let plugin = lane.config.plugin.clone();
    // The sender enforces the request timeout; this one catches a plugin that hangs elsewhere.
    let limit = lane.config.timeout + Duration::from_secs(5);
    let run = AssertUnwindSafe(plugin.deliver(&context, &events)).catch_unwind();
    let verdict = match tokio::time::timeout(limit, run).await {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(panic)) => Verdict::All(Outcome::retry(format!(
            "the {} plugin panicked: {}",
            lane.config.kind,
            panic_message(&panic)
        ))),
        Err(_) => Verdict::All(Outcome::retry(format!(
            "the {} plugin did not finish within {}",
            lane.config.kind,
            humantime::format_duration(limit)
        ))),
    };
    let outcomes = match verdict {
        Verdict::All(outcome) => vec![outcome; claimed.len()],
        Verdict::PerEvent(outcomes) if outcomes.len() == claimed.len() => outcomes,
        Verdict::PerEvent(outcomes) => vec![
            Outcome::retry(format!(
                "the {} plugin returned {} outcomes for {} events",
                lane.config.kind,
                outcomes.len(),
                claimed.len()
            ));
            claimed.len()
        ],
    };
    lane.learn(&outcomes);
    let name = lane.config.name.clone();
    let now = OffsetDateTime::now_utc();
    let mut settled = Vec::new();
    let mut counts = rates::Deliveries::default();
    let mut attempts: Vec<trail::AttemptResult> = Vec::with_capacity(claimed.len());
    for (claimed, outcome) in claimed.iter().zip(outcomes) {
        let run = &claimed.run;
        let mut attempt = trail::AttemptResult {
            message_id: &claimed.event.message_id,
            state: trail::State::Delivered,
            status: None,
            error: None,
        };
        let (fate, retry) = match outcome {
            Outcome::Delivered => {
                let latency = (now - run.enqueued_at).unsigned_abs();
                counts.delivered += 1;
                counts.latencies.push(latency);
                metrics::histogram!("switchyard_delivery_latency_seconds", "destination" => name.clone())
                    .record(latency.as_secs_f64());
                metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "delivered")
                    .increment(1);
                lane.stats.delivered.fetch_add(1, Ordering::Relaxed);
                (Fate::Delivered, None)
            }
            Outcome::Retry {
                status,
                retry_after,
                message,
                ..
            } => {
                lane.note_error(&message);
                let age = (now - run.enqueued_at).unsigned_abs();
                attempt.status = status;
                let status = status.map(i32::from);
                match retry_delay(&lane.config.retry, run.attempts, age, retry_after) {
                    Some(delay) => {
                        counts.retried += 1;
                        attempt.state = trail::State::Retrying;
                        lane.stats.retried.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "retried")
                            .increment(1);
                        (Fate::Retry, Some((delay, status, message)))
                    }
                    None => {
                        counts.dead += 1;
                        attempt.state = trail::State::Dead;
                        lane.stats.dead.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "dead")
                            .increment(1);
                        let error = format!("gave up after {} attempts: {message}", run.attempts);
                        (Fate::Dead { status, error }, None)
                    }
                }
            }
            Outcome::Filtered { reason } => {
                attempt.state = trail::State::Filtered(reason.as_str());
                crate::filter::count(&name, reason);
                (Fate::Delivered, None)
            }
            Outcome::Failed { status, message } => {
                lane.note_error(&message);
                counts.dead += 1;
                attempt.state = trail::State::Dead;
                attempt.status = status;
                lane.stats.dead.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "dead")
                    .increment(1);
                let status = status.map(i32::from);
                (
                    Fate::Dead {
                        status,
                        error: message,
                    },
                    None,
                )
            }
        };
        attempt.error = match (&fate, &retry) {
            (Fate::Dead { error, .. }, _) => Some(error.clone()),
            (_, Some((_, _, message))) => Some(message.clone()),
            _ => None,
        };
        attempts.push(attempt);
        if let Some(outcome) = run.record(claimed.position, fate, retry) {
            open.remove(run.id);
            settled.push(Settled::new(run, outcome));
        }
    }
    trail::TRAIL.attempted(lane.id, now, attempts);
    lane.stats.rates.delivered(&counts);
    tracing::debug!(
        destination = %name,
        events = claimed.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "delivery finished"
    );
    settled
}

fn raw_payload(payload: &[u8]) -> Box<RawValue> {
    // Payloads were serialized by ingest; a corrupt one becomes `null` and fails in the plugin.
    std::str::from_utf8(payload)
        .ok()
        .and_then(|text| RawValue::from_string(text.to_owned()).ok())
        .unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"))
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-text panic".into()
    }
}

/// When to try again, or `None` when the retry budget is spent. Exponential backoff from
/// `initial_backoff`, capped at `max_backoff`, with jitter (a random 50–100% of the step);
/// a vendor's `Retry-After` is honored when it asks for longer.
pub fn retry_delay(
    policy: &RetryPolicy,
    attempts: i32,
    age: Duration,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    if attempts >= policy.max_attempts as i32 {
        return None;
    }
    let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let step = policy
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(policy.max_backoff);
    let jittered = step.mul_f64(rand::rng().random_range(0.5..=1.0));
    let delay = match retry_after {
        Some(after) if after > jittered => after,
        _ => jittered,
    };
    if age + delay > policy.max_age {
        return None;
    }
    Some(delay)
}

/// Writes run outcomes in batches; a failed write is retried, never dropped (until then the
/// claims stay leased, so nothing is claimed twice meanwhile).
async fn complete(
    store: Store,
    instance: i32,
    mut outcomes: mpsc::UnboundedReceiver<Settled>,
    wake: mpsc::UnboundedSender<Wake>,
    drained: CancellationToken,
) {
    let mut pending: Vec<RunOutcome> = Vec::new();
    let mut woken: Vec<i32> = Vec::new();
    loop {
        let first = tokio::select! {
            first = outcomes.recv() => first,
            _ = drained.cancelled() => None,
        };
        let Some(first) = first else {
            while let Ok(last) = outcomes.try_recv() {
                absorb(last, &mut pending, &mut woken);
            }
            break;
        };
        absorb(first, &mut pending, &mut woken);
        let linger = tokio::time::sleep(FINISH_LINGER);
        tokio::pin!(linger);
        while events_in(&pending) < MAX_FINISH_BATCH {
            tokio::select! {
                next = outcomes.recv() => match next {
                    Some(next) => absorb(next, &mut pending, &mut woken),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        flush(&store, instance, &mut pending).await;
        if !woken.is_empty() {
            let _ = wake.send(Wake::Destinations(std::mem::take(&mut woken)));
        }
    }
    flush(&store, instance, &mut pending).await;
}

fn absorb(settled: Settled, pending: &mut Vec<RunOutcome>, woken: &mut Vec<i32>) {
    if let Some(id) = settled.wake {
        if !woken.contains(&id) {
            woken.push(id);
        }
    }
    pending.push(settled.outcome);
}

fn events_in(outcomes: &[RunOutcome]) -> usize {
    outcomes.iter().map(|o| o.events.len()).sum()
}

async fn flush(store: &Store, instance: i32, pending: &mut Vec<RunOutcome>) {
    let mut backoff = Duration::from_millis(100);
    while !pending.is_empty() {
        match store.finish(instance, pending).await {
            Ok(held) => {
                let lost = pending.len() as u64 - held.min(pending.len() as u64);
                if lost > 0 {
                    tracing::warn!(runs = lost, "outcomes of claims that expired were dropped; those events are delivered again");
                }
                pending.clear();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, runs = pending.len(), "writing outcomes failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Forwards `NOTIFY`s to the scheduling loop. After a lost connection it asks for a full look,
/// since notifications may have been missed meanwhile.
async fn listen(store: Store, wake: mpsc::UnboundedSender<Wake>, stop: CancellationToken) {
    loop {
        let mut listener = match store.listen_jobs().await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "LISTEN connection failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let _ = wake.send(Wake::All);
        loop {
            let notice = tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.next() => n,
            };
            let message = match notice {
                Ok(JobsNotice::Destinations(ids)) => Wake::Destinations(ids),
                Ok(JobsNotice::All) => Wake::All,
                Err(error) => {
                    tracing::warn!(%error, "LISTEN connection lost; reconnecting");
                    break;
                }
            };
            if wake.send(message).is_err() {
                return;
            }
        }
    }
}

/// Holds the leases of rate-limit keys: renews the ones this process has, and takes free ones
/// up to its fair share (keys / processes), giving back any above it so a process that joins
/// gets its part. A key's destinations are woken when this process gains it.
async fn lease_keys(
    store: Store,
    lanes: LaneSet,
    instance: i32,
    wake: mpsc::UnboundedSender<Wake>,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(LEASE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                if let Err(error) = store.release_keys(instance).await {
                    tracing::debug!(%error, "releasing key leases failed; they expire");
                }
                return;
            }
            _ = every.tick() => {}
        }
        let mut gates: HashMap<String, (Arc<KeyGate>, Vec<i32>)> = HashMap::new();
        for lane in lanes.load().iter().filter(|lane| lane.gate.is_limited()) {
            gates
                .entry(lane.gate.digest.clone())
                .or_insert_with(|| (lane.gate.clone(), Vec::new()))
                .1
                .push(lane.id);
        }
        if gates.is_empty() {
            continue;
        }
        match rebalance(&store, &gates, instance).await {
            Ok(gained) => {
                if !gained.is_empty() && wake.send(Wake::Destinations(gained)).is_err() {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "renewing rate-limit key leases failed");
                // Without a renewed lease another process may take the key: stop using it.
                for (gate, _) in gates.values() {
                    gate.set_owned(false);
                }
            }
        }
    }
}

/// One lease round; returns the destinations whose key this process just gained.
async fn rebalance(
    store: &Store,
    gates: &HashMap<String, (Arc<KeyGate>, Vec<i32>)>,
    instance: i32,
) -> store::Result<Vec<i32>> {
    let processes = store.delivering_instances().await?.max(1) as usize;
    let share = gates.len().div_ceil(processes);
    let mine: Vec<String> = gates
        .iter()
        .filter(|(_, (gate, _))| gate.owned())
        .map(|(digest, _)| digest.clone())
        .take(share)
        .collect();
    let elsewhere: HashSet<String> = store
        .keys_held_elsewhere(instance)
        .await?
        .into_iter()
        .collect();
    let mut wanted = mine.clone();
    for digest in gates.keys() {
        if wanted.len() >= share {
            break;
        }
        if !mine.contains(digest) && !elsewhere.contains(digest) {
            wanted.push(digest.clone());
        }
    }
    let held: HashSet<String> = store
        .lease_keys(&wanted, instance, LEASE_TTL)
        .await?
        .into_iter()
        .collect();
    let surplus: Vec<String> = gates
        .iter()
        .filter(|(digest, (gate, _))| gate.owned() && !held.contains(*digest))
        .map(|(digest, _)| digest.clone())
        .collect();
    if !surplus.is_empty() {
        store.release_key_leases(&surplus, instance).await?;
    }
    let mut gained = Vec::new();
    for (digest, (gate, lanes)) in gates {
        let owned = held.contains(digest);
        if gate.set_owned(owned) && owned {
            gained.extend(lanes.iter().copied());
        }
    }
    Ok(gained)
}

/// Releases the claims of processes that died, so their work is retried at once instead of
/// when the leases run out.
async fn sweep(
    store: Store,
    instance: i32,
    wake: mpsc::UnboundedSender<Wake>,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match store.release_dead_instances(instance).await {
            Ok(0) => {}
            Ok(released) => {
                tracing::info!(released, "released the claims of a process that died");
                let _ = wake.send(Wake::All);
            }
            Err(error) => tracing::debug!(%error, "sweeping dead processes failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_ends() {
        let policy = RetryPolicy {
            max_attempts: 5,
            max_age: Duration::from_secs(3600),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(4),
        };
        let first = retry_delay(&policy, 1, Duration::ZERO, None).unwrap();
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        let fourth = retry_delay(&policy, 4, Duration::ZERO, None).unwrap();
        assert!(fourth >= Duration::from_secs(2) && fourth <= Duration::from_secs(4));
        assert_eq!(retry_delay(&policy, 5, Duration::ZERO, None), None);
        let asked = retry_delay(&policy, 1, Duration::ZERO, Some(Duration::from_secs(30)));
        assert_eq!(asked, Some(Duration::from_secs(30)));
        assert_eq!(
            retry_delay(&policy, 1, Duration::from_millis(3_599_600), None),
            None,
            "past max_age"
        );
    }
}
