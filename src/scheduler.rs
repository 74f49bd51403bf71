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
use crate::destination::{DeliveryContext, Event, Outcome, Verdict};
use crate::sender::{HttpClient, Sender};
use crate::store::{self, ClaimedJob, DeadJob, JobKey, RetryJob, Store};
use crate::traffic::{Closed, Concurrency, KeyGate};

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
            stats: Arc::default(),
        }
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

    /// A claim's lease: the request's timeout plus room for the outcome to be written.
    fn lease(&self) -> Duration {
        self.config.timeout + Duration::from_secs(30)
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
                Outcome::Failed { .. } => {}
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
}

impl Pool {
    /// Starts the scheduling loop, the completer, the `LISTEN` task and the sweeper.
    pub fn start(store: Store, lanes: LaneSet, max_concurrent: usize, instance: i32) -> Pool {
        let (wake, woken) = mpsc::unbounded_channel();
        let (finished, outcomes) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let deliveries = TaskTracker::new();
        let mut tasks = tokio::task::JoinSet::new();
        let scheduler = Scheduler {
            store: store.clone(),
            lane_set: lanes.clone(),
            seen: Arc::new(Vec::new()),
            lanes: HashMap::new(),
            order: Vec::new(),
            permits: Arc::new(Semaphore::new(max_concurrent)),
            instance,
            woken,
            wake: wake.clone(),
            finished,
            deliveries: deliveries.clone(),
            stop: stop.clone(),
        };
        tasks.spawn(scheduler.run());
        let drained = CancellationToken::new();
        tasks.spawn(complete(
            store.clone(),
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
        }
    }

    /// Stops claiming, lets in-flight deliveries finish within `grace`, and writes every
    /// outcome. Deliveries still running after `grace` are abandoned; their claims are
    /// released by the caller.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop.cancel();
        self.deliveries.close();
        if tokio::time::timeout(grace, self.deliveries.wait())
            .await
            .is_err()
        {
            tracing::warn!("deliveries still running after the grace period; releasing them");
        }
        self.drained.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct Scheduler {
    store: Store,
    lane_set: LaneSet,
    /// The lane set `lanes` and `order` were built from.
    seen: Arc<Vec<Arc<Lane>>>,
    lanes: HashMap<i32, Arc<Lane>>,
    /// Round-robin order of every destination.
    order: Vec<i32>,
    permits: Arc<Semaphore>,
    instance: i32,
    woken: mpsc::UnboundedReceiver<Wake>,
    wake: mpsc::UnboundedSender<Wake>,
    finished: mpsc::UnboundedSender<Finished>,
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
            let mut progressed = false;
            for _ in 0..ready.len() {
                let Some(id) = ready.pop_front() else { break };
                let Some(lane) = self.lanes.get(&id).cloned() else {
                    queued.remove(&id);
                    continue;
                };
                match self.visit(&lane).await {
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
            }
        }
    }

    /// Picks up a new lane set after a reload; new and changed destinations are looked at.
    fn follow_reloads(&mut self, ready: &mut VecDeque<i32>, queued: &mut HashSet<i32>) {
        let current = self.lane_set.load_full();
        if Arc::ptr_eq(&current, &self.seen) {
            return;
        }
        self.lanes = current.iter().map(|lane| (lane.id, lane.clone())).collect();
        self.order = current.iter().map(|lane| lane.id).collect();
        for &id in &self.order {
            if queued.insert(id) {
                ready.push_back(id);
            }
        }
        self.seen = current;
    }

    /// Claims and starts what one destination can take now.
    async fn visit(&self, lane: &Arc<Lane>) -> Visit {
        let slots = lane.free_slots().min(self.permits.available_permits());
        // While requests are in flight, wait until a quarter of the slots are free: one claim
        // then starts several requests, instead of one query per finished request.
        let worth_a_claim = (lane.concurrency_limit() / 4).max(1);
        if slots == 0 || (slots < worth_a_claim && lane.in_flight() > 0) {
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
        let want = (requests * batch).min(MAX_CLAIM);
        let ordered = lane.config.ordering == config::Ordering::PerUser;
        let jobs = match self
            .store
            .claim(lane.id, want, lane.lease(), self.instance, ordered)
            .await
        {
            Ok(jobs) => jobs,
            Err(error) => {
                tracing::warn!(%error, destination = %lane.config.name, "claiming work failed");
                return Visit::Failed;
            }
        };
        if jobs.is_empty() {
            return Visit::Idle;
        }
        let more = jobs.len() == want;
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            let requests: Vec<ClaimedJob> = jobs.by_ref().take(batch).collect();
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                // Only this loop takes permits, so the count above holds; never drop claims.
                unreachable!("permits were counted before claiming");
            };
            lane.in_flight.fetch_add(1, Ordering::AcqRel);
            let lane = lane.clone();
            let finished = self.finished.clone();
            let wake = self.wake.clone();
            self.deliveries.spawn(async move {
                let outcomes = deliver(&lane, requests).await;
                lane.in_flight.fetch_sub(1, Ordering::AcqRel);
                drop(permit);
                let _ = finished.send(outcomes);
                let _ = wake.send(Wake::Destinations(vec![lane.id]));
            });
        }
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

/// Outcomes of one request, ready to write.
#[derive(Default)]
struct Finished {
    delivered: Vec<JobKey>,
    retried: Vec<RetryJob>,
    dead: Vec<DeadJob>,
    /// Destinations with an ordered queue whose head moves once these are written.
    ordered: Vec<i32>,
}

/// Runs one request: the plugin under a timeout with panics caught, then each event's fate.
#[tracing::instrument(
    name = "delivery",
    skip_all,
    fields(
        destination = %lane.config.name,
        key = %lane.gate.digest,
        events = jobs.len(),
        attempt = jobs.iter().map(|j| j.attempts).max().unwrap_or(0),
    )
)]
async fn deliver(lane: &Lane, jobs: Vec<ClaimedJob>) -> Finished {
    let started = Instant::now();
    let events: Vec<Event> = jobs
        .iter()
        .map(|job| Event {
            message_id: job.message_id.clone(),
            payload: raw_payload(&job.payload),
        })
        .collect();
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
        Verdict::All(outcome) => vec![outcome; jobs.len()],
        Verdict::PerEvent(outcomes) if outcomes.len() == jobs.len() => outcomes,
        Verdict::PerEvent(outcomes) => vec![
            Outcome::retry(format!(
                "the {} plugin returned {} outcomes for {} events",
                lane.config.kind,
                outcomes.len(),
                jobs.len()
            ));
            jobs.len()
        ],
    };
    lane.learn(&outcomes);
    let name = lane.config.name.clone();
    let now = OffsetDateTime::now_utc();
    let mut finished = Finished::default();
    if lane.config.ordering == config::Ordering::PerUser {
        finished.ordered.push(lane.id);
    }
    for (job, outcome) in jobs.iter().zip(outcomes) {
        match outcome {
            Outcome::Delivered => {
                let latency = (now - job.enqueued_at).as_seconds_f64().max(0.0);
                metrics::histogram!("switchyard_delivery_latency_seconds", "destination" => name.clone())
                    .record(latency);
                metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "delivered")
                    .increment(1);
                lane.stats.delivered.fetch_add(1, Ordering::Relaxed);
                finished.delivered.push(job.key);
            }
            Outcome::Retry {
                status,
                retry_after,
                message,
                ..
            } => {
                lane.note_error(&message);
                let age = (now - job.enqueued_at).unsigned_abs();
                match retry_delay(&lane.config.retry, job.attempts, age, retry_after) {
                    Some(delay) => {
                        lane.stats.retried.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "retried")
                            .increment(1);
                        finished.retried.push(RetryJob {
                            key: job.key,
                            delay,
                            status: status.map(i32::from),
                            error: message,
                        });
                    }
                    None => {
                        lane.stats.dead.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "dead")
                            .increment(1);
                        finished.dead.push(DeadJob {
                            key: job.key,
                            status: status.map(i32::from),
                            error: format!("gave up after {} attempts: {message}", job.attempts),
                        });
                    }
                }
            }
            Outcome::Failed { status, message } => {
                lane.note_error(&message);
                lane.stats.dead.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "dead")
                    .increment(1);
                finished.dead.push(DeadJob {
                    key: job.key,
                    status: status.map(i32::from),
                    error: message,
                });
            }
        }
    }
    tracing::debug!(
        destination = %name,
        events = jobs.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "delivery finished"
    );
    finished
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

/// Writes outcomes in batches; a failed write is retried, never dropped (until then the claims
/// stay leased, so nothing is claimed twice meanwhile).
async fn complete(
    store: Store,
    mut outcomes: mpsc::UnboundedReceiver<Finished>,
    wake: mpsc::UnboundedSender<Wake>,
    drained: CancellationToken,
) {
    let mut pending = Finished::default();
    loop {
        let first = tokio::select! {
            first = outcomes.recv() => first,
            _ = drained.cancelled() => None,
        };
        let Some(first) = first else {
            while let Ok(last) = outcomes.try_recv() {
                absorb(&mut pending, last);
            }
            break;
        };
        absorb(&mut pending, first);
        let linger = tokio::time::sleep(FINISH_LINGER);
        tokio::pin!(linger);
        while size(&pending) < MAX_FINISH_BATCH {
            tokio::select! {
                next = outcomes.recv() => match next {
                    Some(next) => absorb(&mut pending, next),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let ordered = std::mem::take(&mut pending.ordered);
        flush(&store, &mut pending).await;
        if !ordered.is_empty() {
            let _ = wake.send(Wake::Destinations(ordered));
        }
    }
    flush(&store, &mut pending).await;
}

fn absorb(into: &mut Finished, from: Finished) {
    into.delivered.extend(from.delivered);
    into.retried.extend(from.retried);
    into.dead.extend(from.dead);
    for id in from.ordered {
        if !into.ordered.contains(&id) {
            into.ordered.push(id);
        }
    }
}

fn size(finished: &Finished) -> usize {
    finished.delivered.len() + finished.retried.len() + finished.dead.len()
}

async fn flush(store: &Store, pending: &mut Finished) {
    let mut backoff = Duration::from_millis(100);
    while size(pending) > 0 {
        match store
            .finish(&pending.delivered, &pending.retried, &pending.dead)
            .await
        {
            Ok(()) => {
                *pending = Finished::default();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, outcomes = size(pending), "writing outcomes failed; retrying");
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
        let mut listener = match sqlx::postgres::PgListener::connect_with(store.pool()).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "LISTEN connection failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if let Err(error) = listener.listen(store::JOBS_CHANNEL).await {
            tracing::warn!(%error, "LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let _ = wake.send(Wake::All);
        loop {
            let notification = tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match notification {
                Ok(Some(notification)) => {
                    let message = match store::parse_notice(notification.payload()) {
                        Some(ids) => Wake::Destinations(ids),
                        None => Wake::All,
                    };
                    if wake.send(message).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    // Reconnected: notifications may have been lost.
                    let _ = wake.send(Wake::All);
                }
                Err(error) => {
                    tracing::warn!(%error, "LISTEN connection lost; reconnecting");
                    break;
                }
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
    let processes = store.instance_count().await?.max(1) as usize;
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
